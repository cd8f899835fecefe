"""How far sparse GEMV kernels can take batch-1 decode: a fit of `experiments.decode.bench_decode` results.

Per model and method (batch 1), the step time is fitted as t(s) = a + b * kept linear bytes(s) over the
measured sparsities. b is the sparse kernels' marginal time per byte; a, the time at zero kept weights,
holds the step's rest (norms, RoPE, attention, cache, residual adds, lm_head, launch gaps) plus the
sparse kernels' fixed costs. With a `no_linear` row (the step with weightless linear sites) the rest R
is measured, so a - R is the sparse kernels' fixed cost, and R + b * kept bytes is the step time of
sparse kernels with no fixed cost at the fitted rate. A fit over three noisy points can give b above
the copy bandwidth, so the firmer bound is R + kept bytes / (the run's measured copy bandwidth): no
per-site kernel, however tuned, beats it on this step. Also printed: the intercept a step must have
for each target speedup at the fitted b.

  python -m experiments.decode.decode_ceiling --json=benchmarks/results/bench_decode_h200_llama.json
  python -m experiments.decode.decode_ceiling --json=benchmarks/results/bench_decode_h200_loop_e.json \
      --plot=benchmarks/results/decode_h200_ceiling.png      # measured speedups, ceilings and targets
"""

from __future__ import annotations

import json

from absl import app, flags

from experiments import common
from wina_jax import checks
from wina_jax.bench.ceiling import analyse, plot

common.check(
  flags.DEFINE_list("json", ["benchmarks/results/bench_decode_h200_llama.json"], "bench_decode result JSONs"),
  checks.each(checks.json_file(empty=False), str, nonempty=True),
)
flags.DEFINE_list("methods", ["teal", "wina"], "sparse variants fitted")
flags.DEFINE_list("targets", ["0.5:1.8", "0.65:2.4"], "sparsity:speedup targets (issue 6)")
common.check(
  flags.DEFINE_string(
    "plot", "", "also draw speedup vs sparsity (measured, per-site ceiling, targets) here (PNG)"
  ),
  checks.out_path(),
)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  targets = {float(t.split(":")[0]): float(t.split(":")[1]) for t in FLAGS.targets}
  fits = []
  for path in FLAGS.json:
    with open(path) as f:
      run = json.load(f)
    copy = max((v for k, v in run.get("copy_gb_per_s", {}).items() if not k.endswith("error")), default=None)
    fits += [r for method in FLAGS.methods for r in analyse(run["rows"], method, targets, copy)]
  print(
    "| model | attention | method | dense ms | intercept a ms | marginal TB/s | rest R ms | fixed a-R ms | "
    + " | ".join(f"{s:.0%}: measured / ceiling / copy bound / target x, a needed ms" for s in targets)
    + " |"
  )
  print("|" + "---|" * (8 + len(targets)))
  f = lambda v, p=3: "n/a" if v is None else f"{v:.{p}f}"
  for r in fits:
    cells = [
      f"{f(t['measured_x'], 2)} / {f(t.get('ceiling_x'), 2)} / {f(t.get('copy_bound_x'), 2)} / {t['target_x']:.2f}, "
      f"{t['intercept_needed_ms']:.2f}"
      for t in r["targets"].values()
    ]
    print(
      f"| {r['model']} | {r['attention']} | {r['method']} | {r['dense_ms']:.3f} | {r['intercept_ms']:.3f} "
      f"| {f(r['marginal_tb_per_s'], 2)} | {f(r['rest_ms'])} | {f(r.get('fixed_ms'))} | "
      + " | ".join(cells)
      + " |"
    )
  if FLAGS.plot:
    plot(fits, targets, FLAGS.plot)


if __name__ == "__main__":
  app.run(main)

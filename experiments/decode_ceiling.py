"""How far sparse GEMV kernels can take batch-1 decode: a fit of `experiments.bench_decode` results.

Per model and method (batch 1), the step time is fitted as t(s) = a + b * kept linear bytes(s) over the
measured sparsities. b is the sparse kernels' marginal time per byte; a, the time at zero kept weights,
holds the step's rest (norms, RoPE, attention, cache, residual adds, lm_head, launch gaps) plus the
sparse kernels' fixed costs. With a `no_linear` row (the step with weightless linear sites) the rest R
is measured, so a - R is the sparse kernels' fixed cost, and R + b * kept bytes is the step time of
sparse kernels with no fixed cost: the ceiling of any per-site kernel on this step. Also printed: the
intercept a step must have for each target speedup at the fitted b.

  python -m experiments.decode_ceiling --json=benchmarks/results/bench_decode_h200_llama.json
"""
from __future__ import annotations

import json

import numpy as np
from absl import app, flags

flags.DEFINE_list("json", ["benchmarks/results/bench_decode_h200_llama.json"], "bench_decode result JSONs")
flags.DEFINE_list("methods", ["teal", "wina"], "sparse variants fitted")
flags.DEFINE_list("targets", ["0.5:1.8", "0.65:2.4"], "sparsity:speedup targets (issue 6)")
FLAGS = flags.FLAGS


def analyse(rows: list[dict], method: str, targets: dict[float, float]) -> list[dict]:
  """Per model in `rows` (bench_decode rows): the fit and the ceilings of `method` at batch 1."""
  out = []
  for model in sorted({r["model"] for r in rows}):
    one = [r for r in rows if r["model"] == model and r["batch"] == 1]
    dense = min(r["ms_per_step"] for r in one if r["variant"] in ("dense", "dense_unfused"))
    pts = sorted((r["sparsity"], r["kept_weight_fraction"], r["ms_per_step"], r["bytes_per_step"])
                 for r in one if r["variant"] == method)
    full = next((r["bytes_per_step"] for r in one if r["variant"] == "dense"), None)
    partial = [(k, by) for _, k, _, by in pts if k < 0.999]
    if len(pts) < 2 or full is None or not partial:
      continue
    k, by = partial[0]
    linear = (full - by) / (1 - k)                        # bytes of all linear sites' weights
    kept = np.array([p[1] for p in pts]) * linear / 1e9   # GB of kept weights per step
    ms = np.array([p[2] for p in pts])
    b, a = np.polyfit(kept, ms, 1)
    rest = next((r["ms_per_step"] for r in one if r["variant"] == "no_linear"), None)
    row = {"model": model, "method": method, "dense_ms": dense, "intercept_ms": float(a),
           "marginal_tb_per_s": float(1 / b) if b > 0 else None,
           "fit_max_err_ms": float(np.max(np.abs(a + b * kept - ms))), "rest_ms": rest, "targets": {}}
    if rest is not None:
      row["fixed_ms"] = float(a - rest)
    for s, goal in targets.items():
      gb = (1 - s) * linear / 1e9
      measured = next((p[2] for p in pts if abs(p[0] - s) < 1e-6), None)
      t = {"measured_x": dense / measured if measured else None, "target_x": goal,
           "intercept_needed_ms": float(dense / goal - b * gb)}
      if rest is not None:
        t["ceiling_x"] = float(dense / (rest + b * gb))
      row["targets"][str(s)] = t
    out.append(row)
  return out


def main(argv):
  del argv
  targets = {float(t.split(":")[0]): float(t.split(":")[1]) for t in FLAGS.targets}
  rows = []
  for path in FLAGS.json:
    with open(path) as f:
      rows += json.load(f)["rows"]
  print("| model | method | dense ms | intercept a ms | marginal TB/s | rest R ms | fixed a-R ms | "
        + " | ".join(f"{s:.0%}: measured / ceiling / target x, a needed ms" for s in targets) + " |")
  print("|" + "---|" * (7 + len(targets)))
  for method in FLAGS.methods:
    for r in analyse(rows, method, targets):
      f = lambda v, p=3: "n/a" if v is None else f"{v:.{p}f}"
      cells = [f"{f(t['measured_x'], 2)} / {f(t.get('ceiling_x'), 2)} / {t['target_x']:.1f}, "
               f"{t['intercept_needed_ms']:.2f}" for t in r["targets"].values()]
      print(f"| {r['model']} | {method} | {r['dense_ms']:.3f} | {r['intercept_ms']:.3f} "
            f"| {f(r['marginal_tb_per_s'], 2)} | {f(r['rest_ms'])} | {f(r.get('fixed_ms'))} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  app.run(main)

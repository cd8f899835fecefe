"""Where one launch of the Mosaic kept-row kernel (`mosaic_gemv.fused_partials`) spends its time, from its own clock.

Thread 0 of every program reads the GPU's global nanosecond clock at each work item's start, after its
compaction (threshold, scan, kept ids and x^T into shared memory; skipped where the item shares its
predecessor's segment and split), after its last wgmma and after its store. Per fused shape of a model
(random bfloat16 weights and input, TEAL thresholds at each sparsity's quantile of |x|): the kernel's span
(first start to last end), per phase ('compact', 'tiles', 'store', 'next': the gap to the next item's start)
the median item and the median and largest per-program total (`wina_jax.bench.timing.clock_phases`), each the
median over --reps launches; and the call's wall time (`timed`, dispatch hidden), whose excess over the span
is launch and the partials' sum. Off the GPU the kernel only lowers (a smoke run of the plumbing, no marks).

GPU:  PYTHONPATH=. python3 -m experiments.decode.mosaic_marks --specs=64:64:4:0:132:cp_async:kernel \
        --sparsities=0,0.5,0.999 --out=$OUT/mosaic_marks.json
CPU:  PYTHONPATH=. .venv/bin/python -m experiments.decode.mosaic_marks --models=tiny --specs=64:64:2:0:4 --reps=1
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from wina_jax import checks
from wina_jax.bench.decode_setup import teal_thresholds
from wina_jax.bench.shapes import SHAPES
from wina_jax.bench.timing import PHASES, clock_phases, run_record, timed
from wina_jax.decode import fused_site_shapes
from wina_jax.kernels import mosaic_gemv as mg


def fused_config(spec: str) -> mg.MosaicConfig:
  """'bk:bn:stages[:splits[:programs]]', the fused kernel's gather and compaction appended; a longer spec must
  name compaction 'kernel' itself (this script times `fused_partials` only)."""
  fields = spec.split(":")
  if len(fields) <= 5:
    fields += ["0"] * (5 - len(fields)) + ["cp_async", "kernel"]
  cfg = mg.parse(":".join(fields))
  if cfg.compact != "kernel":
    raise ValueError(
      f"compacts with {cfg.compact!r}; this script times compact 'kernel' only (end the spec in :kernel)"
    )
  return cfg


common.check(
  flags.DEFINE_list("models", ["llama3_8b"], "model shapes"),
  checks.each(checks.one_of(SHAPES), str, nonempty=True),
)
common.check(
  flags.DEFINE_list("sparsities", ["0", "0.5", "0.999"], "TEAL sparsities (quantiles of |x|)"),
  checks.each(checks.fraction()),
)
common.check(
  flags.DEFINE_list(
    "specs",
    ["64:64:4:0:132", "64:256:3:0:132"],
    "fused_partials tilings (mosaic_gemv.parse; ':cp_async:kernel' is added where a spec has fewer fields)",
  ),
  checks.each(checks.parses(fused_config), str, nonempty=True),
)
common.check(
  flags.DEFINE_integer("reps", 5, "marked launches per row (the median is reported)"), checks.count()
)
common.check(flags.DEFINE_string("out", "", "write results JSON here"), checks.out_path())
FLAGS = flags.FLAGS


def row(d_in: int, segs, spec: str, sparsity: float, key) -> dict:
  """One shape, tiling and sparsity: the kernel's phases from its marks, and the call's wall time."""
  n = sum(segs)
  cfg = mg.resolved(fused_config(spec), d_in, n)
  x = jax.random.normal(key, (1, d_in), jnp.bfloat16)
  w = jax.random.normal(jax.random.fold_in(key, 1), (d_in, n), jnp.bfloat16)
  t = teal_thresholds(x, sparsity, len(segs))
  out = {
    "config": spec,
    "resolved": str(cfg),
    "sparsity": sparsity,
    "kept": float(jnp.mean(jnp.abs(x) > t[0])),
  }
  marked = jax.jit(lambda x, t, w: mg.fused_partials(x, t, None, w, cfg, tuple(segs), marks=True))
  if jax.default_backend() != "gpu":
    out["lowered"] = "mosaic_gpu" in marked.trace(x, t, w).lower(lowering_platforms=("cuda",)).as_text()
    return out
  items = mg.items_per_program(cfg, n)
  runs = [clock_phases(np.asarray(marked(x, t, w)[1]), items) for _ in range(FLAGS.reps + 1)][1:]
  out["span_us"] = statistics.median(r["span_us"] for r in runs)
  out["program_busy_us"] = statistics.median(r["program_busy_us"] for r in runs)
  for p in PHASES:
    out[p] = {k: statistics.median(r[p][k] for r in runs) for k in runs[0][p]}
  plain = jax.jit(lambda x, t, w: mg.fused_partials(x, t, None, w, cfg, tuple(segs)))
  out["call_us"] = timed(plain, x, t, w) * 1e6
  return out


def main(argv):
  del argv
  declared = common.setup(jnp.bfloat16)
  res = {**run_record(declared), "rows": []}
  key = jax.random.PRNGKey(0)
  for model in FLAGS.models:
    for d_in, segs in fused_site_shapes(SHAPES[model]):
      for spec in FLAGS.specs:
        for s in [float(v) for v in FLAGS.sparsities]:
          r = {"model": model, "shape": f"{d_in}x{sum(segs)}"}
          try:
            r.update(row(d_in, segs, spec, s, key))
          except ValueError as e:  # a tiling this shape does not take: recorded, not fatal
            r.update(config=spec, sparsity=s, error=str(e))
          if "span_us" in r:
            phases = "  ".join(f"{p} {r[p]['program_median_us']:.2f}" for p in PHASES)
            line = (
              f"{r['shape']:12s} {spec:16s} s={s:<6} kept {r['kept']:.3f}  call {r['call_us']:6.1f} us  "
              f"span {r['span_us']:6.1f}  program {r['program_busy_us']:6.1f}: {phases}"
            )
          else:
            line = f"{r['shape']:12s} {spec:16s} s={s:<6} {r.get('error') or 'lowered: ' + str(r['lowered'])}"
          common.emit_row(res, r, line, FLAGS.out)


if __name__ == "__main__":
  app.run(main)

"""The MLP's two sparse sites in one persistent Mosaic launch (`mosaic_mlp.mlp_partials`: gate|up, a grid-wide
wait, SwiGLU, a wait, down) against the same kernel launched per site (`mosaic_gemv.fused_partials` twice,
XLA's sum and SwiGLU between them), and XLA's dense MLP, per model shape, tiling and TEAL sparsity.

Random bfloat16 x [1, d] and weights (scaled so the down input is O(1)); thresholds at each sparsity's quantile
of |x| (gate|up) and of the per-site path's |SiLU(gate) * up| (down). Per row: us per call of each path (both
end in the down site's bf16 output: the splits' partials summed by XLA; `chain_times`: --chain calls in one
jitted loop, as a decode step runs them, median and range of --chain_reps runs, with the chain's own cost a
call beside them as chain_floor), the persistent launch's relative error against the per-site path and its
watchdog count, and from its own clock: each phase's span (first item start to last item end) and `between`
(median over programs of the time from the program's last gate|up item to its first down item: both waits
and the SwiGLU phase between them).

GPU:  PYTHONPATH=. python3 -m experiments.decode.mosaic_mlp --specs=64:256:3:0:132 --out=$OUT/mosaic_mlp.json
CPU:  PYTHONPATH=. .venv/bin/python -m experiments.decode.mosaic_mlp --models=tiny --specs=64:64:2:0:4 --reps=1
"""

from __future__ import annotations

import functools
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from wina_jax import checks
from wina_jax.bench.decode_setup import teal_thresholds
from wina_jax.bench.shapes import SHAPES
from wina_jax.bench.timing import chain_times, clock_phases, run_record
from wina_jax.kernels import mosaic_gemv as mg
from wina_jax.kernels import mosaic_mlp as mm
from wina_jax.kernels import mosaic_sync as ms

common.check(
  flags.DEFINE_list("models", ["llama3_8b"], "model shapes (hidden and intermediate sizes)"),
  checks.each(checks.one_of(SHAPES), str, nonempty=True),
)
common.check(
  flags.DEFINE_list("sparsities", ["0", "0.5", "0.65", "0.999"], "TEAL sparsities (quantiles of each input)"),
  checks.each(checks.fraction()),
)
common.check(
  flags.DEFINE_list("specs", ["64:256:3:0:132"], "tilings (mosaic_gemv.parse; compaction in the kernel)"),
  checks.each(checks.parses(mg.parse), str, nonempty=True),
)
common.check(
  flags.DEFINE_integer("reps", 5, "marked launches per row (the median is reported)"), checks.count()
)
common.check(flags.DEFINE_integer("chain", 16, "calls in a row per timed run (chain_times)"), checks.count())
common.check(
  flags.DEFINE_integer("chain_reps", 9, "timed runs per path (median and range reported)"), checks.count()
)
common.check(flags.DEFINE_string("out", "", "write results JSON here"), checks.out_path())
FLAGS = flags.FLAGS


def weights(d: int, f: int, key):
  k = jax.random.split(key, 3)
  x = jax.random.normal(k[0], (1, d), jnp.bfloat16)
  w_gu = (jax.random.normal(k[1], (d, 2 * f)) / np.sqrt(d)).astype(jnp.bfloat16)
  w_down = (jax.random.normal(k[2], (f, d)) / np.sqrt(f)).astype(jnp.bfloat16)
  return x, w_gu, w_down


@functools.cache
def paths(cfg: mg.MosaicConfig, d: int, f: int):
  """(per-site, persistent, dense, marked) jitted callables, made once per tiling and shape so the sparsities
  reuse their compiles (thresholds are arguments): the first three of (x, thr_gu, w_gu, thr_down, w_down) ->
  [1, d] bf16 (persistent: and its gave_up); marked: `mlp_partials(..., marks=True)`'s arguments and outputs."""
  cfg_gu, cfg_down = mm.configs(cfg, d, f)

  def out(parts):
    return mg.partials_output(parts, 1, jnp.bfloat16)

  def per_site(x, thr_gu, w_gu, thr_down, w_down):
    y = out(mg.fused_partials(x, thr_gu, None, w_gu, cfg_gu, (f, f)))
    a = mm.swiglu(y[:, :f], y[:, f:])
    return out(mg.fused_partials(a, thr_down, None, w_down, cfg_down, (d,)))

  def persistent(x, thr_gu, w_gu, thr_down, w_down):
    *_, parts, gave_up = mm.mlp_partials(x, thr_gu, None, w_gu, thr_down, None, w_down, cfg)
    return out(parts), gave_up

  def dense(x, thr_gu, w_gu, thr_down, w_down):
    del thr_gu, thr_down
    y = jnp.dot(x, w_gu, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    return jnp.dot(mm.swiglu(y[:, :f], y[:, f:]), w_down, preferred_element_type=jnp.float32).astype(x.dtype)

  marked = jax.jit(lambda *a: mm.mlp_partials(*a, cfg, marks=True))
  return jax.jit(per_site), jax.jit(persistent), jax.jit(dense), marked


def floor(x, *rest):
  """The chain's own cost a call (`timed_chain`'s select), with no MLP."""
  del rest
  return x


def row(d: int, f: int, spec: str, s: float, key) -> dict:
  cfg = mg.parse(spec)
  cfg_gu, cfg_down = mm.configs(cfg, d, f)
  x, w_gu, w_down = weights(d, f, key)
  thr_gu = teal_thresholds(x, s, 2)
  y = jnp.dot(x, w_gu, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
  thr_down = teal_thresholds(mm.swiglu(y[:, :f], y[:, f:]), s)  # of the dense path's down input
  args = (x, thr_gu, w_gu, thr_down, w_down)
  per_site, persistent, dense, marked = paths(cfg, d, f)
  out = {
    "config": spec,
    "splits": [cfg_gu.splits, cfg_down.splits],
    "programs": cfg_gu.programs,
    "sparsity": s,
  }
  if jax.default_backend() != "gpu":
    out["lowered"] = "mosaic_gpu" in persistent.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return out
  want, (got, gave_up) = per_site(*args), persistent(*args)
  ms.check_gave_up(gave_up)
  diff = np.linalg.norm(np.asarray(got, np.float32) - np.asarray(want, np.float32))
  out["rel_err_vs_per_site"] = float(diff / max(np.linalg.norm(np.asarray(want, np.float32)), 1e-30))
  paths_us = [("per_site", per_site), ("persistent", persistent), ("dense", dense), ("chain_floor", floor)]
  for k, p in paths_us:  # median, and the runs' range: the band of this row
    ts = [t * 1e6 for t in chain_times(p, *args, n=FLAGS.chain, reps=FLAGS.chain_reps)]
    out[f"{k}_us"], out[f"{k}_us_range"] = statistics.median(ts), [min(ts), max(ts)]
  items_gu, items_down = mg.items_per_program(cfg_gu, 2 * f), mg.items_per_program(cfg_down, d)
  ja = int(items_gu.max())
  spans, waits = {"gate_up": [], "down": []}, []
  for rep in range(FLAGS.reps + 1):
    m = np.asarray(marked(x, thr_gu, None, w_gu, thr_down, None, w_down)[-1]).astype(np.int64)
    if rep == 0:
      continue
    spans["gate_up"].append(clock_phases(m[:, :ja], items_gu)["span_us"])
    spans["down"].append(clock_phases(m[:, ja:], items_down)["span_us"])
    last_a = m[np.arange(len(items_gu)), np.maximum(items_gu - 1, 0), 3]
    first_b = m[:, ja, 0]
    has = (items_gu > 0) & (items_down > 0)
    waits.append(float(np.median(((first_b - last_a) % (1 << 32))[has])) / 1e3)
  out.update({f"{k}_span_us": statistics.median(v) for k, v in spans.items()})
  out["between_us"] = statistics.median(waits)
  return out


def main(argv):
  del argv
  declared = common.setup(jnp.bfloat16)
  res = {**run_record(declared), "rows": []}
  key = jax.random.PRNGKey(0)
  for model in FLAGS.models:
    d, f = SHAPES[model].hidden_size, SHAPES[model].intermediate_size
    for spec in FLAGS.specs:
      for s in [float(v) for v in FLAGS.sparsities]:
        r = {"model": model, "shape": f"{d}x{f}"}
        try:
          r.update(row(d, f, spec, s, key))
        except ValueError as e:  # a tiling this shape does not take: recorded, not fatal
          r.update(config=spec, sparsity=s, error=str(e))
        if "persistent_us" in r:
          line = (
            f"{model} {spec} s={s:<6} per-site {r['per_site_us']:7.1f} us  persistent {r['persistent_us']:7.1f} "
            f"(x{r['per_site_us'] / r['persistent_us']:.2f})  dense {r['dense_us']:7.1f}  "
            f"floor {r['chain_floor_us']:.1f}  spans "
            f"{r['gate_up_span_us']:.1f} + between {r['between_us']:.2f} + {r['down_span_us']:.1f}  "
            f"rel_err {r['rel_err_vs_per_site']:.1e}"
          )
        else:
          line = f"{model} {spec} s={s:<6} {r.get('error') or 'lowered: ' + str(r['lowered'])}"
        common.emit_row(res, r, line, FLAGS.out)


if __name__ == "__main__":
  app.run(main)

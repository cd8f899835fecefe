"""Where a decode step's time goes: the device kernels of `decode_loop`, from a JAX profiler trace.

  python -m experiments.decode.profile_decode --models=llama3_8b,qwen25_7b --variants=dense,teal:0.5,teal:0.65 \
      --configs=benchmarks/configs/h200_partials.json --out=$OUT/profile.json
  python -m experiments.decode.profile_decode --tiny          # CPU smoke test (host XLA ops, no device plane)
  python -m experiments.decode.profile_decode --variants=dense,teal:0.5 --attention=pallas \
      --persistent=256:32:256:4:2:0.875:64:2:compact:true   # the persistent kernel's per-phase profile
  python -m experiments.decode.profile_decode --variants=teal:0.5,teal:0.999 --attention=pallas \
      --mosaic=64:64:4:0:132:cp_async:kernel   # the sparse variants on the Mosaic GPU kept-row kernel
  python -m experiments.decode.profile_decode --variants=teal:0.999,teal:0.999+mlp --attention=pallas \
      --mosaic=64:256:3:0:132:cp_async:kernel  # +mlp: each MLP as one persistent Mosaic launch
  python -m experiments.decode.profile_decode --variants=weightless,teal:0.999 --attention=pallas \
      --configs=benchmarks/configs/h200_partials.json  # what the sparse sites add over the weightless step
  (--attention=pallas: the Pallas decode-attention kernel instead of XLA's attention, interpret mode on CPU)

Per variant it traces one `decode_loop` run (random bf16 weights, thresholds at the sparsity quantile,
as `bench_decode`) and reports per step (`wina_jax.bench.trace`): kernels launched, busy time (the
union of kernel intervals), span (first kernel start to last kernel end) and the gap between them
(the profiler adds launch latency, so read gaps from wall time instead), and busy time and count per
kernel category.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import common
from wina_jax import checks
from wina_jax.bench.decode_setup import (
  MOSAIC_MODES,
  NoLinear,
  load_configs,
  make_sparsifier,
  on_mosaic,
  site_scores,
)
from wina_jax.bench.shapes import SHAPES
from wina_jax.bench.timing import run_record
from wina_jax.bench.trace import summarize, trace_events
from wina_jax.decode import decode_loop, fuse_projections
from wina_jax.kernels import FusedThresholdSparsifier
from wina_jax.kernels import mosaic_gemv as MG
from wina_jax.kernels import persistent_config as PC
from wina_jax.model import init_cache
from wina_jax.testing import random_params

FLAGS = flags.FLAGS
common.check(
  flags.DEFINE_list("models", ["llama3_8b"], "model shapes (wina_jax.bench.shapes.SHAPES)"),
  checks.each(checks.one_of(SHAPES), str, nonempty=True),
)
flags.DEFINE_list("variants", ["dense", "teal:0.5", "teal:0.65", "wina:0.5"], "dense | METHOD:SPARSITY")
common.check(flags.DEFINE_integer("steps", 32, "decode steps in the traced run"), checks.count())
common.check(flags.DEFINE_integer("max_len", 512, "KV cache slots"), checks.count())
common.check(
  flags.DEFINE_list("configs", [], "kernel_sweep JSONs of tuned tilings (later files win per shape)"),
  checks.each(checks.json_file(empty=False), str),
)
common.check(flags.DEFINE_integer("top", 12, "kernel names listed per variant"), checks.count())
flags.DEFINE_enum(
  "attention",
  "xla",
  ["xla", "pallas"],
  "decode attention: XLA ops or the Pallas kernel (interpret mode off the GPU)",
)
flags.DEFINE_bool(
  "fuse_norm",
  False,
  "sparse variants normalise in the kernels' prologue (FusedThresholdSparsifier.fuse_norm)",
)


def persistent_rule(spec: str):
  """A `persistent_config.parse_config` spec ('' allowed: the per-site kernels)."""
  return checks.parses(PC.parse_config)(spec) if spec else None


common.check(
  flags.DEFINE_string(
    "persistent",
    "",
    "run every variant (dense too) through the persistent layer kernel with this tiling "
    "(persistent_config.parse_config); its split field true gives one launch per phase, named "
    "persistent_<phase>: the per-phase profile; empty: the per-site kernels",
  ),
  persistent_rule,
)
common.check(
  flags.DEFINE_string(
    "mosaic",
    "",
    "run the sparse variants on backend 'mosaic' with this tiling (mosaic_gemv.parse); empty: the per-site "
    "Pallas-Triton kernels",
  ),
  lambda spec: checks.parses(MG.parse)(spec) if spec else None,
)
common.check(flags.DEFINE_string("out", "", "write the results JSON here"), checks.out_path())
flags.DEFINE_bool("tiny", False, "CPU smoke test: tiny model, XLA path (host XLA ops, no device plane)")


def trace_run(params, cfg, sp, tokens, max_len, attention="xla") -> list:
  """Kernel events of one traced `decode_loop` run (compiled and warmed up first)."""

  def run():
    cache = init_cache(cfg, tokens.shape[0], max_len, jnp.bfloat16)
    return decode_loop(params, tokens, cache, sp, cfg=cfg, attention=attention)

  jax.block_until_ready(run())
  if hasattr(sp, "check_waits"):  # a persistent grid whose wait the watchdog gave up: no profile of it
    sp.check_waits()
  return trace_events(run)


def parse_variant(v: str) -> tuple[str, float, str]:
  """'dense' -> ('dense', 0.0, ''); 'weightless' -> ('weightless', 0.0, '') (linear sites that read no weights:
  `decode_setup.NoLinear`); 'teal:0.5' -> ('teal', 0.5, ''); 'teal:0.5+mlp' -> ('teal', 0.5, 'mlp'):
  with --mosaic, the Mosaic mode after the + (`decode_setup.on_mosaic`: fold, mlp22 or mlp). Anything else
  raises naming the fix."""
  base, plus, rest = v.partition("+")
  mode = rest if plus and rest in MOSAIC_MODES[1:] else ""
  method, _, s = base.partition(":")
  if method in ("dense", "weightless") and not s and not plus:
    return method, 0.0, ""
  try:
    sparsity = float(s)
  except ValueError:
    sparsity = -1.0
  if method not in ("teal", "wina") or not 0 <= sparsity < 1 or (plus and not mode):
    raise ValueError(
      f"variant {v!r}: use 'dense', 'weightless' or METHOD:SPARSITY[+fold | +mlp22 | +mlp] with METHOD "
      "teal | wina and SPARSITY in [0, 1), e.g. teal:0.5 or teal:0.5+mlp"
    )
  return method, sparsity, mode


def over(row: dict, base: dict, layers: int) -> dict:
  """row's kernels and busy time a step above base's (the weightless step), in total and per layer."""
  k, b = row["kernels_per_step"] - base["kernels_per_step"], row["busy_ms"] - base["busy_ms"]
  return {"kernels": k, "busy_ms": b, "layer_kernels": k / layers, "layer_busy_us": b * 1e3 / layers}


def profile_model(
  name: str, key, configs, backend: str, variants, steps: int, max_len: int, top: int, attention: str = "xla"
):
  """Rows (one per variant) of per-step kernel figures for the random-weight model shape `name`; after a
  'weightless' variant, every later row also has `over_weightless`: its kernels and busy time a step above it
  (what the linear sites add, glue included), in total and per layer."""
  if name not in SHAPES:
    raise ValueError(f"unknown model shape {name!r}; known: {sorted(SHAPES)}")
  params, cfg = fuse_projections(random_params(SHAPES[name], key), SHAPES[name])
  tokens = jax.random.randint(jax.random.fold_in(key, 1), (1, steps), 0, cfg.vocab_size)
  scores, rows, base = {}, [], None
  for v in variants:
    method, s, mode = parse_variant(v)
    if method == "dense":
      sp = None
    elif method == "weightless":
      sp = NoLinear()
    else:
      if method not in scores:
        scores[method] = site_scores(params, cfg, tokens, with_scale=method == "wina")
      sp = make_sparsifier(scores[method], s, 1, configs, backend)[0].replace(fuse_norm=FLAGS.fuse_norm)
      if FLAGS.mosaic:
        sp = on_mosaic(sp, FLAGS.mosaic, mode)
    if FLAGS.persistent and method != "weightless":
      sp = (sp or FusedThresholdSparsifier.create({})).as_persistent(PC.parse_config(FLAGS.persistent))
    events = trace_run(params, cfg, sp, tokens, max_len, attention)
    row = {"model": name, "variant": v, **summarize(events, steps, top)}
    if method == "weightless":
      base = row
    elif base is not None and "busy_ms" in row:
      row["over_weightless"] = over(row, base, cfg.num_hidden_layers)
    rows.append(row)
    print(
      f"{name} {v:10s} kernels/step {row['kernels_per_step']:7.1f}  busy {row.get('busy_ms', 0):.3f} ms  "
      f"span {row.get('span_ms', 0):.3f} ms  gap {row.get('gap_ms', 0):.3f} ms"
      + (
        "  over weightless: {kernels:+.1f} kernels, {busy_ms:+.3f} ms busy ({layer_kernels:+.2f} kernels, "
        "{layer_busy_us:+.2f} us a layer)".format(**row["over_weightless"])
        if "over_weightless" in row
        else ""
      ),
      flush=True,
    )
    for c, r in row.get("categories", {}).items():
      print(f"    {c:12s} {r['per_step']:7.1f}/step {r['ms']:.3f} ms", flush=True)
  return rows


def main(argv):
  declared = common.setup(jnp.bfloat16)  # `random_params`, the cache
  del argv
  if FLAGS.tiny:
    FLAGS.models, FLAGS.steps, FLAGS.max_len = ["tiny"], 4, 16
  for v in FLAGS.variants:  # fail before any model is built
    if parse_variant(v)[2] and not FLAGS.mosaic:
      raise ValueError(f"variant {v!r}: a Mosaic mode (+fold, +mlp22, +mlp) needs --mosaic=TILING")
  gpu = jax.default_backend() == "gpu"
  backend = "auto" if gpu else "xla"
  attention = "interpret" if FLAGS.attention == "pallas" and not gpu else FLAGS.attention
  configs = load_configs(FLAGS.configs)
  rows = []
  for i, name in enumerate(FLAGS.models):
    rows += profile_model(
      name,
      jax.random.PRNGKey(i),
      configs,
      backend,
      FLAGS.variants,
      FLAGS.steps,
      FLAGS.max_len,
      FLAGS.top,
      attention,
    )
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(
        {
          **run_record(declared),
          "flags": {
            "variants": FLAGS.variants,
            "steps": FLAGS.steps,
            "configs": FLAGS.configs,
            "fuse_norm": FLAGS.fuse_norm,
            "attention": FLAGS.attention,
            "persistent": FLAGS.persistent,
            "mosaic": FLAGS.mosaic,
          },
          "rows": rows,
        },
        f,
        indent=1,
      )


if __name__ == "__main__":
  app.run(main)

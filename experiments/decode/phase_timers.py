"""Where one launch of the persistent layer kernel spends its time, phase by phase, from the kernel's own clock.

`persistent_layer.phase_marks` runs the one-launch kernel with `PersistentConfig.timers`: every program reads
the GPU's global nanosecond clock when it starts each phase and when it arrives at the next wait. So each
phase's work and each wait is measured inside the fused kernel itself, where split launches (`profile_decode
--persistent=...:true`) compile each phase as its own kernel and were twice as slow as the fused one in
session 12. One layer of the model's shape (random bfloat16 weights, q|k|v and gate|up fused, a 256-token
vocabulary), one step at position --length of a random cache; thresholds at each segment's sparsity quantile
of the layer's own site scores on random tokens (`decode_setup.site_scores` / `make_sparsifier`, as
bench_decode). Per phase: the median and the max over programs of its work, the median wait after it (the
imbalance: the last arrival less this program's), each GEMV phase's prologue (its start to the first chunk's
input), and the launch's span (first start to last end), each the median over --reps launches; and the last
launch's work and prologue per program ('last_launch'), for the distributions a median hides. Off the GPU it
runs in interpret mode with one program, where the clock reads zero: a smoke run of the plumbing, not a
measurement.

GPU:  PYTHONPATH=. python3 -m experiments.decode.phase_timers --models=llama3_8b \
        --persistent_configs=128:128:128:4:1:0.875:64:2:resident --sparsities=0,0.5,0.65,0.999 \
        --out=$OUT/phase_timers.json
CI:   PYTHONPATH=. .venv/bin/python -m experiments.decode.phase_timers --models=tiny \
        --persistent_configs=32:32:32:4:1:0.875:64:1:resident --sparsities=0.5 --reps=1
"""

from __future__ import annotations

import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from wina_jax import checks
from wina_jax import sites as S
from wina_jax.bench.decode_setup import make_sparsifier, site_scores
from wina_jax.bench.shapes import SHAPES
from wina_jax.decode import fuse_projections
from wina_jax.kernels import grid_sync
from wina_jax.kernels import persistent_config as PC
from wina_jax.kernels import persistent_layer as PL
from wina_jax.model import embed_tokens
from wina_jax.testing import random_params


def one_launch(spec: str):
  """Why the tiling `spec` cannot be timed here (split true: one launch per phase, no waits to time), or None."""
  return "has split true: the timers run inside one launch" if PC.parse_config(spec).split else None


common.check(
  flags.DEFINE_list("models", ["llama3_8b"], "model shapes (wina_jax.bench.shapes.SHAPES)"),
  checks.each(checks.one_of(tuple(SHAPES)), str),
)
common.check(
  flags.DEFINE_list(
    "persistent_configs",
    ["128:128:128:4:1:0.875:64:2:resident"],
    "persistent_config.parse_config specs (split false: the timers run inside one launch)",
  ),
  checks.each(lambda spec: checks.parses(PC.parse_config)(spec) or one_launch(spec), str),
)
flags.DEFINE_enum("method", "teal", ["teal", "wina"], "scores: |x| (TEAL) or |x| * column norm (WINA)")
common.sparsities_flag(["0", "0.5", "0.65", "0.999"])
common.check(
  flags.DEFINE_integer("length", 32, "the step's position (calibration tokens: this many)"), checks.count()
)
common.check(flags.DEFINE_integer("slots", 512, "KV cache slots"), checks.count())
common.check(
  flags.DEFINE_integer("reps", 5, "timed launches per row (median), after one to compile"), checks.count()
)
common.check(flags.DEFINE_string("out", "", "JSON output path"), checks.out_path())
FLAGS = flags.FLAGS


def layer(name: str, key):
  """(fused cfg of one layer, its params, the layer-0 residual h [1, 1, d] at --length, calibration tokens)."""
  cfg0 = SHAPES[name].replace(num_hidden_layers=1, vocab_size=256)
  params, cfg = fuse_projections(random_params(cfg0, key, jnp.bfloat16), cfg0)
  tokens = jax.random.randint(jax.random.fold_in(key, 1), (1, FLAGS.length + 1), 0, cfg.vocab_size)
  return cfg, params, embed_tokens(params, tokens[:, -1:], cfg), tokens[:, :-1]


def row(cfg, params, h, kv, scores, sparsity: float, spec: str, gpu: bool) -> dict:
  sp, kept = make_sparsifier(scores, sparsity, 1, {}, "xla")
  lp, length, counter = params["layers"]["0"], jnp.int32(FLAGS.length), grid_sync.new_counter()
  args = (cfg, lp, h, kv, length, *sp.layer_thresholds(0), counter)
  config = PC.parse_config(spec)
  where = {} if gpu else {"grid": 1, "interpret": True}
  marks = lambda: np.asarray(PL.phase_marks(*args, config=config, **where))
  reps = [PL.phase_times(marks()) for _ in range(FLAGS.reps + 1)][1:]
  grid_sync.check_waits(counter)  # a wait given up would make the marks meaningless
  med = lambda f: float(statistics.median(f(r) for r in reps))
  phases = {
    name: {
      "work_median_us": med(lambda r: np.median(r["work_us"][k])),
      "work_max_us": med(lambda r: np.max(r["work_us"][k])),
      **(
        {"wait_after_median_us": med(lambda r: np.median(r["wait_us"][k]))} if k < len(PL.PHASES) - 1 else {}
      ),
    }
    for k, name in enumerate(PL.PHASES)
  }
  for i, k in enumerate(PL.GEMV_PHASE if gpu else ()):  # GEMV phases: start to the first chunk's input
    phases[PL.PHASES[k]]["prologue_median_us"] = med(lambda r: np.nanmedian(r["prologue_us"][i]))
    phases[PL.PHASES[k]]["prologue_max_us"] = med(lambda r: np.nanmax(r["prologue_us"][i]))
  kept_rows = {S.parse_site(s)[2]: [float(f) for f in v] for s, v in kept.items()}
  last = reps[-1]  # one launch's per-program record, for distributions the medians hide
  per_program = {
    "work_us": np.round(last["work_us"], 2).tolist(),  # [phases][programs]
    "prologue_us": np.round(np.nan_to_num(last["prologue_us"], nan=-1.0), 2).tolist(),  # -1: no tile
  }
  return dict(
    config=spec,
    sparsity=sparsity,
    span_us=med(lambda r: r["span_us"]),
    phases=phases,
    kept=kept_rows,
    last_launch=per_program,
  )


def main(argv):
  declared = common.setup(jnp.bfloat16)
  del argv
  gpu = jax.default_backend() == "gpu"
  if not gpu:
    print(
      "no GPU: interpret mode, one program, no clock (every time reads 0): a smoke run, not a measurement"
    )
  rows = []
  for name in FLAGS.models:
    key = jax.random.PRNGKey(0)
    cfg, params, h, tokens = layer(name, key)
    shape = (1, FLAGS.slots, cfg.num_key_value_heads, cfg.head_dim)
    kv = {
      k: jax.random.normal(jax.random.fold_in(key, 2 + i), shape, jnp.bfloat16) for i, k in enumerate("kv")
    }
    scores = site_scores(params, cfg, tokens, with_scale=FLAGS.method == "wina")
    for spec in FLAGS.persistent_configs:
      for s in FLAGS.sparsities:
        r = dict(model=name, method=FLAGS.method, **row(cfg, params, h, kv, scores, float(s), spec, gpu))
        rows.append(r)
        print(f"{name} {FLAGS.method} {float(s):5.3f} {spec}  span {r['span_us']:7.1f} us")
        for phase, t in r["phases"].items():
          wait = f"  wait after {t['wait_after_median_us']:6.1f}" if "wait_after_median_us" in t else ""
          pro = (
            f"  prologue median {t['prologue_median_us']:5.1f} max {t['prologue_max_us']:5.1f}"
            if "prologue_median_us" in t
            else ""
          )
          print(
            f"    {phase:14s} work median {t['work_median_us']:6.1f}  max {t['work_max_us']:6.1f}{wait}{pro}"
          )
  result = {
    "command": common.command_line("experiments.decode.phase_timers"),
    "device": str(jax.devices()[0].device_kind),
    "interpret": not gpu,
    "jax": jax.__version__,
    "declared_numerics": declared,
    "rows": rows,
  }
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)

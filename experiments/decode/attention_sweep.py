"""Decode attention alone: XLA's ops vs the Pallas kernel's launch shapes, per layer of a decode step.

For each model shape, batch and cache length, times a jitted chain of `--layers` attention calls (each
layer its own bf16 cache, donated; each layer's output is the next one's q, so the calls run in order as
in a decode step): XLA's path (`model.attention_block`: RoPE, two cache writes, masked softmax over every
slot) and `kernels.decode_attention` with every divisor of G = H / K as `heads_per_program` and each
`--num_warps`. Prints microseconds per layer and the best kernel setting per shape.

GPU:  PYTHONPATH=. python3 -m experiments.decode.attention_sweep --out=$OUT/attention_sweep.json
CI:   PYTHONPATH=. .venv/bin/python -m experiments.decode.attention_sweep --tiny
"""

from __future__ import annotations

import json
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import common
from wina_jax import checks
from wina_jax import layers as L
from wina_jax.bench.shapes import SHAPES
from wina_jax.kernels import decode_attention as DA
from wina_jax.model import attention_block

common.check(
  flags.DEFINE_list("models", ["llama3_8b", "qwen25_7b"], "model shapes (wina_jax.bench.shapes.SHAPES)"),
  checks.each(checks.one_of(SHAPES), str, nonempty=True),
)
common.check(flags.DEFINE_list("batches", ["1", "8"], "batch sizes"), checks.each(checks.count(), int))
common.check(
  flags.DEFINE_list("lengths", ["32", "511"], "valid cache slots before the new token"),
  checks.each(checks.count(), int),
)
common.check(flags.DEFINE_integer("slots", 512, "KV cache slots"), checks.count())
common.check(flags.DEFINE_integer("layers", 32, "attention calls chained per timed run"), checks.count())
common.check(
  flags.DEFINE_list("num_warps", ["2", "4"], "Triton warps per program"), checks.each(checks.count(), int)
)
common.check(flags.DEFINE_integer("block_s", 64, "cache slots per kernel loop step"), checks.count())
common.check(flags.DEFINE_integer("reps", 20, "timed runs (median)"), checks.count())
common.check(flags.DEFINE_string("out", "", "write results JSON here"), checks.out_path())
flags.DEFINE_bool("tiny", False, "CPU smoke test: tiny shape, interpret mode, 2 layers, 2 reps")
FLAGS = flags.FLAGS


def chain(cfg, attend, layers):
  """jit(q, k, v, caches, length) running `attend` layer after layer; layer i+1's q is layer i's output."""

  def run(q, k, v, caches, length):
    out = []
    for ck, cv in caches:
      q, ck, cv = attend(q, k, v, ck, cv, length)
      out.append((ck, cv))
    return q, out

  return jax.jit(run, donate_argnums=3)


def xla_attend(cfg):
  """`attention_block`'s XLA path on q, k, v [B, heads, hd] (identity projections) -> (out, k, v)."""

  def attend(q, k, v, ck, cv, length):
    b = q.shape[0]
    proj = {"q_proj": q, "k_proj": k, "v_proj": v}
    o, kv = attention_block(
      cfg,
      jnp.zeros((b, 1, 1), q.dtype),
      lambda name, y: proj[name].reshape(b, 1, -1) if name in proj else y,
      length[None],
      {"k": ck, "v": cv},
      length + 1,
      "xla",
    )
    return o.reshape(q.shape), kv["k"], kv["v"]

  return attend


def kernel_attend(cfg, heads_per_program, num_warps, interpret):
  def attend(q, k, v, ck, cv, length):
    return DA.decode_attention(
      q,
      k,
      v,
      ck,
      cv,
      length,
      L.rope_inv_freq(cfg),
      rotary_dim=cfg.rotary_dim,
      window=cfg.sliding_window,
      block_s=FLAGS.block_s,
      heads_per_program=heads_per_program,
      num_warps=num_warps,
      interpret=interpret,
    )

  return attend


def time_chain(cfg, attend, batch, length, reps) -> float:
  """Median seconds per layer of `--layers` chained calls of `attend`."""
  keys = jax.random.split(jax.random.PRNGKey(batch * 1000 + length), 3)
  h, kh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  q = jax.random.normal(keys[0], (batch, h, hd), jnp.bfloat16)
  k = jax.random.normal(keys[1], (batch, kh, hd), jnp.bfloat16)
  v = jax.random.normal(keys[2], (batch, kh, hd), jnp.bfloat16)
  shape = (batch, FLAGS.slots, kh, hd)
  caches = [
    (jnp.full(shape, 0.5, jnp.bfloat16), jnp.full(shape, -0.5, jnp.bfloat16)) for _ in range(FLAGS.layers)
  ]
  fn = chain(cfg, attend, FLAGS.layers)
  n = jnp.int32(length)
  times = []
  for r in range(reps + 1):
    t0 = time.perf_counter()
    out, caches = fn(q, k, v, caches, n)
    jax.block_until_ready(out)
    if r:
      times.append((time.perf_counter() - t0) / FLAGS.layers)
  return statistics.median(times)


def main(argv):
  declared = common.setup(jnp.bfloat16)  # q, k, v and the caches
  del argv
  interpret = jax.default_backend() != "gpu"
  if FLAGS.tiny:
    FLAGS.models, FLAGS.batches, FLAGS.lengths = ["tiny"], ["1"], ["3"]
    FLAGS.slots, FLAGS.layers, FLAGS.reps, FLAGS.num_warps, FLAGS.block_s = 8, 2, 2, ["4"], 8
  rows = []
  for name in FLAGS.models:
    cfg = SHAPES[name]
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    settings = [("xla", None, None)] + [
      ("pallas", hp, int(w)) for hp in range(1, group + 1) if group % hp == 0 for w in FLAGS.num_warps
    ]
    for batch in [int(b) for b in FLAGS.batches]:
      for length in [int(n) for n in FLAGS.lengths]:
        for impl, hp, warps in settings:
          attend = xla_attend(cfg) if impl == "xla" else kernel_attend(cfg, hp, warps, interpret)
          secs = time_chain(cfg, attend, batch, length, FLAGS.reps)
          row = dict(
            model=name,
            batch=batch,
            length=length,
            impl=impl,
            heads_per_program=hp,
            num_warps=warps,
            programs=None if hp is None else batch * cfg.num_key_value_heads * group // hp,
            us_per_layer=secs * 1e6,
          )
          rows.append(row)
          print(
            f"{name:10s} B={batch} len={length:4d} {impl:6s} hp={hp} warps={warps} "
            f"{secs * 1e6:8.2f} us/layer",
            flush=True,
          )
  best = {}
  for r in rows:
    key = f"{r['model']}/B{r['batch']}/len{r['length']}"
    xla = next(
      x for x in rows if x["impl"] == "xla" and f"{x['model']}/B{x['batch']}/len{x['length']}" == key
    )
    if r["impl"] == "pallas" and (key not in best or r["us_per_layer"] < best[key]["us_per_layer"]):
      best[key] = {**r, "x_over_xla": xla["us_per_layer"] / r["us_per_layer"]}
  for key, r in best.items():
    print(f"best {key}: hp={r['heads_per_program']} warps={r['num_warps']} {r['x_over_xla']:.2f}x XLA")
  if FLAGS.out:
    result = {
      "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
      "jax": jax.__version__,
      "device": str(jax.devices()[0].device_kind),
      "flags": {f: getattr(FLAGS, f) for f in ("slots", "layers", "block_s", "reps")},
      "declared_numerics": declared,
      "rows": rows,
      "best": best,
    }
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)

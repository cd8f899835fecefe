"""Seconds to trace and to lower (for CUDA) one decode step loop of a model shape with abstract weights: the
host-side part of every benchmark row's compile, which grows with the layers when each layer's kernels lower
on their own. Also one decode step's glue (`bench.glue.glue_ops`: the ops outside its kernels, a CPU-side
proxy for the XLA fusions between them) and, from the two smallest layer counts, its glue and kernels per
layer. Nothing runs and no weights are made, so it works on a CPU-only machine: there the GPU paths are taken
by reporting the backend as 'gpu' while tracing (--as_gpu, the default off a GPU).

CPU:  PYTHONPATH=. .venv/bin/python -m experiments.decode.lower_cost --backend=mosaic --layers=1,4,32
      PYTHONPATH=. .venv/bin/python -m experiments.decode.lower_cost --backend=mosaic --mosaic_mode=mlp --layers=32
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import common
from wina_jax import checks
from wina_jax import sites as S
from wina_jax.bench.decode_setup import MOSAIC_MODES, abstract_fused_params, on_mosaic
from wina_jax.bench.glue import glue_ops
from wina_jax.bench.shapes import SHAPES
from wina_jax.decode import decode_loop, decode_step, fuse_state, init_cache
from wina_jax.kernels import FusedThresholdSparsifier
from wina_jax.kernels import mosaic_gemv as mg

common.check(flags.DEFINE_string("model", "llama3_8b", "model shape"), checks.one_of(SHAPES))
common.check(
  flags.DEFINE_list("layers", ["1", "4", "32"], "decoder layers to lower"),
  checks.each(checks.count(), int, nonempty=True),
)
flags.DEFINE_enum("backend", "mosaic", ["mosaic", "pallas", "xla"], "FusedThresholdSparsifier backend")
common.check(
  flags.DEFINE_string("mosaic_config", "64:256:3:0:132:cp_async:kernel", "mosaic_gemv.parse spec"),
  checks.parses(mg.parse),
)
flags.DEFINE_enum(
  "mosaic_mode", "", list(MOSAIC_MODES), "backend mosaic: '' | fold | mlp22 | mlp (on_mosaic)"
)
flags.DEFINE_bool("as_gpu", None, "take the GPU paths while tracing (default: when no GPU is present)")
FLAGS = flags.FLAGS


def abstract_step(cfg0):
  """(abstract bf16 fused params, their config, an abstract batch-1 cache of 32 slots) for cfg0."""
  params, cfg = abstract_fused_params(cfg0)
  return params, cfg, jax.eval_shape(lambda: init_cache(cfg, 1, 32, jnp.bfloat16))


def lower_seconds(params, cfg, cache, sp) -> tuple[float, float]:
  """(trace, lower) seconds of `decode_loop` over 8 tokens (Pallas attention) with `abstract_step`'s inputs."""
  t0 = time.perf_counter()
  traced = decode_loop.trace(
    params, jax.ShapeDtypeStruct((1, 8), jnp.int32), cache, sp, cfg=cfg, attention="pallas"
  )
  t1 = time.perf_counter()
  traced.lower(lowering_platforms=("cuda",))
  return t1 - t0, time.perf_counter() - t1


def step_glue(params, cfg, cache, sp):
  """`glue.glue_ops` of one `decode_step` (Pallas attention) with `abstract_step`'s inputs."""
  step = lambda p, t, c: decode_step(p, t, c, sp, cfg=cfg, attention="pallas")
  return glue_ops(step, params, jax.ShapeDtypeStruct((1,), jnp.int32), cache)


def sparsifier(cfg0):
  ft, fs, segs = fuse_state({s: jnp.float32(0.3) for s in S.linear_sites(cfg0)}, {}, cfg0)
  sp = FusedThresholdSparsifier.create(ft, fs, segs, backend=FLAGS.backend)
  if FLAGS.backend == "mosaic":
    sp = on_mosaic(sp, FLAGS.mosaic_config, FLAGS.mosaic_mode)
  return sp


def main(argv):
  del argv
  as_gpu = jax.default_backend() != "gpu" if FLAGS.as_gpu is None else FLAGS.as_gpu
  if as_gpu:
    jax.default_backend = lambda: "gpu"
  label = f"backend={FLAGS.backend}{' +' * bool(FLAGS.mosaic_mode)}{FLAGS.mosaic_mode}"
  glue = {}
  for layers in FLAGS.layers:
    cfg0 = dataclasses.replace(SHAPES[FLAGS.model], num_hidden_layers=int(layers))
    jax.clear_caches()
    inputs = (*abstract_step(cfg0), sparsifier(cfg0))
    trace_s, lower_s = lower_seconds(*inputs)
    glue[int(layers)] = step_glue(*inputs)
    ops = sum(glue[int(layers)].values()) - glue[int(layers)]["KERNEL"]
    print(
      f"{FLAGS.model} layers={layers} {label}: trace {trace_s:.1f} s, lower {lower_s:.1f} s, step glue ops "
      f"{ops}, kernels {glue[int(layers)]['KERNEL']} (jax {jax.__version__})",
      flush=True,
    )
  if len(glue) > 1:
    (a, ga), (b, gb) = sorted(glue.items())[:2]
    per = {k: (gb[k] - ga[k]) / (b - a) for k in sorted(gb) if gb[k] != ga[k]}
    print(f"{FLAGS.model} {label} per layer: {per}", flush=True)


if __name__ == "__main__":
  app.run(main)

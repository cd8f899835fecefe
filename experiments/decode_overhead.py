"""Probe of fixed per-step overhead: dense and TEAL-50% decode steps of one model, with the compiled
module's kernel count (fusions, custom calls, command buffers). Run once per XLA_FLAGS setting.

GPU:  XLA_FLAGS=... PYTHONPATH=. python3 -m experiments.decode_overhead --configs=benchmarks/results/kernel_sweep_h200.json
"""
from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import bench_decode as B
from experiments.decode_models import SHAPES, random_params
from wina_jax.decode import decode_step, fuse_projections
from wina_jax.model import init_cache

flags.DEFINE_string("model", "llama3_8b", "model shape")
FLAGS = flags.FLAGS


def kernel_counts(params, cfg, sp, tokens) -> dict:
  cache = init_cache(cfg, tokens.shape[0], FLAGS.max_len, jnp.bfloat16)
  text = decode_step.lower(params, tokens[:, 0], cache, sp, cfg=cfg).compile().as_text()
  entry = text[text.rfind("ENTRY"):]
  return {k: len(re.findall(p, entry)) for k, p in
          (("fusion", r"= [^=]*? fusion\("), ("custom_call", r"custom-call\("), ("command_buffer", r"command_buffer"),
           ("call", r" call\("))}


def main(argv):
  del argv
  cfg0 = SHAPES[FLAGS.model]
  params, cfg = fuse_projections(random_params(cfg0, jax.random.PRNGKey(0)), cfg0)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, FLAGS.steps), 0, cfg.vocab_size)
  configs = B.load_configs(FLAGS.configs)
  scores = B.site_scores(params, cfg, tokens, with_scale=False)
  dense = B.time_decode(params, cfg, None, tokens[:1], FLAGS.max_len, FLAGS.reps)
  out = {"flags": os.environ.get("XLA_FLAGS", ""), "dense_ms": dense * 1e3}
  for b in (1, 2):
    sp, _ = B.make_sparsifier(scores, 0.5, b, configs, "auto")
    out[f"teal50_b{b}_ms"] = B.time_decode(params, cfg, sp, tokens[:b], FLAGS.max_len, FLAGS.reps) * 1e3
  sp, _ = B.make_sparsifier(scores, 0.5, 1, configs, "auto")
  out["kernels_dense"] = kernel_counts(params, cfg, None, tokens[:1])
  out["kernels_teal"] = kernel_counts(params, cfg, sp, tokens[:1])
  print("PROBE", out)


if __name__ == "__main__":
  app.run(main)

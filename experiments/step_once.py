"""Run a few batch-1 decode steps of one random-weight model and variant, for an external profiler.

Nsight Compute times each sparse kernel of the third step in place (two warm-up steps, 4 sparse sites
per layer; --launch-skip = 2 * 4 * layers):
  ncu --clock-control none --csv --metrics gpu__time_duration.sum -k regex:sparse_gemv \
      --launch-skip 256 --launch-count 128 \
      python3 -m experiments.step_once --configs=benchmarks/results/kernel_sweep_h200_b.json
CPU smoke test:  .venv/bin/python -m experiments.step_once --model=tiny --steps=2 --max_len=16
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import bench_decode as B
from experiments.decode_models import SHAPES, random_params
from wina_jax.decode import decode_step, fuse_projections
from wina_jax.model import init_cache

flags.DEFINE_string("model", "llama3_8b", "model shape (experiments.decode_models.SHAPES)")
flags.DEFINE_string("method", "teal", "'dense', 'teal' or 'wina'")
flags.DEFINE_float("sparsity", 0.5, "target sparsity (thresholds as in experiments.bench_decode)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cfg0 = SHAPES[FLAGS.model]
  params, cfg = fuse_projections(random_params(cfg0, jax.random.PRNGKey(0)), cfg0)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 32), 0, cfg.vocab_size)
  sp = None
  if FLAGS.method != "dense":
    scores = B.site_scores(params, cfg, tokens, with_scale=FLAGS.method == "wina")
    backend = "auto" if jax.default_backend() == "gpu" else "xla"
    sp, _ = B.make_sparsifier(scores, FLAGS.sparsity, 1, B.load_configs(FLAGS.configs, FLAGS.reduce), backend)
    del scores
  cache = init_cache(cfg, 1, FLAGS.max_len, jnp.bfloat16)
  for j in range(FLAGS.steps):
    t0 = time.perf_counter()
    _, _, cache = decode_step(params, tokens[:, j], cache, sp, cfg=cfg)
    jax.block_until_ready(cache)
    print(f"step {j}: {(time.perf_counter() - t0) * 1e3:.3f} ms", flush=True)


if __name__ == "__main__":
  flags.FLAGS.set_default("steps", 3)
  app.run(main)

"""Is a logits gap between the Pallas and XLA decode paths a kernel error or the model's sensitivity?

For Llama-3-8B shapes with random weights: logits of one decode step through the Pallas kernel vs the
XLA mask-then-matmul path, for 2 and 32 layers, at 0% (every row kept: only summation order differs)
and at 50% TEAL (where a 1-ulp difference in a site's input can also flip its mask bit).

GPU:  PYTHONPATH=. python3 -m experiments.check_decode
"""
from __future__ import annotations

import jax
from absl import app

from experiments import bench_decode as B
from experiments.decode_models import SHAPES, random_params
from wina_jax.decode import fuse_projections


def main(argv):
  del argv
  for layers in (2, 32):
    cfg0 = SHAPES["llama3_8b"].replace(num_hidden_layers=layers)
    params, cfg = fuse_projections(random_params(cfg0, jax.random.PRNGKey(0)), cfg0)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 16), 0, cfg.vocab_size)
    scores = B.site_scores(params, cfg, tokens, False)
    for sparsity in (0.0, 0.5):
      sp, _ = B.make_sparsifier(scores, sparsity, 1, {}, "auto")
      print(f"CHECK layers={layers} sparsity={sparsity} pallas_vs_xla="
            f"{B.check_against_xla(params, cfg, sp, tokens, 64)}", flush=True)


if __name__ == "__main__":
  app.run(main)

"""`experiments.decode.check_decode`: the Pallas decode path (interpret mode on CPU) against the XLA path,
and the model's own response to a one-ulp input change."""

import jax

from wina_jax.bench import decode_setup as B
from wina_jax.bench.shapes import SHAPES
from wina_jax.decode import fuse_projections
from wina_jax.testing import random_params


def setup():
  cfg0 = SHAPES["tiny"].replace(num_hidden_layers=4)
  params, cfg = fuse_projections(random_params(cfg0, 0), cfg0)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 6), 0, cfg.vocab_size)
  return params, cfg, tokens, B.site_scores(params, cfg, tokens, False)


def test_ulp_sensitivity_grows_with_sparsity():
  params, cfg, tokens, scores = setup()
  dense = B.ulp_sensitivity(params, cfg, B.make_sparsifier(scores, 0.0, 1, {}, "xla")[0], tokens, 16)
  sparse = B.ulp_sensitivity(params, cfg, B.make_sparsifier(scores, 0.5, 1, {}, "xla")[0], tokens, 16)
  assert 0 < dense["rel_err"] < 0.05  # about one ulp of input moves the logits a little
  assert sparse["rel_err"] > dense["rel_err"]  # and flipped mask bits move them more


def test_pallas_step_matches_xla_within_the_models_own_sensitivity():
  """The Pallas kernels (interpret mode) and the XLA mask-then-matmul path are different code: at 0 %
  they differ only in summation order, at 50 % also in mask bits flipped by it; both gaps stay within
  what one ulp of input does to the model."""
  params, cfg, tokens, scores = setup()
  for sparsity in (0.0, 0.5):
    sp = B.make_sparsifier(scores, sparsity, 1, {}, "interpret")[0]
    got = B.check_against_xla(params, cfg, sp, tokens, 16)
    assert got["same_token"] and got["rel_err"] <= B.ulp_sensitivity(params, cfg, sp, tokens, 16)["rel_err"]


def test_script_checks_the_mosaic_path_on_the_cpu():
  """--mosaic (with --mosaic_mode=mlp) checks backend 'mosaic' (its jnp contracts off the GPU) against the XLA
  path; --mosaic_mode alone is refused."""
  import subprocess
  import sys

  cmd = [
    sys.executable,
    "-m",
    "experiments.decode.check_decode",
    "--model=tiny",
    "--layers=2",
    "--mosaic_mode=mlp",
  ]
  done = subprocess.run(
    cmd + ["--mosaic=64:64:2:0:4:cp_async:kernel"], capture_output=True, text=True, check=True
  )
  checks = [line for line in done.stdout.splitlines() if line.startswith("CHECK")]
  assert len(checks) == 2 and all("backend=mosaic+mlp" in c and "'same_token': True" in c for c in checks)
  refused = subprocess.run(cmd, capture_output=True, text=True)
  assert refused.returncode != 0 and "give --mosaic=TILING too" in refused.stderr

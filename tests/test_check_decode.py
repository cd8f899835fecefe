"""`experiments.decode.check_decode.ulp_sensitivity`: the model's own response to a one-ulp input change."""
import jax

from experiments.decode.check_decode import ulp_sensitivity
from wina_jax.bench import decode_setup as B
from wina_jax.bench.shapes import SHAPES
from wina_jax.decode import fuse_projections
from wina_jax.testing import random_params


def test_ulp_sensitivity_grows_with_sparsity_and_is_zero_without_a_change():
  cfg0 = SHAPES["tiny"].replace(num_hidden_layers=4)
  params, cfg = fuse_projections(random_params(cfg0, 0), cfg0)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 6), 0, cfg.vocab_size)
  scores = B.site_scores(params, cfg, tokens, False)
  dense = ulp_sensitivity(params, cfg, B.make_sparsifier(scores, 0.0, 1, {}, "xla")[0], tokens, 16)
  sparse = ulp_sensitivity(params, cfg, B.make_sparsifier(scores, 0.5, 1, {}, "xla")[0], tokens, 16)
  assert 0 < dense["rel_err"] < 0.05            # about one ulp of input moves the logits a little
  assert sparse["rel_err"] > dense["rel_err"]   # and flipped mask bits move them more
  assert B.check_against_xla(params, cfg, B.make_sparsifier(scores, 0.5, 1, {}, "xla")[0], tokens, 16)[
      "rel_err"] == 0.0                         # the same path twice: no difference at all

"""Top-k masks by value (`sparsity.select`): identical to lax.top_k's, ties to the lower index, k as data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model

from wina_jax import model as M
from wina_jax import sparsity
from wina_jax.convert import from_transformers
from wina_jax.sparsity import select

IMPLS = ["sort", "radix", "radix:2", "radix:64"]


def lax_mask(score, k):
  return np.asarray(select.topk_mask(score, k, "lax"))


@pytest.mark.parametrize("skip_ties", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
def test_masks_equal_lax_top_k_on_random_and_tied_scores(impl, skip_ties):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, 300)).astype(np.float32)
  tied = np.round(x * 4) / 4  # many exact ties, some straddling the k-th value
  signed = x * 1e-30  # tiny and negative scores, and -0.0 next to 0.0
  signed[:, :5] = -0.0
  signed[:, 5:10] = 0.0
  for score in (np.abs(x), np.abs(tied), signed, np.zeros_like(x)):
    for k in (1, 7, 150, 299, 300):
      got = np.asarray(jax.jit(lambda s, k: select.topk_mask(s, k, impl, skip_ties=skip_ties))(score, k))
      np.testing.assert_array_equal(got, lax_mask(jnp.asarray(score), k), err_msg=f"{impl} k={k}")
      assert (got.sum(-1) == k).all()


def test_tie_rule_is_lower_index_first_and_k_per_row():
  score = jnp.asarray([[1.0, 2.0, 2.0, 2.0, 0.5], [3.0, 3.0, 3.0, 3.0, 3.0]])
  for impl in IMPLS:
    got = np.asarray(select.topk_mask(score, jnp.asarray([2, 3]), impl))
    np.testing.assert_array_equal(got, [[0, 1, 1, 0, 0], [1, 1, 1, 0, 0]])


def test_bad_impl_and_static_only_lax():
  with pytest.raises(ValueError, match="unknown top-k impl"):
    select.topk_mask(jnp.ones((2, 4)), 1, "heap")
  with pytest.raises(TypeError, match="Python int k"):
    select.topk_mask(jnp.ones((2, 4)), jnp.asarray(1), "lax")
  with pytest.raises(ValueError, match="power of two"):
    select.topk_mask(jnp.ones((2, 4)), 1, "radix:3")


@pytest.fixture(scope="module")
def tiny_llama():
  return from_transformers(make_hf_model("llama_gqa_tied"))


def test_one_trace_serves_every_sparsity_and_allocation(tiny_llama):
  """k is data: a jitted forward traces once for 25 / 50 / 65 % and a per-site (greedy-like) allocation,
  and its top-k logits equal those of a fresh trace at each level."""
  params, cfg = tiny_llama
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
  traces = []

  @jax.jit
  def logits(p, sp):
    traces.append(1)
    return M.forward(p, tokens, cfg, sp).logits

  sites = sparsity.get_method("wina").sites(cfg)
  levels = [0.25, 0.5, 0.65, {s: 0.2 + 0.6 * (i % 3) / 2 for i, s in enumerate(sites)}]
  for s in levels:
    sp = sparsity.make("wina", params, cfg, s)
    got = logits(params, sp)
    fresh = jax.jit(lambda p, sp: M.forward(p, tokens, cfg, sp).logits)(params, sp)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(fresh))
  assert len(traces) == 1
  dense = M.forward(params, tokens, cfg).logits
  assert not np.allclose(np.asarray(got), np.asarray(dense), atol=1e-3)  # really sparse


def test_impl_problem_names_what_is_wrong():
  """The impl names scripts accept (`--topk_impl`, bench_loop's `--impls`), refused before anything runs."""
  for ok in ("radix", "radix:2", "radix:64", "sort", "lax"):
    assert select.impl_problem(ok) is None
  assert "static k" in select.impl_problem("lax", traced_k=True)
  assert "power of two" in select.impl_problem("radix:3")
  assert "radix:F" in select.impl_problem("sort:4")
  assert "choose from" in select.impl_problem("heap")
  with pytest.raises(ValueError, match="'radix:0'.*power of two"):
    select.set_default_impl("radix:0")

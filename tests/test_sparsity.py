"""Sparsifiers: identity at sparsity 0, exact top-k, WINA vs TEAL, Lemma 3.1, registry and bad input."""

import dataclasses
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model
from hypothesis import given, settings
from hypothesis import strategies as st

from wina_jax import sites as S
from wina_jax import sparsity as sp
from wina_jax.convert import from_transformers
from wina_jax.model import forward, jit_forward


@pytest.fixture(scope="module")
def tiny():
  return from_transformers(make_hf_model("llama_gqa_tied"))


@pytest.fixture(scope="module")
def phi3():
  return from_transformers(make_hf_model("phi3_fused"))


def _tokens(cfg, rng, b=2, t=16):
  return jnp.asarray(rng.randint(0, cfg.vocab_size, (b, t)))


@pytest.mark.parametrize("name", ["dense", "teal", "wina", "cats"])
@pytest.mark.parametrize("model", ["tiny", "phi3"])
def test_sparsity_zero_is_identity(name, model, request, rng):
  params, cfg = request.getfixturevalue(model)
  tokens = _tokens(cfg, rng)
  ref = forward(params, tokens, cfg)
  out = forward(params, tokens, cfg, sp.make(name, params, cfg, 0.0), collect=("inputs",))
  np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(ref.logits))
  s0 = sp.make(name, params, cfg, 0.0)
  for site, x in out.aux["inputs"].items():
    np.testing.assert_array_equal(np.asarray(s0(site, x, None)), np.asarray(x))


def _unit_rows(params, cfg):
  """Params whose every site kernel has rows of l2 norm 1 (WINA's c = 1)."""
  params = jax.tree_util.tree_map(lambda a: a, params)
  for site in S.linear_sites(cfg):
    layer, block, proj = S.parse_site(site)
    k = params["layers"][str(layer)][block][proj]["kernel"]
    params["layers"][str(layer)][block][proj]["kernel"] = k / jnp.linalg.norm(k, axis=1, keepdims=True)
  return params


@pytest.mark.parametrize("c_sites", ["official", "all"])
def test_wina_with_unit_column_norms_is_teal(tiny, rng, c_sites):
  params, cfg = tiny
  params = _unit_rows(params, cfg)
  tokens = _tokens(cfg, rng)
  wina = sp.make("wina", params, cfg, 0.6, c_sites=c_sites)
  np.testing.assert_allclose(np.concatenate([np.asarray(v) for v in wina.state.values()]), 1.0, atol=1e-6)
  wina = wina.replace(state={k: jnp.ones_like(v) for k, v in wina.state.items()})  # c exactly 1
  teal = sp.make("teal", params, cfg, 0.6)
  a = forward(params, tokens, cfg, wina, collect=("inputs",))
  b = forward(params, tokens, cfg, teal)
  np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))
  for site, x in a.aux["inputs"].items():
    np.testing.assert_array_equal(np.asarray(wina.mask(site, x)), np.asarray(teal.mask(site, x)))


def test_wina_scores_with_column_norms(tiny, rng):
  params, cfg = tiny
  wina = sp.make("wina", params, cfg, 0.5, c_sites="all")
  site = "layers.1.mlp.down_proj"
  c = np.linalg.norm(np.asarray(S.site_kernel(params, site)), axis=1)
  x = jnp.asarray(rng.randn(3, 5, c.size).astype(np.float32))
  np.testing.assert_allclose(np.asarray(wina.score(site, x)), np.abs(np.asarray(x)) * c, rtol=1e-6)
  official = sp.make("wina", params, cfg, 0.5)
  assert sorted(official.state) == [
    "layers.0.mlp.gate_proj",
    "layers.0.self_attn.k_proj",
    "layers.1.mlp.gate_proj",
    "layers.1.self_attn.k_proj",
  ]


@pytest.mark.parametrize("name", ["teal", "wina", "cats"])
@pytest.mark.parametrize("s", [0.1, 0.75])
def test_topk_hits_target_exactly_per_token(tiny, rng, name, s):
  params, cfg = tiny
  spars = sp.make(name, params, cfg, s)
  out = forward(params, _tokens(cfg, rng), cfg, spars, collect=("inputs",))
  for site in spars.method.sites(cfg):
    x = out.aux["inputs"][site]
    d = x.shape[-1]
    k = sp.keep_count(s, d)
    xs = np.asarray(spars(site, x, None))
    assert (np.count_nonzero(xs, axis=-1) == k).all(), site
    score = np.asarray(spars.score(site, x))
    kept = np.where(xs != 0, score, np.inf).min(-1)
    dropped = np.where(xs == 0, score, -np.inf).max(-1)
    assert (kept >= dropped).all()  # the kept entries are the k highest scores


def test_topk_exact_with_ties():
  x = jnp.asarray(np.repeat([[1.0, 1.0, 1.0, 1.0, 2.0, 0.5]], 4, axis=0), jnp.float32)
  assert (np.asarray(sp.topk_mask(jnp.abs(x), 3)).sum(-1) == 3).all()


def test_cats_masks_only_the_activation(tiny, rng):
  params, cfg = tiny
  out = forward(params, _tokens(cfg, rng), cfg, sp.make("cats", params, cfg, 0.5), collect=("zero_frac",))
  zf = {k: float(v) for k, v in out.aux["zero_frac"].items()}
  for l in range(cfg.num_hidden_layers):
    assert zf[f"layers.{l}.mlp.act"] == pytest.approx(0.5)
    assert zf[f"layers.{l}.mlp.down_proj"] >= 0.5
    assert zf[f"layers.{l}.mlp.gate_proj"] == 0 and zf[f"layers.{l}.self_attn.q_proj"] == 0
  counts = sp.site_weights(cfg)
  total = sum(S.site_param_counts(cfg).values())
  want = sum(0.5 * counts[s] for s in S.act_sites(cfg)) / total
  assert sp.parameter_weighted_sparsity(zf, cfg) == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("model", ["tiny", "phi3"])
def test_measured_sparsity_of_uniform_topk(model, request, rng):
  params, cfg = request.getfixturevalue(model)
  spars = sp.make("wina", params, cfg, 0.5, c_sites="all")
  out = forward(params, _tokens(cfg, rng), cfg, spars, collect=("zero_frac",))
  assert set(spars.method.sites(cfg)) <= set(out.aux["zero_frac"])
  assert sp.parameter_weighted_sparsity(out.aux["zero_frac"], cfg) == pytest.approx(0.5, abs=1e-6)


def _column_orthogonal(rng, n, d_out, c):
  """kernel [n, d_out] = diag(c) Q with orthonormal rows: W = kernel.T has orthogonal columns."""
  q, _ = np.linalg.qr(rng.randn(d_out, n))
  return (c[:, None] * q.T).astype(np.float64)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 8), extra=st.integers(0, 4), data=st.data())
def test_lemma_3_1_wina_mask_is_optimal_for_column_orthogonal_weights(n, extra, data):
  seed = data.draw(st.integers(0, 2**31 - 1))
  k = data.draw(st.integers(1, n - 1))
  rng = np.random.RandomState(seed)
  c = rng.uniform(0.1, 3.0, n)
  kernel = _column_orthogonal(rng, n, n + extra, c)
  x = rng.randn(n)
  err = lambda m: np.linalg.norm(x @ kernel - (m * x) @ kernel)
  brute = min(err(np.isin(np.arange(n), keep)) for keep in itertools.combinations(range(n), k))
  wina = sp.get_method("wina", c_sites="all")
  score = wina.score(
    "layers.0.mlp.down_proj", jnp.asarray(x, jnp.float32), sp.column_norms(jnp.asarray(kernel, jnp.float32))
  )
  m = np.asarray(sp.topk_mask(score[None], k))[0]
  assert m.sum() == k
  assert err(m) <= brute + 1e-6 * (1 + brute)
  np.testing.assert_allclose(err(m) ** 2, np.sum((x**2 * c**2)[~m]), rtol=1e-6, atol=1e-9)


def test_no_retrace_across_calls(tiny, rng):
  params, cfg = tiny
  calls = 0

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(params, tokens, spars):
    return forward(params, tokens, cfg, spars).logits

  spars = sp.make("wina", params, cfg, 0.5)
  for seed in range(3):  # new tokens and new column norms (e.g. transformed params) reuse the trace
    state = {k: v * (1 + seed) for k, v in spars.state.items()}
    run(params, _tokens(cfg, np.random.RandomState(seed)), spars.replace(state=state))
    calls += 1
  assert calls == 3


def test_jit_forward_matches_forward(tiny, rng):
  params, cfg = tiny
  tokens = _tokens(cfg, rng)
  spars = sp.make("teal", params, cfg, 0.4)
  a = jit_forward(params, tokens, cfg, spars, collect=("zero_frac",))
  b = forward(params, tokens, cfg, spars)
  np.testing.assert_allclose(np.asarray(a.logits), np.asarray(b.logits), atol=1e-4)
  assert sp.parameter_weighted_sparsity(a.aux["zero_frac"], cfg) == pytest.approx(0.4, abs=0.01)


def test_dense_prefix_policy(tiny, rng):
  params, cfg = tiny
  assert sp.resolve_prefill("all", 100) is None
  assert sp.resolve_prefill("last_fraction:0.99", 100) == 1
  assert sp.resolve_prefill("last_fraction:1", 100) == 0
  assert sp.resolve_prefill("dense_prefix:7", 100) == 7
  for bad in ("some", "last_fraction:0", "last_fraction:1.5", "dense_prefix:-1", "all:3"):
    with pytest.raises(ValueError, match="prefill policy"):
      sp.resolve_prefill(bad, 100)
  tokens = _tokens(cfg, rng)
  n = sp.resolve_prefill("last_fraction:0.5", tokens.shape[1])
  a = forward(params, tokens, cfg, sp.make("teal", params, cfg, 0.7), dense_prefix=n)
  ref = forward(params, tokens, cfg)
  np.testing.assert_array_equal(np.asarray(a.logits[:, :n]), np.asarray(ref.logits[:, :n]))
  assert np.abs(np.asarray(a.logits[:, n:] - ref.logits[:, n:])).max() > 1e-3


def test_registry_adds_a_method_in_one_place(tiny, rng):
  params, cfg = tiny

  @sp.register("test_square")
  @dataclasses.dataclass(frozen=True)
  class Square(sp.Method):
    def score(self, site, x, state):
      return x * x

  assert "test_square" in sp.known_methods()
  a = forward(params, _tokens(cfg, rng), cfg, sp.make("test_square", params, cfg, 0.5))
  b = forward(params, _tokens(cfg, np.random.RandomState(0)), cfg, sp.make("teal", params, cfg, 0.5))
  np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))  # x^2 ranks like |x|
  with pytest.raises(ValueError, match="already registered"):
    sp.register("teal")(Square)


def test_bad_inputs(tiny):
  params, cfg = tiny
  for bad in (-0.1, 1.0, 1.5):
    with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
      sp.make("teal", params, cfg, bad)
  with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
    sp.make("teal", params, cfg, {"layers.0.mlp.up_proj": 1.0})
  with pytest.raises(ValueError, match="unknown sparsification method 'tael'.*'teal'"):
    sp.make("tael", params, cfg, 0.5)
  with pytest.raises(ValueError, match="no setting"):
    sp.make("teal", params, cfg, 0.5, c_sites="all")
  with pytest.raises(ValueError, match="c_sites"):
    sp.make("wina", params, cfg, 0.5, c_sites="some")
  with pytest.raises(ValueError, match="unknown mode"):
    sp.make("teal", params, cfg, 0.5, mode="random")
  with pytest.raises(ValueError, match="needs calibration"):
    sp.make("teal", params, cfg, 0.5, mode="threshold")
  with pytest.raises(ValueError, match="does not mask"):
    sp.make("cats", params, cfg, {"layers.0.mlp.up_proj": 0.5})

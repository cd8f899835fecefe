"""The `wina_jax.nn` Flax modules against the functional `wina_jax.model.forward`: init shapes, bit-identical
logits (every tiny family and SmolLM2, dense and TEAL / WINA in both modes), no retrace under
`jax.jit(model.apply)`, cached decode, submodules on their own, transform + calibration on init params.

  .venv/bin/python -m pytest -q -p no:xdist tests/test_modules.py
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_CONFIGS, make_hf_model
from flax import traverse_util

from wina_jax import model as M
from wina_jax import nn as wnn
from wina_jax import sharding
from wina_jax import sparsity as sp
from wina_jax.convert import from_transformers
from wina_jax.convert.load import expected_shapes
from wina_jax.transform import transform

KEY = jax.random.PRNGKey(0)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request):
  return from_transformers(make_hf_model(request.param))


def _tokens(cfg, b=2, t=12, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, cfg.vocab_size, (b, t)), jnp.int32)


def _abstract_init(cfg, **kw):
  """model.init's params as shapes and dtypes (`jax.eval_shape`: nothing computed)."""
  init = functools.partial(wnn.CausalLM(cfg, **kw).init, KEY, jnp.zeros((1, 1), jnp.int32))
  return jax.eval_shape(init)["params"]


def _median_thresholds(name, params, cfg, tokens):
  """A threshold-mode sparsifier for `name` zeroing about half of every site's dense-model scores."""
  method = sp.get_method(name)
  state = method.state(params, cfg)
  inputs = M.forward(params, tokens, cfg, collect=("inputs",)).aux["inputs"]
  thresholds = {s: jnp.median(method.score(s, inputs[s], state.get(s))) for s in method.sites(cfg)}
  return sp.ScoreSparsifier(method=method, mode="threshold", thresholds=thresholds, state=state)


def _sparsifiers(params, cfg, tokens):
  out = {"dense": None}
  for name in ("teal", "wina"):
    out[f"{name}_topk"] = sp.make(name, params, cfg, 0.5)
    out[f"{name}_threshold"] = _median_thresholds(name, params, cfg, tokens)
  return out


def _both(params, cfg, tokens, sparsifier, collect=(), jit=False):
  """(module, functional) outputs: both eager (op by op), or each under its own jit."""
  kw = {} if sparsifier is None else {"sparsifier": sparsifier}
  apply = wnn.CausalLM(cfg).apply
  fwd = M.jit_forward if jit else M.forward
  if jit:
    apply = jax.jit(apply, static_argnames="collect")
  mod = apply({"params": params}, tokens, collect=collect, **kw)
  return mod, fwd(params, tokens, cfg, **kw, collect=collect)


def _assert_same(mod, fun, what=""):
  assert jax.tree_util.tree_structure(mod.aux) == jax.tree_util.tree_structure(fun.aux), what
  leaves = lambda out: jax.tree_util.tree_leaves((out.logits, out.aux))
  for a, b in zip(leaves(mod), leaves(fun)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=what)


def test_init_tree_is_expected_shapes(tiny):
  params, cfg = tiny
  init = _abstract_init(cfg)
  flat = {k: v.shape for k, v in traverse_util.flatten_dict(init, sep="/").items()}
  assert flat == expected_shapes(cfg)
  assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(params)
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(init))
  mesh = sharding.make_mesh("model:-1")  # partition rules see the same tree
  assert sharding.param_specs(init, cfg, mesh) == sharding.param_specs(params, cfg, mesh)
  bf16 = _abstract_init(cfg, param_dtype=jnp.bfloat16)
  assert all(v.dtype == jnp.bfloat16 for v in jax.tree_util.tree_leaves(bf16))


def test_apply_is_bit_identical_to_forward(tiny):
  """Eager for dense, TEAL and WINA in both modes (with every collectable); under jit for a traced one."""
  params, cfg = tiny
  tokens = _tokens(cfg)
  sparsifiers = _sparsifiers(params, cfg, tokens)
  dense = None
  for name, sparsifier in sparsifiers.items():
    mod, fun = _both(params, cfg, tokens, sparsifier, collect=M.COLLECTABLE)
    _assert_same(mod, fun, name)
    if sparsifier is None:
      dense = mod.logits
    else:  # the sparsifier really masks: logits move and about half the site inputs are zero
      assert not np.allclose(np.asarray(mod.logits), np.asarray(dense), atol=1e-3), name
      fracs = np.asarray(list(mod.aux["zero_frac"].values()))
      assert 0.3 < fracs.mean() < 0.7, (name, fracs.mean())
  _assert_same(*_both(params, cfg, tokens, sparsifiers["wina_threshold"], collect=("zero_frac",), jit=True))


def test_bad_collect_raises_like_forward():
  params, cfg = from_transformers(make_hf_model("llama_mha"))
  with pytest.raises(ValueError, match="cannot collect"):
    wnn.CausalLM(cfg).apply({"params": params}, _tokens(cfg), collect=("bogus",))


def test_new_thresholds_do_not_retrace():
  params, cfg = from_transformers(make_hf_model("llama_gqa_tied"))
  tokens = _tokens(cfg)
  traces = []

  @dataclasses.dataclass(frozen=True)
  class CountedTeal(sp.Method):
    def score(self, site, x, state):
      traces.append(site)  # runs once per site per trace, never at run time
      return jnp.abs(x)

  base = _median_thresholds("teal", params, cfg, tokens)
  sparsifier = sp.ScoreSparsifier(method=CountedTeal(), mode="threshold", thresholds=base.thresholds)
  apply = jax.jit(wnn.CausalLM(cfg).apply)
  first = apply({"params": params}, tokens, sparsifier=sparsifier).logits
  n_sites = len(traces)
  assert n_sites == len(base.thresholds)
  for scale in (0.5, 2.0):
    moved = sparsifier.replace(thresholds={s: t * scale for s, t in base.thresholds.items()})
    logits = apply({"params": params}, tokens, sparsifier=moved).logits
    assert not np.array_equal(np.asarray(logits), np.asarray(first))  # the new thresholds took effect
  assert len(traces) == n_sites, "new threshold values retraced jax.jit(model.apply)"


@pytest.mark.parametrize("name", ["mistral", "phi3_fused", "gemma3"])  # windows; fused projections
def test_prefill_then_decode_equals_recompute(name):
  params, cfg = from_transformers(make_hf_model(name))
  model = wnn.CausalLM(cfg)
  tokens = _tokens(cfg, t=9)
  sparsifier = sp.make("teal", params, cfg, 0.5)
  full = model.apply({"params": params}, tokens, sparsifier=sparsifier).logits
  apply = model.apply  # eager: tests/test_cache.py covers the jitted cache path
  out = apply({"params": params}, tokens[:, :6], sparsifier=sparsifier, cache=model.init_cache(2, 16))
  steps, cache = [out.logits], out.cache
  for j in range(6, 9):
    out = apply({"params": params}, tokens[:, j : j + 1], sparsifier=sparsifier, cache=cache)
    steps.append(out.logits)
    cache = out.cache
  assert int(cache["length"]) == 9
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(full), atol=2e-5, rtol=0)
  fun = M.forward(
    params,
    tokens[:, 8:9],
    cfg,
    sparsifier,
    cache=M.forward(params, tokens[:, :8], cfg, sparsifier, cache=M.init_cache(cfg, 2, 16)).cache,
  )
  np.testing.assert_allclose(np.asarray(fun.logits), np.asarray(steps[-1]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["qwen2_bias", "phi3_fused", "gemma3"])  # separate and fused projections
def test_submodules_alone_match_the_functional_layer(name):
  params, cfg = from_transformers(make_hf_model(name))
  layer = cfg.num_hidden_layers - 1
  lp = params["layers"][str(layer)]
  h = jax.random.normal(KEY, (2, 7, cfg.hidden_size), jnp.float32)
  sparsifier = sp.make("wina", params, cfg, 0.5)
  ctx = M.Context(sparsifier)
  mod = wnn.DecoderLayer(cfg, layer).apply({"params": lp}, h, ctx)[0]
  np.testing.assert_array_equal(np.asarray(mod), np.asarray(M.decoder_layer(cfg, lp, h, layer, sparsifier)))
  x = wnn.RMSNorm(cfg.rms_norm_eps).apply({"params": lp["input_layernorm"]}, h)
  attn, kv = wnn.Attention(cfg, layer).apply({"params": lp["self_attn"]}, x)
  assert attn.shape == h.shape and kv is None
  mlp = wnn.MLP(cfg, layer).apply({"params": lp["mlp"]}, x)
  assert mlp.shape == h.shape and not np.allclose(np.asarray(mlp), 0)


def test_transform_and_calibration_on_init_params():
  """Params from `model.init` go through the transform and calibration, and both paths run the result."""
  cfg = from_transformers(make_hf_model("qwen2_bias"))[1]
  model = wnn.CausalLM(cfg, init_std=0.1)
  params = model.init(KEY, jnp.zeros((1, 1), jnp.int32))["params"]
  tp, tcfg = transform(params, cfg)
  assert any("residual_" in k for k in traverse_util.flatten_dict(tp, sep="/"))
  tokens = _tokens(cfg)
  dense = model.apply({"params": params}, tokens).logits
  tmodel = wnn.CausalLM(tcfg)
  np.testing.assert_allclose(
    np.asarray(tmodel.apply({"params": tp}, tokens).logits), np.asarray(dense), atol=1e-4, rtol=0
  )
  calib = sp.calibrate(tp, tcfg, "wina", np.asarray(_tokens(cfg, b=4, t=16, seed=1)), progress=False)
  sparsifier = sp.make("wina", tp, tcfg, 0.5, mode="threshold", calibration=calib)
  mod, fun = _both(tp, tcfg, tokens, sparsifier, collect=("zero_frac",))
  np.testing.assert_array_equal(np.asarray(mod.logits), np.asarray(fun.logits))
  assert 0.3 < np.mean(list(mod.aux["zero_frac"].values())) < 0.7


def test_smollm2_apply_is_bit_identical(smollm2):
  params, cfg = smollm2
  tokens = _tokens(cfg, b=1, t=16)
  _assert_same(*_both(params, cfg, tokens, None, jit=True))
  _assert_same(*_both(params, cfg, tokens, sp.make("wina", params, cfg, 0.5), collect=("zero_frac",)))

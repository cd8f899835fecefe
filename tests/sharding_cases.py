"""Sharded-vs-single-device cases on 4 fake CPU devices; run by tests/test_sharding.py in a subprocess
(XLA_FLAGS=--xla_force_host_platform_device_count=4 must be set before jax starts)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from wina_jax import model as M
from wina_jax import sharding as SH
from wina_jax import sparsity
from wina_jax.config import ModelConfig
from wina_jax.testing import add_shortcuts, random_params

if jax.device_count() != 4:
  pytest.fail(
    "sharding_cases needs XLA_FLAGS=--xla_force_host_platform_device_count=4 (run it through "
    "tests/test_sharding.py)",
    pytrace=False,
  )

BASE = dict(
  model_type="llama",
  vocab_size=97,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=4,
  head_dim=16,
  max_position_embeddings=64,
)
CFGS = {
  "mha": ModelConfig(**BASE),
  "gqa_tied": ModelConfig(
    **{**BASE, "num_key_value_heads": 2, "tie_word_embeddings": True, "vocab_size": 96}
  ),
  "qwen2_bias": ModelConfig(
    **{**BASE, "model_type": "qwen2", "num_key_value_heads": 2, "attention_bias": True}
  ),
  "phi3_fused": ModelConfig(**{**BASE, "model_type": "phi3", "fused_qkv": True, "fused_gate_up": True}),
  "gemma3": ModelConfig(
    **{**BASE, "model_type": "gemma3_text", "num_key_value_heads": 2, "tie_word_embeddings": True},
    hidden_act="gelu_pytorch_tanh",
    norm_offset=1.0,
    qk_norm=True,
    embed_scale=8.0,
    query_pre_attn_scalar=24.0,
    sliding_window=4,
    layer_types=("sliding_attention", "full_attention"),
    rope_local_theta=100.0,
  ),
}
MESHES = {"tp4": ("model:4", False), "dp2_tp2_fsdp": ("data:2,model:2", True)}


def tokens(cfg, b=2, t=11, seed=1):
  return jnp.asarray(np.random.RandomState(seed).randint(0, cfg.vocab_size, (b, t)))


def close(a, b, tol=1e-4):
  a, b = np.asarray(a), np.asarray(b)
  err = np.abs(a - b).max()
  assert err <= tol * max(1.0, np.abs(b).max()), err
  assert np.abs(b).max() > 0.1  # not comparing near-zero values


def setup(cfg_name, mesh_name, rotations=False):
  cfg = CFGS[cfg_name]
  spec, fsdp = MESHES[mesh_name]
  mesh = SH.make_mesh(spec)
  params = random_params(cfg, 0, jnp.float32, scale_noise=0.1)
  if rotations:
    params = add_shortcuts(params, 0)
  return cfg, mesh, params, SH.shard_params(params, cfg, mesh, fsdp)


def test_params_are_placed_by_the_rules():
  cfg, mesh, _, ps = setup("gqa_tied", "tp4")
  lp = ps["layers"]["0"]
  assert lp["self_attn"]["q_proj"]["kernel"].sharding.spec == P(None, "model")
  assert lp["self_attn"]["q_proj"]["kernel"].addressable_shards[0].data.shape == (64, 16)
  assert lp["self_attn"]["k_proj"]["kernel"].sharding.spec == P(None, None)  # 2 kv heads on 4 devices
  assert lp["self_attn"]["o_proj"]["kernel"].sharding.spec == P("model", None)
  assert lp["mlp"]["down_proj"]["kernel"].addressable_shards[0].data.shape == (24, 64)
  assert ps["embed_tokens"]["embedding"].sharding.spec == P("model", None)  # vocab 96 divides
  _, _, _, fs = setup("mha", "dp2_tp2_fsdp")
  assert fs["layers"]["1"]["mlp"]["up_proj"]["kernel"].sharding.spec == P("data", "model")
  assert fs["embed_tokens"]["embedding"].sharding.spec == P(None, "model")  # vocab 97: shard d instead
  assert fs["norm"]["scale"].sharding.spec == P(None)


@pytest.mark.parametrize(
  "cfg_name,mesh_name",
  [
    ("mha", "tp4"),
    ("mha", "dp2_tp2_fsdp"),
    ("gqa_tied", "tp4"),
    ("gqa_tied", "dp2_tp2_fsdp"),
    ("qwen2_bias", "dp2_tp2_fsdp"),
    ("phi3_fused", "tp4"),
    ("gemma3", "tp4"),
    ("gemma3", "dp2_tp2_fsdp"),
  ],
)
def test_dense_logits_match_one_device(cfg_name, mesh_name):
  cfg, mesh, params, ps = setup(cfg_name, mesh_name, rotations=cfg_name == "mha")
  tok = tokens(cfg)
  logits = jax.jit(lambda p, t: M.forward(p, t, cfg).logits)
  compiled = logits.lower(ps, SH.shard_batch(tok, mesh)).compile()
  assert re.search(r"all-reduce\(", compiled.as_text()), "no all-reduce: the forward is not tensor-parallel"
  close(compiled(ps, SH.shard_batch(tok, mesh)), logits(params, tok))


@pytest.mark.parametrize(
  "method,settings,mesh_name",
  [("teal", {}, "tp4"), ("wina", {"c_sites": "all"}, "tp4"), ("wina", {}, "dp2_tp2_fsdp")],
)
def test_sparsified_logits_match_one_device(method, settings, mesh_name):
  """Top-k 50% at every linear site, WINA's column norms computed from the sharded kernels."""
  cfg, mesh, params, ps = setup("gqa_tied", mesh_name)
  tok = tokens(cfg)
  ref = M.jit_forward(
    params, tok, cfg, sparsity.make(method, params, cfg, 0.5, **settings), collect=("zero_frac",)
  )
  sp = sparsity.make(method, ps, cfg, 0.5, **settings)
  out = M.jit_forward(ps, SH.shard_batch(tok, mesh), cfg, sp, collect=("zero_frac",))
  close(out.logits, ref.logits)
  assert not np.allclose(ref.logits, M.jit_forward(params, tok, cfg).logits, atol=1e-2)  # really sparse
  zf = out.aux["zero_frac"]
  assert all(abs(float(zf[s]) - 0.5) < 1e-6 for s in sp.k) and len(sp.k) == 14


def test_topk_mask_is_global_per_token_not_per_shard():
  """down_proj's input [B, T, I] is sharded over I on 'model': the jitted top-k mask must still hold the
  global top half of every token, which a per-shard top-k (shard_map) does not."""
  cfg, mesh, params, ps = setup("mha", "tp4")
  tok = tokens(cfg)
  site, k = "layers.1.mlp.down_proj", cfg.intermediate_size // 2
  mask = jax.jit(lambda x: sparsity.topk_mask(jnp.abs(x), k))
  inputs = jax.jit(lambda p, t: M.forward(p, t, cfg, collect=("inputs",)).aux["inputs"][site])
  x, xs = inputs(params, tok), inputs(ps, tok)
  assert xs.sharding.spec[-1] == "model"  # the site input really is sharded over its last dim
  ref, got = np.asarray(mask(x)), np.asarray(mask(xs))
  np.testing.assert_array_equal(got, ref)
  assert (got.sum(-1) == k).all()
  per_shard = jax.shard_map(
    lambda v: sparsity.topk_mask(jnp.abs(v), k // 4),
    mesh=mesh,
    in_specs=P(None, None, "model"),
    out_specs=P(None, None, "model"),
  )(xs)
  assert (np.asarray(per_shard) != ref).mean() > 0.05  # per-shard top-k is a different mask


def test_kv_cache_decode_matches_one_device():
  cfg, mesh, params, ps = setup("mha", "dp2_tp2_fsdp")
  tok = tokens(cfg, t=12)
  cache = M.init_cache(cfg, 2, 16)
  scache = SH.init_sharded_cache(cfg, 2, 16, mesh)
  kv_sharding = NamedSharding(mesh, P("data", None, "model", None))
  assert scache["layers"]["0"]["k"].sharding.is_equivalent_to(kv_sharding, 4)
  ref = M.jit_forward(params, tok[:, :8], cfg, cache=cache)
  out = M.jit_forward(ps, SH.shard_batch(tok[:, :8], mesh), cfg, cache=scache)
  close(out.logits, ref.logits)
  for i in range(8, 12):
    ref = M.jit_forward(params, tok[:, i : i + 1], cfg, cache=ref.cache)
    out = M.jit_forward(ps, SH.shard_batch(tok[:, i : i + 1], mesh), cfg, cache=out.cache)
    close(out.logits, ref.logits)
  assert out.cache["layers"]["1"]["v"].sharding.is_equivalent_to(kv_sharding, 4)
  full = M.jit_forward(params, tok, cfg).logits[:, -1:]
  close(out.logits, full)


def test_calibration_statistics_match_one_device():
  """Per-site |x| quantiles (TEAL/WINA threshold calibration) from sharded collected inputs."""
  cfg, mesh, params, ps = setup("phi3_fused", "dp2_tp2_fsdp")
  tok = tokens(cfg, b=4, t=16)

  @jax.jit
  def stats(p, t):
    inputs = M.forward(p, t, cfg, collect=("inputs",)).aux["inputs"]
    return {s: jnp.quantile(jnp.abs(x).reshape(-1), jnp.array([0.25, 0.5, 0.9])) for s, x in inputs.items()}

  ref, out = stats(params, tok), stats(ps, SH.shard_batch(tok, mesh))
  assert set(out) == set(ref)
  for s in ref:
    close(out[s], ref[s], tol=1e-5)


def test_wina_transform_on_mesh_gives_the_same_params():
  """The transform takes sharded params and returns the one-device params (to float32 rounding: the
  rotations' matmuls may run sharded); resharded (residual rotations included) they give the original
  model's logits."""
  from wina_jax.transform import transform

  cfg, mesh, params, ps = setup("gqa_tied", "tp4")
  ref, ref_cfg = transform(params, cfg)
  out, out_cfg = transform(ps, cfg)
  assert out_cfg == ref_cfg
  assert jax.tree.structure(out) == jax.tree.structure(ref)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5), out, ref
  )
  sharded = SH.shard_params(out, out_cfg, mesh)
  assert sharded["layers"]["0"]["residual_attn"]["kernel"].sharding.spec == P("model", None)
  tok = tokens(cfg)
  close(M.jit_forward(sharded, tok, out_cfg).logits, M.jit_forward(params, tok, cfg).logits)


def test_calibrate_on_sharded_params_matches_one_device():
  cfg, mesh, params, ps = setup("mha", "dp2_tp2_fsdp")
  windows = np.asarray(tokens(cfg, b=4, t=16))
  method = sparsity.get_method("wina")
  ref = sparsity.calibrate(params, cfg, method, windows, samples_per_site=512, progress=False)
  out = sparsity.calibrate(ps, cfg, method, windows, samples_per_site=512, progress=False)
  assert out.fingerprint == ref.fingerprint and set(out.quantiles) == set(ref.quantiles)
  for s in ref.quantiles:
    close(out.quantiles[s], ref.quantiles[s], tol=1e-5)

"""Decode step vs full recompute, the fused sparsifier inside the model, fused vs unfused projections."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wina_jax import sites as S
from wina_jax.bench.shapes import SHAPES
from wina_jax.decode import decode_loop, decode_step, fuse_projections, fuse_state, fused_site_shapes, prefill
from wina_jax.kernels import FusedThresholdSparsifier, KernelConfig
from wina_jax.model import forward, init_cache
from wina_jax.testing import add_shortcuts, random_params

CFG = SHAPES["tiny"]
P, T = 5, 4


@pytest.fixture(scope="module")
def model():
  params = add_shortcuts(random_params(CFG, 0, jnp.float32), 3)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, P + T), 0, CFG.vocab_size)
  return params, tokens


def thresholds_and_scales(params, cfg, q=0.5):
  """Per-site thresholds at the q-quantile of |x| * column norm on a fixed random input."""
  x = jax.random.normal(jax.random.PRNGKey(7), (64,))
  thr, scales = {}, {}
  for site in S.linear_sites(cfg):
    k = S.site_kernel(params, site)
    scales[site] = jnp.linalg.norm(k, axis=1)
    xs = jnp.resize(x, (k.shape[0],))
    thr[site] = jnp.quantile(jnp.abs(xs) * scales[site], q)
  return thr, scales


def run_decode(params, tokens, cfg, sp):
  nxt, logits, cache = prefill(params, tokens[:, :P], cfg=cfg, max_len=P + T)
  out = [logits]
  for j in range(T - 1):
    _, logits, cache = decode_step(params, tokens[:, P + j], cache, sp, cfg=cfg)
    out.append(logits)
  return jnp.stack(out, axis=1)  # logits predicting positions P .. P+T-1


def test_dense_decode_equals_full_recompute(model):
  params, tokens = model
  got = run_decode(params, tokens, CFG, None)
  ref = forward(params, tokens, CFG).logits[:, P - 1 : P + T - 1]
  np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-4)


def test_sparse_decode_equals_masked_recompute_without_retrace(model):
  params, tokens = model
  thr, scales = thresholds_and_scales(params, CFG)
  sp = FusedThresholdSparsifier.create(thr, scales, backend="xla")
  got = run_decode(params, tokens, CFG, sp)
  ref = forward(params, tokens, CFG, sp, dense_prefix=P, collect=("zero_frac",))  # mask-then-matmul path
  np.testing.assert_allclose(got, ref.logits[:, P - 1 : P + T - 1], rtol=2e-4, atol=2e-4)
  zero = np.mean([float(v) for v in ref.aux["zero_frac"].values()])
  assert 0.2 < zero < 0.8
  dense = run_decode(params, tokens, CFG, None)
  assert np.max(np.abs(np.asarray(got - dense))) > 1e-3  # sparsity changed the outputs
  size = decode_step._cache_size()
  run_decode(params, tokens, CFG, sp.with_thresholds({s: t * 1.1 for s, t in thr.items()}))
  assert decode_step._cache_size() == size  # new thresholds reuse the compiled step


def test_fused_projections_and_state_match_unfused(model):
  params, tokens = model
  thr, scales = thresholds_and_scales(params, CFG)
  thr.pop("layers.1.self_attn.v_proj")  # one part left dense
  scales = {s: v for s, v in scales.items() if "k_proj" in s or "down" in s}  # WINA's 'official' c
  ref = forward(params, tokens, CFG, FusedThresholdSparsifier.create(thr, scales, backend="xla")).logits
  fparams, fcfg = fuse_projections(params, CFG)
  ft, fs, segs = fuse_state(thr, scales, CFG)
  assert segs["layers.0.self_attn.qkv_proj"] == (CFG.q_dim, CFG.kv_dim, CFG.kv_dim)
  sp = FusedThresholdSparsifier.create(ft, fs, segs, backend="xla")
  np.testing.assert_allclose(forward(fparams, tokens, fcfg, sp).logits, ref, rtol=2e-4, atol=2e-4)
  with pytest.raises(ValueError, match="segment thresholds"):
    forward(fparams, tokens, fcfg, sp, collect=("inputs",))


@pytest.mark.parametrize("fuse_norm", [False, True])
def test_interpret_kernel_inside_model(model, fuse_norm):
  """The Pallas kernel (interpret mode) as the model's fused linear, one decode step, bf16 weights; with
  fuse_norm the kernels after a norm normalise in their prologue."""
  params, tokens = model
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
  thr, scales = thresholds_and_scales(params, CFG)
  thr = {s: t for s, t in thr.items() if s.startswith("layers.0.")}  # 4 kernels keep interpret mode quick
  ref_sp = FusedThresholdSparsifier.create(thr, scales, backend="xla")
  sp = FusedThresholdSparsifier.create(thr, scales, backend="interpret", fuse_norm=fuse_norm)
  tok = tokens[:1, :1]
  got = forward(params, tok, CFG, sp).logits
  ref = forward(params, tok, CFG, ref_sp).logits
  assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 2e-2


def test_model_hands_the_raw_residual_to_norm_linear(model):
  """Sites after a norm reach a fused sparsifier through `norm_linear` with the un-normalised residual and
  that norm's gain (q|k|v after input_layernorm, gate|up after post_attention_layernorm); the blocks' output
  projections (o_proj, down_proj) through `residual_linear` with the residual they add to; and the logits equal
  the XLA path's."""
  from wina_jax.decode import fuse_projections

  params, tokens = model
  fparams, fcfg = fuse_projections(params, CFG)
  thr, scales = thresholds_and_scales(params, CFG)
  sp = FusedThresholdSparsifier.create({s: t for s, t in thr.items() if ".0." in s}, backend="xla")
  calls = []

  class Spy(type(sp)):
    def norm_linear(self, site, h, gain, eps, kernel):
      calls.append((site, "norm", h, gain))
      return super().norm_linear(site, h, gain, eps, kernel)

    def linear(self, site, x, kernel):
      calls.append((site, "plain", x, None))
      return super().linear(site, x, kernel)

    def residual_linear(self, site, x, kernel, residual):
      calls.append((site, "residual", x, residual))
      return super().residual_linear(site, x, kernel, residual)

  spy = Spy(
    **{f: getattr(sp, f) for f in ("thresholds", "scales", "segments", "backend", "configs", "workspace")}
  )
  tok = tokens[:1, :3]
  got = forward(fparams, tok, fcfg, spy).logits
  kinds = {site: kind for site, kind, _, _ in calls}
  assert kinds["layers.0.self_attn.qkv_proj"] == kinds["layers.0.mlp.gate_up_proj"] == "norm"
  assert kinds["layers.0.self_attn.o_proj"] == kinds["layers.0.mlp.down_proj"] == "residual"
  (_, _, _, skip) = next(c for c in calls if c[0] == "layers.0.self_attn.o_proj")
  # layer 0's skip: the embeddings through the residual rotation `add_shortcuts` put in the params
  rot = fparams["layers"]["0"]["residual_attn"]["kernel"]
  want = jnp.matmul(fparams["embed_tokens"]["embedding"][tok], rot, precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(skip, want, rtol=1e-5, atol=1e-5)
  (_, _, h0, g0) = next(c for c in calls if c[0] == "layers.0.self_attn.qkv_proj")
  np.testing.assert_array_equal(h0, fparams["embed_tokens"]["embedding"][tok])  # layer 0 sees the embeddings
  np.testing.assert_array_equal(g0, fparams["layers"]["0"]["input_layernorm"]["scale"])
  ref = forward(fparams, tok, fcfg, sp.replace(backend="xla")).logits
  np.testing.assert_array_equal(got, ref)


def test_decode_loop_equals_steps(model):
  """One on-device loop over T tokens gives the step-by-step greedy tokens, last logits and cache."""
  params, tokens = model
  thr, scales = thresholds_and_scales(params, CFG)
  sp = FusedThresholdSparsifier.create(thr, scales, backend="xla")
  _, _, cache = prefill(params, tokens[:, :P], cfg=CFG, max_len=P + T)
  twin = jax.tree.map(jnp.copy, cache)
  nxt, logits, cache = decode_loop(params, tokens[:, P:], cache, sp, cfg=CFG)
  ref = []
  for j in range(T):
    tok, ref_logits, twin = decode_step(params, tokens[:, P + j], twin, sp, cfg=CFG)
    ref.append(tok)
  np.testing.assert_array_equal(nxt, jnp.stack(ref, axis=1))
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(twin)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_decode_loop_runs_the_pallas_kernel():
  """The Pallas kernel (interpret mode: compact, prefetch loop, semaphore reduce) inside the on-device
  loop gives the XLA path's tokens and logits, and leaves its semaphore workspace zeroed."""
  params, cfg = fuse_projections(random_params(CFG, 0, jnp.float32), CFG)
  thr, scales, segs = fuse_state({s: 0.5 for s in S.linear_sites(CFG)}, {}, CFG)
  tiling = KernelConfig("compact", 64, 16, 32, reduce="semaphore", loop="prefetch")
  shapes = {(d_in, sum(ws)): tiling for d_in, ws in fused_site_shapes(cfg)}
  sp = FusedThresholdSparsifier.create(thr, scales, segs, backend="interpret", configs=shapes)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 4), 0, CFG.vocab_size)
  got, logits, _ = decode_loop(params, tokens, init_cache(cfg, 1, 8), sp, cfg=cfg)
  ref, ref_logits, _ = decode_loop(params, tokens, init_cache(cfg, 1, 8), sp.replace(backend="xla"), cfg=cfg)
  np.testing.assert_array_equal(got, ref)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(sp.workspace), 0)

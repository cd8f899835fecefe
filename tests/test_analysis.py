"""Error analysis: metric definitions, consistency with the model's sparse run, and WINA's Lemma 3.1 on
the transformed SmolLM2 (isolated mode, its first layers)."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model

from wina_jax import analysis, sparsity
from wina_jax import sites as S
from wina_jax.analysis import column_orthogonality_defect, error_sums, logit_kl
from wina_jax.convert import from_transformers
from wina_jax.model import forward
from wina_jax.transform import transform

SPARSITIES = (0.25, 0.4, 0.5, 0.65)
TEXT = (
  "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
  "named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to "
  "1889."
)


def test_error_sums_match_definitions(rng):
  x = rng.randn(5, 7, 12).astype(np.float32)
  xs = np.where(rng.rand(*x.shape) < 0.4, 0, x).astype(np.float32)
  k = rng.randn(12, 9).astype(np.float32)
  got = error_sums(x, xs, k)
  np.testing.assert_allclose(got["ref"], np.sum((x @ k) ** 2), rtol=1e-5)
  np.testing.assert_allclose(got["actual"], np.sum(((x - xs) @ k) ** 2), rtol=1e-5)
  np.testing.assert_allclose(got["lemma"], np.sum((x - xs) ** 2 * np.sum(k * k, 1)), rtol=1e-5)
  np.testing.assert_allclose(got["dropped"], np.mean(xs == 0), rtol=1e-6)
  assert abs(float(got["actual"] - got["lemma"])) > 1e-3 * float(got["actual"])  # cross terms exist
  q, _ = np.linalg.qr(rng.randn(12, 12))
  ortho = (q * rng.rand(12)[None, :]).T.astype(np.float32)  # rows orthogonal, unequal norms
  got = error_sums(x, xs, ortho)
  np.testing.assert_allclose(got["actual"], got["lemma"], rtol=1e-5)


def test_orthogonality_defect(rng):
  for k in (rng.randn(20, 7), rng.randn(7, 20)):  # tall and wide kernels use different Gram matrices
    g = k @ k.T
    want = (np.sum(g * g) - np.sum(np.diag(g) ** 2)) / np.sum(np.diag(g) ** 2)
    np.testing.assert_allclose(column_orthogonality_defect(k), want, rtol=1e-10)
  q, _ = np.linalg.qr(rng.randn(20, 20))
  assert column_orthogonality_defect(q[:, :7].T * rng.rand(7, 1)) <= 1e-14  # 7 orthogonal rows


def test_logit_kl(rng):
  a = rng.randn(2, 3, 11).astype(np.float32)
  b = a + 0.3 * rng.randn(*a.shape).astype(np.float32)
  assert abs(logit_kl(a, a)) < 1e-6
  p = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
  q = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
  np.testing.assert_allclose(logit_kl(a, b), np.mean(np.sum(p * np.log(p / q), -1)), rtol=1e-4)


@pytest.mark.parametrize(
  "name,method", [("llama_gqa_tied", "teal"), ("phi3_fused", "cats"), ("qwen2_bias", "wina")]
)
def test_site_inputs_reproduce_the_sparse_run(name, method, rng):
  """Propagated mode rebuilds each site's masked input exactly as the model's sparse forward fed it."""
  params, cfg = from_transformers(make_hf_model(name))
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 9)))
  sp = sparsity.make(method, params, cfg, 0.5)
  inputs = forward(params, tokens, cfg, sp, collect=("inputs",)).aux["inputs"]
  for site in S.linear_sites(cfg):
    x, xs = analysis.site_input(params, cfg, inputs, sp, site, propagated=True)
    if S.parse_site(site)[2] == "down_proj":
      # the recorded input already carries the act mask (CATS): masking it at the site must give xs
      np.testing.assert_allclose(sp(site, inputs[site], S.site_kernel(params, site)), xs, atol=1e-5)
      assert float(jnp.mean(xs == 0)) >= 0.45
    else:
      np.testing.assert_array_equal(x, inputs[site])


def test_dense_has_no_error_and_sparse_does(rng):
  params, cfg = from_transformers(make_hf_model("mistral"))
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (1, 10)))
  dense = analysis.dense_run(params, cfg, tokens)
  rows, kl = analysis.propagated(params, cfg, tokens, dense, S.dense)
  assert abs(kl) < 1e-6 and all(r["rel_actual"] == 0 and r["rel_drift"] < 1e-10 for r in rows.values())
  sp = sparsity.make("teal", params, cfg, 0.5)
  iso = analysis.isolated(params, cfg, dense, sp)
  prop, kl = analysis.propagated(params, cfg, tokens, dense, sp)
  assert kl > 0 and all(0 < r["rel_actual"] for r in iso.values())
  for site in iso:  # dropping half the inputs removes a real, bounded share of the output energy
    assert 0.4 <= iso[site]["dropped"] <= 0.6 and iso[site]["rel_actual"] < 1
    assert prop[site]["rel_drift"] >= 0
  first, last = S.linear_sites(cfg)[0], S.linear_sites(cfg)[-1]
  # the first site sees the embedding in both runs; later sites see inputs changed by earlier masks
  np.testing.assert_allclose(prop[first]["rel_drift"], iso[first]["rel_actual"], rtol=1e-5)
  np.testing.assert_allclose(prop[first]["rel_actual"], iso[first]["rel_actual"], rtol=1e-5)
  assert abs(prop[last]["rel_drift"] - prop[last]["rel_actual"]) > 1e-3 * prop[last]["rel_actual"]


@pytest.fixture(scope="module")
def smollm2_head(smollm2):
  """SmolLM2's first 3 layers, original and WINA-transformed."""
  params, cfg = smollm2
  n = 3
  params = {**params, "layers": {str(i): params["layers"][str(i)] for i in range(n)}}
  cfg = cfg.replace(num_hidden_layers=n)
  return (params, cfg), transform(params, cfg)


def test_smollm2_wina_meets_lemma_and_beats_teal(smollm2_head, smollm2_tokenizer):
  (params, cfg), (tp, tcfg) = smollm2_head
  tokens = jnp.asarray(smollm2_tokenizer(TEXT, return_tensors="np")["input_ids"])
  assert tokens.shape[1] >= 32
  dense_t = analysis.dense_run(tp, tcfg, tokens)
  sites = [s for s in S.linear_sites(tcfg) if S.parse_site(s)[2] in ("k_proj", "gate_proj")]
  for s in SPARSITIES:
    wina = analysis.isolated(tp, tcfg, dense_t, sparsity.make("wina", tp, tcfg, s), sites)
    teal_t = analysis.isolated(tp, tcfg, dense_t, sparsity.make("teal", tp, tcfg, s), sites)
    for site in sites:
      w, t = wina[site], teal_t[site]
      # relative squared errors below 1e-10 are float32 round-off: GQA k_proj (rank 192 < d = 576) gets
      # d - rank zero rows from the transform, and WINA drops those first (lossless up to sparsity 2/3)
      assert abs(w["rel_actual"] - w["rel_lemma"]) <= 1e-4 * max(w["rel_actual"], 1e-10), (s, site, w)
      assert w["rel_actual"] <= t["rel_actual"] * (1 + 1e-5), (s, site, w, t)
      assert t["rel_actual"] > w["rel_actual"] * 1.01  # the comparison is not between equal masks

"""WINA tensor transform: the dense model is unchanged and k_proj / gate_proj become column-orthogonal."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_CONFIGS, make_hf_model
from flax import traverse_util
from test_sweep import ROOT, _env, tiny_folder  # noqa: F401  (fixture)

from wina_jax import families
from wina_jax import sparsity as sp
from wina_jax.analysis import column_orthogonality_defect
from wina_jax.bases import BASES, axis_alignment, axis_basis, objective
from wina_jax.convert import from_transformers
from wina_jax.model import forward, init_cache
from wina_jax.transform import (
  block_bases,
  block_inputs,
  default_rotation,
  input_kernels,
  key_kernel,
  shortcut_cost,
  transform,
)


def _perturb(params, rng):
  """Random RMSNorm gains and biases, so folding and bias rotation are exercised (HF inits them 1 / 0)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  for k, v in flat.items():
    if k.endswith("/scale"):
      flat[k] = jnp.asarray(1 + 0.5 * rng.randn(*v.shape), v.dtype)
    elif k.endswith("/bias"):
      flat[k] = jnp.asarray(0.1 * rng.randn(*v.shape), v.dtype)
  return traverse_util.unflatten_dict(flat, sep="/")


def _rel_delta(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return np.abs(a - b).max() / np.abs(a).max()


def _key_kernels(params, cfg):
  """Transformed k (or fused k part) and gate (or fused gate part) kernels: {(layer, block): [d, n]}."""
  return {
    (l, b): key_kernel(params["layers"][str(l)], cfg, b)
    for l in range(cfg.num_hidden_layers)
    for b in ("self_attn", "mlp")
  }


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_transform_is_invariant_and_orthogonal(name, rng):
  params, cfg = from_transformers(make_hf_model(name))
  params = _perturb(params, rng)
  tp, tcfg = transform(params, cfg)
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 19)))
  ref = forward(params, tokens, cfg).logits
  assert _rel_delta(ref, forward(tp, tokens, tcfg).logits) <= 1e-4
  if default_rotation(cfg) == "residual":
    assert not tcfg.tie_word_embeddings and tp["lm_head"]["kernel"].shape == (cfg.hidden_size, cfg.vocab_size)
  else:  # post-block norms (gemma3): the residual stream, embedding, lm_head and post-norms stay as they were
    assert tcfg == cfg and set(tp) == set(params)
    np.testing.assert_array_equal(tp["embed_tokens"]["embedding"], params["embed_tokens"]["embedding"])
    for l, lp in tp["layers"].items():
      assert "rotate_attn" in lp and "rotate_mlp" in lp and not any(k.startswith("residual_") for k in lp)
      for block in ("self_attn", "mlp"):
        post = families.get(cfg.model_type).norms[block][1]
        np.testing.assert_array_equal(lp[post]["scale"], params["layers"][l][post]["scale"])
  for lp in tp["layers"].values():  # every pre-norm's gain (norm_offset + scale) is folded away
    for pre, _ in families.get(cfg.model_type).norms.values():
      np.testing.assert_array_equal(lp[pre]["scale"] + cfg.norm_offset, 1)
  for block, k in _key_kernels(tp, tcfg).items():
    assert column_orthogonality_defect(k) <= 1e-6, block
  # the untransformed key kernels are far from column-orthogonal, so the check above is not vacuous
  assert max(column_orthogonality_defect(k) for k in _key_kernels(params, cfg).values()) > 1e-2


def test_post_norm_models_refuse_the_residual_rotation_and_input_rotation_is_the_same_sparse_model(rng):
  """With post-block norms the residual rotation cannot be folded (the error says why); on a pre-norm model,
  where both placements are exact, rotating the blocks' inputs gives every site the same input as rotating
  the residual stream, so WINA's masks and the sparse logits agree too."""
  params, cfg = from_transformers(make_hf_model("gemma3"))
  with pytest.raises(ValueError, match=r"rotate='residual' is not exact for 'gemma3_text'.*RMSNorm\(y Q\)"):
    transform(params, cfg, rotate="residual")
  params, cfg = from_transformers(make_hf_model("qwen2_bias"))
  params = _perturb(params, rng)
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 13)))
  (rp, rcfg), (ip, icfg) = (transform(params, cfg, rotate=r) for r in ("residual", "inputs"))
  assert shortcut_cost(ip, icfg)["shortcuts"] == 2 * cfg.num_hidden_layers
  got = {}
  for key, (p, c) in {"residual": (rp, rcfg), "inputs": (ip, icfg)}.items():
    sparsifier = sp.make("wina", p, c, 0.5)
    out = forward(p, tokens, c, sparsifier, collect=("inputs",))
    got[key] = out.logits, out.aux["inputs"]
  assert _rel_delta(got["residual"][0], got["inputs"][0]) <= 1e-4
  for site, x in got["residual"][1].items():
    np.testing.assert_allclose(np.asarray(got["inputs"][1][site]), np.asarray(x), atol=2e-5, rtol=0)


def test_gqa_basis_is_full_and_orthogonal():
  params, cfg = from_transformers(make_hf_model("llama3_rope"))  # one kv head: k_proj is [64, 16]
  assert cfg.kv_dim < cfg.hidden_size
  for q in block_bases(params, cfg).values():
    np.testing.assert_allclose(q.T @ q, np.eye(cfg.hidden_size), atol=1e-12)


def test_partial_transform(rng):
  params, cfg = from_transformers(make_hf_model("qwen2_bias"))
  params = _perturb(params, rng)
  tp, tcfg = transform(params, cfg, blocks=[(1, "self_attn")])
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (1, 11)))
  assert _rel_delta(forward(params, tokens, cfg).logits, forward(tp, tokens, tcfg).logits) <= 1e-4
  keys = _key_kernels(tp, tcfg)
  assert column_orthogonality_defect(keys[(1, "self_attn")]) <= 1e-6
  assert column_orthogonality_defect(keys[(0, "mlp")]) > 1e-2
  # the embedding stays in the identity basis: only layer 0's MLP -> layer 1's attention path rotates
  assert "residual_attn" not in tp["layers"]["0"] and "residual_mlp" in tp["layers"]["0"]
  with pytest.raises(ValueError, match="bad block"):
    transform(params, cfg, blocks=[(2, "mlp")])


def test_refuses_to_transform_twice():
  params, cfg = from_transformers(make_hf_model("llama_mha"))
  tp, tcfg = transform(params, cfg)
  with pytest.raises(ValueError, match="already transformed"):
    transform(tp, tcfg)


def test_keeps_dtype():
  params, cfg = from_transformers(make_hf_model("llama_gqa_tied"), dtype=jnp.bfloat16)
  tp, _ = transform(params, cfg)
  assert {v.dtype for v in traverse_util.flatten_dict(tp).values()} == {jnp.dtype(jnp.bfloat16)}


def _decode(params, cfg, tokens, prefill):
  cache = init_cache(cfg, tokens.shape[0], tokens.shape[1])
  out = forward(params, tokens[:, :prefill], cfg, cache=cache)
  steps, cache = [out.logits], out.cache
  for t in range(prefill, tokens.shape[1]):
    out = forward(params, tokens[:, t : t + 1], cfg, cache=cache)
    steps.append(out.logits)
    cache = out.cache
  return np.concatenate(steps, axis=1)


@pytest.fixture(scope="module")
def smollm2_transformed(smollm2):
  return transform(*smollm2)


def test_smollm2_transform_is_invariant_with_kv_cache(smollm2, smollm2_transformed, rng):
  (params, cfg), (tp, tcfg) = smollm2, smollm2_transformed
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (1, 12)))
  ref = forward(params, tokens, cfg).logits
  assert np.abs(np.asarray(ref)).max() > 1.0
  assert _rel_delta(ref, forward(tp, tokens, tcfg).logits) <= 1e-4
  dec_ref = _decode(params, cfg, tokens, 8)
  dec = _decode(tp, tcfg, tokens, 8)
  np.testing.assert_allclose(dec_ref, ref, atol=1e-3 * np.abs(dec_ref).max())  # the decode is real
  assert _rel_delta(dec_ref, dec) <= 1e-4


def test_smollm2_key_kernels_are_column_orthogonal(smollm2_transformed):
  tp, tcfg = smollm2_transformed
  for block, k in _key_kernels(tp, tcfg).items():
    assert column_orthogonality_defect(k) <= 1e-6, block


def test_smollm2_shortcut_cost(smollm2, smollm2_transformed):
  (_, cfg), (tp, tcfg) = smollm2, smollm2_transformed
  cost = shortcut_cost(tp, tcfg, cfg)
  d = cfg.hidden_size
  n = 2 * cfg.num_hidden_layers - 1  # the last layer's MLP shortcut is the identity
  assert cost["shortcuts"] == n and cost["flops"] == 2 * d * d * n and cost["bytes"] == 4 * d * d * n
  assert cost["untie_bytes"] == 4 * cfg.vocab_size * d
  assert 0 < cost["flops_frac"] < 1 and 0 < cost["bytes_frac"] < 1
  for l in range(cfg.num_hidden_layers):  # each shortcut is orthogonal
    for key in ("residual_attn", "residual_mlp"):
      if key in tp["layers"][str(l)]:
        r = np.asarray(tp["layers"][str(l)][key]["kernel"], np.float64)
        np.testing.assert_allclose(r.T @ r, np.eye(d), atol=1e-5)


GQA = ["llama3_rope", "qwen2_bias", "phi3_fused"]  # kv_dim < hidden_size: a null space is free


def _learned(params, cfg, rng, **kw):
  windows = rng.randint(0, cfg.vocab_size, (2, 24))
  info = {}
  bases = block_bases(params, cfg, basis="learned", calib_windows=windows, info=info, **kw)
  return bases, info, windows


@pytest.mark.parametrize("basis", BASES)
@pytest.mark.parametrize("name", GQA)
def test_every_basis_keeps_the_dense_model(name, basis, rng):
  params, cfg = from_transformers(make_hf_model(name))
  params = _perturb(params, rng)
  windows = rng.randint(0, cfg.vocab_size, (2, 16))
  tp, tcfg = transform(params, cfg, basis=basis, calib_windows=windows)
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 19)))
  assert _rel_delta(forward(params, tokens, cfg).logits, forward(tp, tokens, tcfg).logits) <= 2e-5
  for block, k in _key_kernels(tp, tcfg).items():
    assert column_orthogonality_defect(k) <= 1e-6, block


def test_bases_differ_only_in_the_null_space():
  params, cfg = from_transformers(make_hf_model("llama3_rope"))  # k_proj [64, 16]: 48 free directions
  svd, axis = (block_bases(params, cfg, basis=b) for b in ("svd", "axis"))
  r = cfg.kv_dim
  for blk in svd:
    np.testing.assert_allclose(axis[blk].T @ axis[blk], np.eye(cfg.hidden_size), atol=1e-12)
    if blk[1] == "mlp":  # gate_proj [64, 96] has full rank: nothing is free
      np.testing.assert_array_equal(axis[blk], svd[blk])
      continue
    np.testing.assert_array_equal(axis[blk][:, :r], svd[blk][:, :r])
    # the same null space (projectors agree), spanned by different vectors
    np.testing.assert_allclose(
      axis[blk][:, r:] @ axis[blk][:, r:].T, svd[blk][:, r:] @ svd[blk][:, r:].T, atol=1e-12
    )
    assert axis_alignment(axis[blk][:, r:]) > axis_alignment(svd[blk][:, r:]) + 0.05, blk


def test_axis_basis_is_the_closest_to_its_axes(rng):
  null = np.linalg.qr(rng.randn(40, 30))[0]
  got = axis_basis(null)
  axes = np.sort(np.argsort(-np.linalg.norm(null, axis=1))[:30])
  target = np.eye(40)[:, axes]
  best = np.linalg.norm(got - target)
  for _ in range(20):  # any other orthonormal basis of the span is farther from the axes
    other = null @ np.linalg.qr(rng.randn(30, 30))[0]
    assert np.linalg.norm(other - target) > best
  np.testing.assert_allclose(got @ got.T, null @ null.T, atol=1e-12)


def test_learned_basis_does_not_raise_its_objective(rng):
  params, cfg = from_transformers(make_hf_model("llama3_rope"))
  params = _perturb(params, rng)
  bases, info, windows = _learned(params, cfg, rng)
  axis = block_bases(params, cfg, basis="axis")
  inputs = block_inputs(params, cfg, windows)
  assert set(info) == {(l, "self_attn") for l in range(cfg.num_hidden_layers)}
  for blk, fit in info.items():
    kernels = input_kernels(params["layers"][str(blk[0])], cfg, blk[1])
    init = objective(inputs[blk], axis[blk], cfg.kv_dim, kernels, 0.5)
    got = objective(inputs[blk], bases[blk], cfg.kv_dim, kernels, 0.5)
    assert fit["init"] == pytest.approx(init, rel=1e-5)
    assert got <= init * (1 + 1e-5), blk
  # the fit moves: on random weights the rotation lowers the error in at least one block
  assert min(f["best"] / f["init"] for f in info.values()) < 0.99


def test_learned_basis_needs_windows_and_bad_basis_is_named():
  params, cfg = from_transformers(make_hf_model("llama3_rope"))
  with pytest.raises(ValueError, match="calib_windows"):
    transform(params, cfg, basis="learned")
  with pytest.raises(ValueError, match="unknown basis"):
    transform(params, cfg, basis="lapack")


def test_basis_script_pride_bands_resume(tiny_folder, smollm2_tokenizer, tmp_path):  # noqa: F811
  """experiments/quality/transform_basis.py --ppl_text=pride on a tiny model: the protocol's first ids (checked
  against the reference with SmolLM2's tokenizer), one row per (variant, seed) with per-window NLLs, numerics
  and bootstrap bands and verdicts in the summary; a re-run computes nothing; --k_rule reaches the top-k."""
  import json
  import subprocess
  import sys

  from wina_jax.data import austen

  try:
    text = austen.pride_and_prejudice()
  except RuntimeError as e:
    pytest.skip(f"r-cran-janeaustenr cannot be fetched here: {e}")
  out = tmp_path / "basis.json"
  cmd = [
    sys.executable,
    "-m",
    "experiments.quality.transform_basis",
    f"--model={tiny_folder}",
    "--ppl_text=pride",
    "--ppl_windows=2",
    "--seq_len=64",
    "--sparsity=0.4",  # intermediate 96: k = 57 (floor) vs 58 (round)
    "--baselines=teal",
    "--bases=svd,axis",
    "--seeds=1",
    f"--out={out}",
  ]
  run = lambda *extra: (
    subprocess.run(cmd + list(extra), check=True, cwd=ROOT, env=_env(), capture_output=True, text=True).stdout
  )
  run("--k_rule=floor")
  res = json.loads(out.read_text())
  assert res["settings"]["k_rule"] == "floor" and res["settings"]["protocol"]["reference_ids_checked"]
  ids = austen.protocol_windows(smollm2_tokenizer, text, n_tokens=128, window=64)
  assert res["settings"]["protocol"]["ids_sha256"] == austen.ids_digest(ids.ravel())
  transformed = ["wina-transform[basis=svd]", "wina-transform[basis=axis]"]
  want = {(v, None) for v in ["dense", "wina", "teal", *transformed]}
  want |= {(v, 1) for v in ["wina", "teal", *transformed]}
  assert {(r["variant"], r["seed"]) for r in res["rows"]} == want
  for r in res["rows"]:
    assert len(r["window_nll"]) == 2 and r["tokens"] == [63, 63]
    assert r["ppl"] == pytest.approx(np.exp(np.mean(r["window_nll"])), rel=1e-6)
    assert r.get("dense_logit_rel_diff", 0) < 1e-4
  summary = res["summary"]
  assert summary["variants"]["dense"]["numerics"] is None
  for v in ["wina", "teal", *transformed]:
    s = summary["variants"][v]
    assert s["numerics"]["n"] == 2 and s["bootstrap"][0] <= s["ppl"] <= s["bootstrap"][1]
  pairs = {(c["a"], c["b"]): c["verdict"] for c in summary["comparisons"]}
  assert ("teal", "wina") in pairs and (transformed[0], transformed[1]) in pairs
  assert all(v in ("real", "within noise", "real (sampling only)") for v in pairs.values())

  assert "'variant'" not in run("--k_rule=floor")  # resumed: every row already there
  assert json.loads(out.read_text())["rows"] == res["rows"]
  run("--k_rule=round", "--bases=", "--seeds=", "--baselines=")
  wina_ppl = lambda rows: next(r["ppl"] for r in rows if r["variant"] == "wina" and r["seed"] is None)
  assert wina_ppl(json.loads(out.read_text())["rows"]) != wina_ppl(
    res["rows"]
  )  # one more kept per down_proj input

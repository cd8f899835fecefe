"""Variant specs: the grammar, method settings, scoped transforms and the per-target '-transform-auto' pick."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model
from flax import traverse_util

from wina_jax import sites as S
from wina_jax import sparsity
from wina_jax.analysis import column_orthogonality_defect, error_sums
from wina_jax.analysis.errors import site_input
from wina_jax.convert import from_transformers
from wina_jax.eval import variants
from wina_jax.model import forward
from wina_jax.transform import key_kernel


@pytest.fixture(scope="module")
def tiny():
  """A 2-layer random llama with random RMSNorm gains (so gain folding is exercised)."""
  params, cfg = from_transformers(make_hf_model("llama_mha"))
  rng = np.random.RandomState(1)
  flat = traverse_util.flatten_dict(params, sep="/")
  flat = {
    k: jnp.asarray(1 + 0.5 * rng.randn(*v.shape), v.dtype) if k.endswith("/scale") else v
    for k, v in flat.items()
  }
  return traverse_util.unflatten_dict(flat, sep="/"), cfg


@pytest.fixture(scope="module")
def windows(tiny):
  return np.random.RandomState(2).randint(0, tiny[1].vocab_size, (3, 16))


def _rel_delta(a, b):
  a, b = np.asarray(a), np.asarray(b)
  return np.abs(a - b).max() / np.abs(a).max()


def _rotated(params, cfg):
  """Blocks whose key kernel is column-orthogonal (rotated); the others must be clearly not."""
  defects = {
    (l, b): column_orthogonality_defect(key_kernel(params["layers"][str(l)], cfg, b))
    for l in range(cfg.num_hidden_layers)
    for b in ("self_attn", "mlp")
  }
  assert all(d <= 1e-6 or d > 1e-2 for d in defects.values()), defects
  return sorted(blk for blk, d in defects.items() if d <= 1e-6)


def test_grammar_parses_settings_and_scopes():
  sp = variants.parse("wina[c_sites=all]-transform-mlp")
  assert (sp.name, sp.settings, sp.scope) == ("wina", (("c_sites", "all"),), "mlp")
  assert sp.method == sparsity.get_method("wina", c_sites="all")
  assert variants.parse("wina").method == sparsity.get_method("wina")
  assert [
    variants.parse(f"teal{s}").scope
    for s in ("", "-transform", "-transform-attn", "-transform-mlp", "-transform-auto")
  ] == [None, "all", "attn", "mlp", "auto"]
  assert variants._value("3") == 3 and variants._value("0.5") == 0.5 and variants._value("all") == "all"
  bad = {
    "magic": "unknown method 'magic'",
    "magic-transform": "unknown method",
    "wina[foo=1]": r"has no setting\(s\) \['foo'\]",
    "wina[c_sites=al]": "c_sites='al' is unknown",
    "wina[c_sites]": "bad setting 'c_sites'",
    "wina[c_sites=all;c_sites=all]": "given twice",
    "wina[]": "empty settings",
    "wina[c_sites=all": "malformed settings",
    "wina]": "malformed settings",
    "wina[a=1,b=2]": "contains ','",
    "teal-transform-x": "bad transform suffix '-transform-x'",
    "wina-transform[c_sites=all]": "before the transform suffix",
    "": "empty method spec",
    "wina[c_sites=all]mlp": "bad transform suffix 'mlp'",
  }
  for spec, msg in bad.items():
    with pytest.raises(ValueError, match=msg):
      variants.parse(spec)
  assert variants.needs_calibration("wina-transform-auto") and not variants.needs_calibration(
    "wina-transform"
  )
  assert variants.needs_calibration("wina-transform[basis=learned]")
  sp = variants.parse("wina[c_sites=all]-transform-attn[basis=learned;basis_sparsity=0.65]")
  assert (sp.settings, sp.scope) == ((("c_sites", "all"),), "attn")
  assert sp.transform_settings == (("basis", "learned"), ("basis_sparsity", 0.65))
  assert variants.parse("teal-transform[basis=axis]").transform_settings == (("basis", "axis"),)
  bad_t = {
    "wina-transform[basis=lapack]": "unknown basis 'lapack'",
    "wina-transform[foo=1]": "unknown transform",
    "wina-transform[basis_sparsity=1.5]": "must be in",
    "wina-transform[basis=axis]x": "malformed",
  }
  for spec, msg in bad_t.items():
    with pytest.raises(ValueError, match=msg):
      variants.parse(spec)
  assert variants.needs_calibration("wina", mode="threshold") and not variants.needs_calibration(
    "dense", "threshold"
  )


def test_settings_reach_make_and_calibrate(tiny, windows):
  params, cfg = tiny
  tokens = jnp.asarray(windows)
  official = variants.build(params, cfg, "wina", 0.5)
  everywhere = variants.build(params, cfg, "wina[c_sites=all]", 0.5)
  assert everywhere.sparsifier.method == sparsity.get_method("wina", c_sites="all")
  assert set(everywhere.sparsifier.state) == set(S.linear_sites(cfg)) != set(official.sparsifier.state)
  a = forward(params, tokens, cfg, official.sparsifier).logits
  b = forward(params, tokens, cfg, everywhere.sparsifier).logits
  assert _rel_delta(a, b) > 1e-3
  prep = variants.prepare(
    params, cfg, "wina[c_sites=all]", mode="threshold", calib_windows=windows, progress=False
  )
  assert variants.make(prep, 0.5, mode="threshold").sparsifier.method.c_sites == "all"
  (calib,) = prep.targets.values()  # upstream calibration: one per target
  assert calib.method == sparsity.get_method("wina", c_sites="all")


@pytest.mark.parametrize("scope,block", [("attn", "self_attn"), ("mlp", "mlp")])
def test_scoped_transform_keeps_dense_logits_and_rotates_only_its_blocks(tiny, windows, scope, block):
  params, cfg = tiny
  tokens = jnp.asarray(windows)
  v = variants.build(params, cfg, f"teal-transform-{scope}", 0.0)
  assert v.transformed and v.info["blocks"] == [(l, block) for l in range(cfg.num_hidden_layers)]
  assert v.info["shortcuts"] == 2 * cfg.num_hidden_layers - 1
  ref = forward(params, tokens, cfg).logits
  assert _rel_delta(ref, forward(v.params, tokens, v.cfg, v.sparsifier).logits) <= 1e-5
  assert _rotated(v.params, v.cfg) == v.info["blocks"]
  assert _rotated(params, cfg) == []


def test_block_errors_match_the_isolated_site_sums(tiny, windows):
  """The layer-by-layer block error equals the ratio of summed site errors from the full dense run."""
  params, cfg = tiny
  sp = sparsity.make("wina", params, cfg, 0.5)
  got = variants.block_errors(params, cfg, sp, windows, batch_size=2)  # 3 windows: batches of 2 and 1
  inputs = forward(params, jnp.asarray(windows), cfg, collect=("inputs",)).aux["inputs"]
  for (l, b), err in got.items():
    sums = [
      error_sums(
        *site_input(params, cfg, inputs, sp, S.site_name(l, b, p)),
        S.site_kernel(params, S.site_name(l, b, p)),
      )
      for p in S.block_sites(cfg, b)
    ]
    want = sum(float(s["actual"]) for s in sums) / sum(float(s["ref"]) for s in sums)
    assert err == pytest.approx(want, rel=1e-4) and err > 0


def test_auto_rotates_the_blocks_whose_error_drops(tiny, windows):
  params, cfg = tiny
  tokens = jnp.asarray(windows)
  prep = variants.prepare(params, cfg, "wina-transform-auto", calib_windows=windows, progress=False)
  v = variants.make(prep, 0.5)
  errors = prep.auto[0.5]["errors"]
  assert set(errors) == set(variants.all_blocks(cfg))
  want = sorted(blk for blk, (orig, trans) in errors.items() if trans < (1 - variants.AUTO_RTOL) * orig)
  assert v.info["blocks"] == want and _rotated(v.params, v.cfg) == want
  assert v.transformed == bool(want)
  assert v.info["errors"] == {f"layers.{l}.{b}": list(e) for (l, b), e in errors.items()}
  # the errors are the isolated block errors of the method's top-k masks on each params
  full_p, full_c = prep.full
  assert errors[(1, "mlp")][1] == pytest.approx(
    variants.block_errors(full_p, full_c, sparsity.make("wina", full_p, full_c, 0.5), windows)[(1, "mlp")],
    rel=1e-6,
  )
  # target 0: nothing rotates and the variant is the dense model itself
  v0 = variants.make(prep, 0.0)
  assert v0.params is params and not v0.transformed and v0.info["blocks"] == []
  np.testing.assert_array_equal(
    forward(params, tokens, cfg).logits, forward(v0.params, tokens, v0.cfg, v0.sparsifier).logits
  )
  # CATS masks SiLU(gate), which the rotation leaves unchanged: no block is worth rotating
  cats = variants.make(
    variants.prepare(params, cfg, "cats-transform-auto", calib_windows=windows, progress=False), 0.5
  )
  assert cats.info["blocks"] == [] and not cats.transformed
  with pytest.raises(ValueError, match="calibration windows"):
    variants.prepare(params, cfg, "teal-transform-auto")


def test_auto_transforms_and_calibrates_exactly_the_chosen_blocks(tiny, windows, monkeypatch):
  """With a mixed choice (errors stubbed per block), the variant rotates those blocks, keeps the dense
  logits, and threshold mode calibrates on those params; a new target re-chooses."""
  params, cfg = tiny
  tokens = jnp.asarray(windows)
  calls = []

  def fake_errors(p, c, sp, w, **kw):
    calls.append(sp.k)
    rotated = "residual_mlp" in p["layers"]["0"]
    worse = {(0, "self_attn"), (1, "mlp")} if len(calls) <= 2 else set()  # second target: all better
    return {blk: 1.0 if not rotated else (2.0 if blk in worse else 0.5) for blk in variants.all_blocks(c)}

  monkeypatch.setattr(variants, "block_errors", fake_errors)
  prep = variants.prepare(
    params, cfg, "teal-transform-auto", mode="threshold", calib_windows=windows, progress=False
  )
  v = variants.make(prep, 0.5, mode="threshold")
  assert v.info["blocks"] == [(0, "mlp"), (1, "self_attn")] == _rotated(v.params, v.cfg)
  assert v.sparsifier.mode == "threshold"
  assert prep.targets[(tuple(v.info["blocks"]), 0.5, "uniform")].fingerprint == sparsity.fingerprint(
    v.params, v.cfg
  )
  dense_v = variants.make(prep, 0.0, mode="threshold")
  assert (
    _rel_delta(forward(dense_v.params, tokens, dense_v.cfg).logits, forward(v.params, tokens, v.cfg).logits)
    <= 1e-5
  )
  assert variants.make(prep, 0.5, mode="threshold").info["blocks"] == v.info["blocks"] and len(calls) == 2
  v2 = variants.make(prep, 0.6, mode="threshold")
  assert (
    len(calls) == 4
    and v2.info["blocks"] == sorted(variants.all_blocks(cfg))
    and len(prep.built) <= variants.AUTO_CACHE
  )


def test_threshold_mode_calibrates_each_target_under_the_sparse_upstream(tiny, windows):
  """Default: thresholds per target from the sparse upstream, so on the calibration windows every site
  zeroes the target fraction; upstream=False shares dense statistics across targets."""
  from wina_jax.sparsity import layerwise

  params, cfg = tiny
  prep = variants.prepare(params, cfg, "teal", mode="threshold", calib_windows=windows, progress=False)
  assert prep.calibration is None
  for target in (0.4, 0.6):
    v = variants.make(prep, target)
    zf = layerwise.zero_frac(params, cfg, v.sparsifier, windows)
    np.testing.assert_allclose([zf[s] for s in v.sparsifier.method.sites(cfg)], target, atol=0.02)
  assert len(prep.targets) == 2
  dense = variants.prepare(
    params, cfg, "teal", mode="threshold", calib_windows=windows, progress=False, upstream=False
  )
  assert dense.calibration is not None and variants.make(dense, 0.6).sparsifier.mode == "threshold"
  assert not dense.targets

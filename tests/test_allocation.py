"""Allocation: uniform, and TEAL's greedy per-layer path (reaches the target, beats uniform on SmolLM2)."""

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model

from wina_jax import sites as S
from wina_jax import sparsity as sp
from wina_jax.convert import from_transformers
from wina_jax.data.text import load_texts
from wina_jax.model import forward


def _check_path(p, max_effective, step=0.05):
  n = len(p.sites)
  assert p.sparsities.shape == (len(p.effective), n) and len(p.error) == len(p.baseline) == len(p.effective)
  assert (p.sparsities[0] == 0).all() and p.effective[0] == 0 and p.error[0] == 0
  inc = np.diff(p.sparsities, axis=0)
  assert ((inc > 0).sum(axis=1) == 1).all()  # one site raised per step
  for r, j in enumerate(inc.argmax(axis=1)):  # by 0.05 / weight, capped at max_site = 0.99
    prev = p.sparsities[r, j]
    assert inc[r, j] == pytest.approx(min(prev + step / p.weights[j], 0.99) - prev)
  np.testing.assert_allclose(p.effective, p.sparsities @ p.weights / p.weights.sum(), atol=1e-12)
  assert p.effective[-1] >= max_effective and p.effective[-2] < max_effective
  assert (p.sparsities < 1).all()


def test_greedy_path_on_tiny_model():
  params, cfg = from_transformers(make_hf_model("llama_gqa_tied"))
  windows = np.random.RandomState(0).randint(0, cfg.vocab_size, (4, 32))
  calib = sp.calibrate(params, cfg, sp.get_method("teal"), windows, progress=False)
  paths = sp.greedy(params, cfg, calib, windows, max_effective=0.6, progress=False)
  assert sorted(paths) == list(range(cfg.num_hidden_layers))
  counts = sp.site_weights(cfg)
  for layer, p in paths.items():
    assert p.sites == tuple(s for s in S.linear_sites(cfg) if s.startswith(f"layers.{layer}."))
    np.testing.assert_allclose(p.weights / p.weights[0], [counts[s] / counts[p.sites[0]] for s in p.sites])
    _check_path(p, 0.6)
  picked = sp.pick(paths, 0.4)
  max_inc = max(np.diff(p.effective).max() for p in paths.values())
  for p in paths.values():
    eff = sum(w * picked[s] for s, w in zip(p.sites, p.weights)) / p.weights.sum()
    assert abs(eff - 0.4) <= max_inc / 2 + 1e-9
  with pytest.raises(ValueError, match="rerun the allocation"):
    sp.pick(paths, 0.8)
  calib.paths = paths
  spars = sp.make("teal", params, cfg, 0.4, mode="threshold", calibration=calib, allocation="greedy")
  for site, v in picked.items():
    assert float(spars.thresholds[site]) == pytest.approx(calib.threshold(site, v), rel=1e-6)
  out = forward(params, jnp.asarray(windows), cfg, spars, collect=("zero_frac",))
  assert sp.parameter_weighted_sparsity(out.aux["zero_frac"], cfg) == pytest.approx(0.4, abs=0.08)
  assert sp.uniform(sp.get_method("cats"), cfg, 0.3) == {s: 0.3 for s in S.act_sites(cfg)}


def test_greedy_bad_inputs():
  params, cfg = from_transformers(make_hf_model("llama_gqa_tied"))
  windows = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 16))
  calib = sp.calibrate(params, cfg, sp.get_method("teal"), windows, progress=False)
  with pytest.raises(ValueError, match="needs one float sparsity and calibration"):
    sp.make("teal", params, cfg, 0.4, mode="threshold", calibration=calib, allocation="greedy")
  with pytest.raises(ValueError, match="unknown allocation"):
    sp.make("teal", params, cfg, 0.4, allocation="clever")
  with pytest.raises(ValueError, match=r"outside \[0, 1\)"):
    sp.greedy(params, cfg, calib, windows, max_effective=1.2)


@pytest.mark.parametrize("name", ["wina"])
def test_greedy_beats_uniform_on_smollm2(smollm2, smollm2_tokenizer, name):
  params, cfg = smollm2
  windows = sp.windows_from_text(smollm2_tokenizer, load_texts("boolq:calibration"), 64, 2)
  calib = sp.calibrate(params, cfg, sp.get_method(name), windows, progress=False)
  target = 0.5
  paths = sp.greedy(params, cfg, calib, windows, layers=[2, 17], max_effective=target, progress=False)
  picked = sp.pick(paths, target)
  for layer, p in paths.items():
    _check_path(p, target)
    r = int(np.argmin(np.abs(p.effective - target)))
    assert abs(p.effective[r] - target) <= np.diff(p.effective).max() / 2 + 1e-9
    eff = sum(w * picked[s] for s, w in zip(p.sites, p.weights)) / p.weights.sum()
    assert eff == pytest.approx(p.effective[r])
    # at every recorded effective sparsity the greedy choice is no worse than uniform
    assert p.error[r] <= p.baseline[r] * (1 + 1e-6), (layer, p.error[r], p.baseline[r])
    assert np.mean(p.error[1:] <= p.baseline[1:] * (1 + 1e-6)) >= 0.9
    assert p.baseline[r] > 0

"""Noise bands with known answers: bootstrap widths, paired verdicts, and the exact weight perturbation."""

import jax
import numpy as np
import pytest

from wina_jax.eval import bands


def test_bootstrap_of_a_constant_has_zero_width_and_a_spread_sample_does_not():
  assert bands.bootstrap_ppl([2.0] * 10, [7] * 10) == pytest.approx((np.exp(2.0), np.exp(2.0)), rel=1e-12)
  assert bands.bootstrap_mean([1] * 50) == (1.0, 1.0)
  rng = np.random.default_rng(0)
  rows = rng.integers(0, 2, 400)
  lo, hi = bands.bootstrap_mean(rows)
  se = np.sqrt(rows.mean() * (1 - rows.mean()) / len(rows))  # normal approximation: +-1.96 se
  assert lo < rows.mean() < hi and (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_bootstrap_ppl_weights_windows_by_their_tokens():
  # one long window of NLL 1 and one short of NLL 3: the point estimate is token-weighted
  assert bands.ppl_of([1.0, 3.0], [300, 100]) == pytest.approx(np.exp(1.5))
  lo, hi = bands.bootstrap_ppl([1.0, 3.0], [300, 100], n_boot=4000)
  assert lo == pytest.approx(np.exp(1.0)) and hi == pytest.approx(np.exp(3.0))  # all-short / all-long draws


def test_paired_comparison_far_outside_is_real_inside_is_not():
  rng = np.random.default_rng(1)
  a = rng.normal(3.0, 0.3, 64)  # per-window mean NLLs, very different across windows
  tok = [255] * 64
  shifted = {"values": a + 0.05, "tokens": tok, "runs": [1.0, 1.0]}
  base = {"values": a, "tokens": tok, "runs": [1.0, 1.0]}
  c = bands.compare(base, {**shifted, "runs": [bands.ppl_of(a + 0.05, tok)] * 2})
  # a constant paired shift: the paired interval is narrow although the windows vary a lot
  assert c.diff == pytest.approx(np.exp(a.mean() + 0.05) - np.exp(a.mean()), rel=1e-9)
  assert c.sampling[0] > 0 and c.verdict == "real"
  noise = {"values": a + rng.normal(0, 0.05, 64), "tokens": tok}
  c = bands.compare({**base, "runs": [20.0, 21.0]}, {**noise, "runs": [20.5, 21.5]})
  assert c.sampling[0] < 0 < c.sampling[1] and c.verdict == "within noise"
  # outside the sampling band but inside the numerics band: still noise
  c = bands.compare({**base, "runs": [19.0, 25.0]}, {**shifted, "runs": [20.0, 26.0]})
  assert c.sampling[0] > 0 and c.numerics == (20.0 - 25.0, 26.0 - 19.0) and c.verdict == "within noise"
  rows_a = np.zeros(200)
  assert bands.compare({"values": rows_a}, {"values": rows_a + 1}).verdict == "real (sampling only)"
  with pytest.raises(ValueError, match="same windows"):
    bands.compare({"values": a}, {"values": a[:3]})


def test_bootstrap_avg_of_identical_groups_matches_one_group_with_their_rows_pooled_in_width():
  rows = np.random.default_rng(2).integers(0, 2, 300)
  lo, hi = bands.bootstrap_avg([rows, rows])  # two independent resamplings: width / sqrt(2)
  one_lo, one_hi = bands.bootstrap_mean(rows)
  assert (hi - lo) == pytest.approx((one_hi - one_lo) / np.sqrt(2), rel=0.15)
  assert bands.bootstrap_avg([[1] * 5, [0] * 9]) == (0.5, 0.5)


def test_numerics_band():
  assert bands.numerics_band([1.0, 3.0, 2.0]) == {"min": 1.0, "max": 3.0, "std": 1.0, "n": 3}


@pytest.fixture(scope="module")
def tiny():
  from conftest import make_hf_model

  from wina_jax.convert import from_transformers

  return from_transformers(make_hf_model("llama_mha"))


def _is_scaled(w: np.ndarray, p: np.ndarray, eps: float) -> np.ndarray:
  """Per element: whether p is w times (1 + eps) or (1 - eps), each factor rounded to w's dtype."""
  up, down = (np.asarray(1 + eps, w.dtype), np.asarray(1 - eps, w.dtype))
  return (p == w * up) | (p == w * down)


def test_perturbation_is_the_stated_relative_amount_and_keeps_the_dense_model_close(tiny):
  from wina_jax.eval.perplexity import perplexity

  params, cfg = tiny
  for eps in (1e-3, bands.EPS):
    pert = bands.perturb(params, seed=3, eps=eps)
    for w, p in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(pert)):
      w, p = np.asarray(w), np.asarray(p)
      assert np.all(_is_scaled(w, p, eps))  # w * (1 +- eps) in w's dtype
      if eps == 1e-3:
        assert 0.4 < np.mean((p - w) / np.where(w == 0, 1, w) > 0) < 0.6  # random signs
  again = bands.perturb(params, seed=3)
  other = bands.perturb(params, seed=4)
  leaves = zip(jax.tree_util.tree_leaves(pert), jax.tree_util.tree_leaves(again))
  assert all(np.array_equal(a, b) for a, b in leaves)  # seeded
  assert not np.array_equal(other["lm_head"]["kernel"], pert["lm_head"]["kernel"])
  moved = np.mean(np.asarray(pert["lm_head"]["kernel"]) != np.asarray(params["lm_head"]["kernel"]))
  assert moved > 0.5  # ~1 ulp moves most weights
  windows = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
  base = perplexity(params, cfg, windows, progress=False)["ppl"]
  got = perplexity(pert, cfg, windows, progress=False)["ppl"]
  assert got == pytest.approx(base, rel=1e-5)  # dense: within float noise
  moved_ppl = perplexity(bands.perturb(params, 3, eps=1e-3), cfg, windows, progress=False)["ppl"]
  assert moved_ppl != base and moved_ppl == pytest.approx(base, rel=1e-2)  # the weights really moved
  with pytest.raises(ValueError, match="eps"):
    bands.perturb(params, 0, eps=0.0)

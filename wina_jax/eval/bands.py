"""Noise floors for every comparison: a numerics band (ulp-level weight perturbations) and a sampling band
(bootstrap over windows / rows), and a paired comparison of two methods that is "real" only outside both.

Numerics band. Sparse models are chaotic under float rounding: inputs 1e-7 apart choose different masks a
few layers later. `perturb` multiplies every floating weight by (1 + eps * r), r = +-1 random per element
(eps = 6e-8 is about one float32 ulp at 1); re-running a cell on several seeds gives each metric a spread
(`numerics_band`: min..max and std over the unperturbed run and the seeds).

Sampling band. Perplexity is exp(sum of NLL / sum of tokens) over windows; `bootstrap_ppl` resamples whole
windows (with their token counts) and reports the 95 % percentile interval. Accuracy is the mean of per-row
correctness; `bootstrap_mean` resamples rows.

Comparison. `compare` takes two methods scored on the same windows (or rows): the paired bootstrap of the
difference b - a (same resampled indices for both) gives the sampling interval of the difference, and the
two numerics bands give its numerics interval [min b - max a, max b - min a]. The verdict is "real" when
0 lies outside both intervals, else "within noise". Few seeds give a narrow numerics band: the verdict is
only as strict as the number of seeds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

EPS = 6e-8  # relative weight perturbation: ~1 float32 ulp at 1 (2^-24 = 5.96e-8)
LEVEL = 0.95
N_BOOT = 2000


@jax.jit
def _perturb_leaf(w: jax.Array, key: jax.Array, eps: float) -> jax.Array:
  up = jax.random.bernoulli(key, 0.5, w.shape)
  return w * jnp.where(up, (1 + eps) * jnp.ones((), w.dtype), (1 - eps) * jnp.ones((), w.dtype))


def perturb(params: dict, seed: int, eps: float = EPS) -> dict:
  """params with every floating leaf w -> w * f, f = (1 + eps) or (1 - eps) in the leaf's dtype, drawn per
  element (seeded by `seed` and the leaf's position); integer leaves unchanged. In float32, 1 +- 6e-8
  rounds to 1 + 2^-23 and 1 - 2^-24: a nudge of at most one ulp (the reference ensembles' perturbation,
  `docs/reference_reproduction.md`)."""
  if not eps > 0:
    raise ValueError(f"eps must be > 0 (a relative perturbation, e.g. {EPS}), got {eps}")
  leaves, tree = jax.tree_util.tree_flatten(params)
  key = jax.random.PRNGKey(seed)
  out = [
    _perturb_leaf(w, jax.random.fold_in(key, i), eps)
    if jnp.issubdtype(jnp.asarray(w).dtype, jnp.floating)
    else w
    for i, w in enumerate(leaves)
  ]
  return jax.tree_util.tree_unflatten(tree, out)


def _indices(n: int, n_boot: int, seed: int) -> np.ndarray:
  """[n_boot, n] resampled indices (with replacement)."""
  if n < 1:
    raise ValueError("nothing to bootstrap: need at least one window / row")
  return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _interval(samples: np.ndarray, level: float) -> tuple[float, float]:
  lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
  return float(lo), float(hi)


def _ppl(nll_sums: np.ndarray, tokens: np.ndarray) -> np.ndarray:
  return np.exp(nll_sums.sum(axis=-1) / tokens.sum(axis=-1))


def ppl_of(window_nll: Sequence[float], tokens: Sequence[int]) -> float:
  """exp(total NLL / total tokens) from per-window mean NLLs [N] and token counts [N]."""
  m, t = np.asarray(window_nll, np.float64), np.asarray(tokens, np.float64)
  return float(_ppl(m * t, t))


def bootstrap_ppl(
  window_nll: Sequence[float],
  tokens: Sequence[int],
  *,
  n_boot: int = N_BOOT,
  level: float = LEVEL,
  seed: int = 0,
) -> tuple[float, float]:
  """`level` percentile interval of perplexity over windows resampled with replacement.

  window_nll [N]: mean next-token NLL per window; tokens [N]: predictions per window."""
  m, t = np.asarray(window_nll, np.float64), np.asarray(tokens, np.float64)
  idx = _indices(len(m), n_boot, seed)
  return _interval(_ppl((m * t)[idx], t[idx]), level)


def bootstrap_mean(
  values: Sequence[float], *, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0
) -> tuple[float, float]:
  """`level` percentile interval of the mean of `values` [N] (e.g. per-row correctness 0/1)."""
  v = np.asarray(values, np.float64)
  return _interval(v[_indices(len(v), n_boot, seed)].mean(axis=-1), level)


def bootstrap_avg(
  groups: Sequence[Sequence[float]], *, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0
) -> tuple[float, float]:
  """`level` interval of the average over groups of each group's mean (e.g. the average accuracy over
  tasks), every group's rows resampled independently."""
  if not groups:
    raise ValueError("no groups to average")
  means = [
    np.asarray(g, np.float64)[_indices(len(g), n_boot, seed + i)].mean(axis=-1) for i, g in enumerate(groups)
  ]
  return _interval(np.mean(means, axis=0), level)


def numerics_band(values: Sequence[float]) -> dict:
  """{'min', 'max', 'std', 'n'} of one metric over the unperturbed run and its perturbed re-runs."""
  v = np.asarray(values, np.float64)
  if v.size == 0:
    raise ValueError("no runs to make a numerics band from")
  return {
    "min": float(v.min()),
    "max": float(v.max()),
    "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
    "n": int(v.size),
  }


@dataclasses.dataclass(frozen=True)
class Comparison:
  """b - a on the same windows / rows: the difference, its paired-bootstrap interval, its numerics
  interval (None without perturbed runs) and the verdict ('real' | 'within noise')."""

  diff: float
  sampling: tuple[float, float]
  numerics: Optional[tuple[float, float]]
  verdict: str


def _outside(x: float, band: tuple[float, float]) -> bool:
  return x < band[0] or x > band[1]


def compare(a: dict, b: dict, *, n_boot: int = N_BOOT, level: float = LEVEL, seed: int = 0) -> Comparison:
  """Paired comparison of two methods' samples of one metric.

  a, b: {'values': [N] per-window mean NLLs or per-row correctness, 'tokens': [N] (perplexity only; absent
  for a mean), 'runs': metric over the unperturbed run and its perturbed re-runs (optional)}. Windows or
  rows must be the same in both. Without runs the verdict rests on the sampling interval alone and says so
  ('real (sampling only)')."""
  va, vb = np.asarray(a["values"], np.float64), np.asarray(b["values"], np.float64)
  if va.shape != vb.shape:
    raise ValueError(f"paired comparison needs the same windows / rows: {va.shape} vs {vb.shape}")
  idx = _indices(len(va), n_boot, seed)
  if "tokens" in a:
    ta, tb = np.asarray(a["tokens"], np.float64), np.asarray(b["tokens"], np.float64)
    if not np.array_equal(ta, tb):
      raise ValueError("paired perplexity comparison needs the same token counts per window")
    diff = float(_ppl(vb * tb, tb) - _ppl(va * ta, ta))
    boot = _ppl((vb * tb)[idx], tb[idx]) - _ppl((va * ta)[idx], ta[idx])
  else:
    diff = float(vb.mean() - va.mean())
    boot = vb[idx].mean(axis=-1) - va[idx].mean(axis=-1)
  sampling = _interval(boot, level)
  numerics = None
  if a.get("runs") and b.get("runs"):
    numerics = (float(min(b["runs"]) - max(a["runs"])), float(max(b["runs"]) - min(a["runs"])))
  real = _outside(0.0, sampling) and (numerics is None or _outside(0.0, numerics))
  verdict = "within noise" if not real else "real" if numerics is not None else "real (sampling only)"
  return Comparison(diff, sampling, numerics, verdict)

"""What a calibration produces, and how a target reads it (pure: no model run).

`Calibration`: per-site score quantiles of one method on one model (a site's threshold for sparsity s is
its s-quantile) and optional greedy allocation paths (`GreedyPath`, one per layer); `pick` takes, per
layer, the path row closest to a target. Produced by `sparsity.calibration.calibrate` and
`sparsity.allocation.greedy` (which run the model); saved / loaded by `sparsity.store`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from typing import Optional

import numpy as np
from flax import traverse_util

from wina_jax.config import ModelConfig
from wina_jax.sparsity.base import Method, check_sparsity

N_LEVELS = 1025


@dataclasses.dataclass
class Calibration:
  """Per-site score quantiles of one method on one model.

  levels: [L] in [0, 1]; quantiles: {site: [L]} score quantile at each level; fingerprint: `fingerprint`
  of the params it was computed on; tokens: calibration tokens seen; paths: optional greedy allocation
  paths {layer: `GreedyPath`}.
  """

  method: Method
  fingerprint: str
  levels: np.ndarray
  quantiles: dict
  tokens: int
  paths: Optional[dict] = None

  def threshold(self, site: str, s: float) -> float:
    """Score threshold zeroing a fraction `s` of the site's calibration scores (-inf at s = 0)."""
    s = check_sparsity(s, f"sparsity[{site!r}]")
    if site not in self.quantiles:
      raise ValueError(
        f"no calibration statistics for site {site!r}; calibrated sites are e.g. {sorted(self.quantiles)[:3]}"
      )
    return -math.inf if s == 0 else float(np.interp(s, self.levels, self.quantiles[site]))

  def thresholds(self, sparsities: dict) -> dict:
    return {site: self.threshold(site, s) for site, s in sparsities.items()}

  def check_method(self, method: Method) -> None:
    if method != self.method:
      raise ValueError(f"this calibration is for {self.method!r}, not {method!r}; calibrate that method")


def fingerprint(params: dict, cfg: ModelConfig) -> str:
  """Short hash of the config and the params (shapes, sums and a strided sample of every tensor)."""
  h = hashlib.sha256(repr(cfg).encode())
  for path, leaf in sorted(traverse_util.flatten_dict(params, sep="/").items()):
    a = np.asarray(leaf, np.float32).ravel()
    h.update(f"{path}{a.shape}".encode())
    h.update(np.float64(a.sum(dtype=np.float64)).tobytes())
    h.update(a[:: max(1, a.size // 4096)].tobytes())
  return h.hexdigest()[:20]


@dataclasses.dataclass
class GreedyPath:
  """One layer's greedy path. sites: (n,) site names; weights: [n]; sparsities: [R, n] per-site
  sparsity after each step (row 0 all zero); effective: [R]; error: [R] layer-output error of the row;
  baseline: [R] error of uniform sparsity at the same effective sparsity."""

  sites: tuple
  weights: np.ndarray
  sparsities: np.ndarray
  effective: np.ndarray
  error: np.ndarray
  baseline: np.ndarray


def pick(paths: Mapping[int, GreedyPath], target: float) -> dict[str, float]:
  """{site: s}: per layer, the path row whose effective sparsity is closest to `target`."""
  check_sparsity(target, "target sparsity")
  out = {}
  for layer, p in paths.items():
    if target > p.effective[-1] + 1e-9 and len(p.effective) > 1:
      raise ValueError(
        f"layer {layer}'s greedy path ends at effective sparsity {p.effective[-1]:.3f} < "
        f"{target}; rerun the allocation with max_effective >= {target}"
      )
    r = int(np.argmin(np.abs(p.effective - target)))
    out.update({s: float(v) for s, v in zip(p.sites, p.sparsities[r])})
  return out

"""Calibration: score statistics of the dense model, and thresholds for any target sparsity.

`calibrate` runs the dense forward over calibration windows, scores every site's inputs with the
method's score, keeps a random sample of each site's scores and stores their quantile table. A site's
threshold for sparsity s is the s-quantile of its scores: keeping scores > t zeroes a fraction s of the
calibration inputs. Save / load with `wina_jax.sparsity.store`.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from tqdm.auto import tqdm

from wina_jax import sites as S
from wina_jax.config import ModelConfig
from wina_jax.data.text import token_windows
from wina_jax.sparsity.base import Method, check_sparsity

N_LEVELS = 1025


@dataclasses.dataclass
class Calibration:
  """Per-site score quantiles of one method on one model.

  levels: [L] in [0, 1]; quantiles: {site: [L]} score quantile at each level; fingerprint: `fingerprint`
  of the params it was computed on; tokens: calibration tokens seen; paths: optional greedy allocation
  paths {layer: `allocation.GreedyPath`}.
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
      raise ValueError(f"no calibration statistics for site {site!r}; calibrated sites are e.g. "
                       f"{sorted(self.quantiles)[:3]}")
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


def windows_from_text(tokenizer, texts: list[str], seq_len: int, max_windows: Optional[int] = None) -> np.ndarray:
  """Calibration windows [N, seq_len] from texts; a clear error when the text is empty or too short."""
  try:
    return token_windows(tokenizer, texts, seq_len, max_windows)
  except ValueError as e:
    raise ValueError(f"cannot calibrate: {e}. Pass calibration text (e.g. 'boolq:calibration' or a "
                     "non-empty text file) with at least one window of tokens") from e


@functools.partial(jax.jit, static_argnames=("cfg", "method", "sites", "n"))
def _sample_scores(params, tokens, valid, state, key, cfg, method, sites, n):
  """n random scores per site from the first `valid` windows of `tokens` [B, T] -> {site: [n]}."""
  from wina_jax.model import forward   # calibration drives the model; the sparsifier itself never does
  inputs = forward(params, tokens, cfg, collect=("inputs",)).aux["inputs"]
  out = {}
  for i, site in enumerate(sites):
    score = method.score(site, inputs[site], state.get(site)).astype(jnp.float32).ravel()
    per_window = score.size // tokens.shape[0]
    idx = jax.random.randint(jax.random.fold_in(key, i), (n,), 0, valid * per_window)
    out[site] = score[idx]
  return out


def calibrate(params: dict, cfg: ModelConfig, method: Method, windows: np.ndarray, *, batch_size: int = 4,
              samples_per_site: int = 2 ** 17, seed: int = 0, progress: bool = True) -> Calibration:
  """Score statistics of `method` over `windows` [N, T] (dense forward, every token counted)."""
  windows = np.asarray(windows)
  if windows.ndim != 2 or windows.size == 0:
    raise ValueError(f"cannot calibrate on empty windows (shape {windows.shape}); pass [N, T] token "
                     "windows from `windows_from_text` with N, T >= 1")
  sites = tuple(method.sites(cfg))
  batch_size = min(batch_size, len(windows))
  state = method.state(params, cfg)
  n_batches = math.ceil(len(windows) / batch_size)
  n = max(1, math.ceil(samples_per_site / n_batches))
  key = jax.random.PRNGKey(seed)
  samples = {s: [] for s in sites}
  for b in tqdm(range(n_batches), desc=f"calibrate {method.name}", disable=not progress):
    batch = windows[b * batch_size:(b + 1) * batch_size]
    valid = len(batch)
    batch = np.concatenate([batch, np.resize(batch, (batch_size - valid, batch.shape[1]))])  # fixed shape
    out = _sample_scores(params, jnp.asarray(batch), valid, state, jax.random.fold_in(key, b), cfg, method,
                         sites, n)
    keep = n * valid // batch_size   # every window contributes the same number of samples
    for s in sites:
      samples[s].append(np.asarray(out[s])[:keep])
  levels = np.linspace(0.0, 1.0, N_LEVELS)
  quantiles = {s: np.quantile(np.concatenate(v), levels).astype(np.float32) for s, v in samples.items()}
  return Calibration(method, fingerprint(params, cfg), levels, quantiles, int(windows.size))

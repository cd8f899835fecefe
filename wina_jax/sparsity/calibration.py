"""Calibration: runs the dense model to collect score statistics, for thresholds at any target sparsity.

`calibrate` runs the dense forward over calibration windows, scores every site's inputs with the
method's score, keeps a random sample of each site's scores and stores their quantile table. A site's
threshold for sparsity s is the s-quantile of its scores: keeping scores > t zeroes a fraction s of the
calibration inputs (`thresholds.Calibration`). Save / load with `wina_jax.sparsity.store`.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from wina_jax.config import ModelConfig
from wina_jax.data.text import token_windows
from wina_jax.model import decoder_layer_aux
from wina_jax.sparsity import layerwise
from wina_jax.sparsity.base import Method, ScoreSparsifier
from wina_jax.sparsity.registry import Sparsities, get_method, site_sparsities
from wina_jax.sparsity.thresholds import N_LEVELS, Calibration, fingerprint


def windows_from_text(
  tokenizer, texts: list[str], seq_len: int, max_windows: Optional[int] = None
) -> np.ndarray:
  """Calibration windows [N, seq_len] from texts; a clear error when the text is empty or too short."""
  try:
    return token_windows(tokenizer, texts, seq_len, max_windows)
  except ValueError as e:
    raise ValueError(
      f"cannot calibrate: {e}. Pass calibration text (e.g. 'boolq:calibration' or a "
      "non-empty text file) with at least one window of tokens"
    ) from e


@functools.partial(jax.jit, static_argnames=("cfg", "sites", "n"))
def _layer_samples(lp, h, valid, sparsifier, key, cfg, sites, n):
  """{local site: [n] random scores of its inputs in one layer on `h` [B, T, d] under `sparsifier`,
  drawn from the first `valid` windows}."""
  _, aux = decoder_layer_aux(cfg, lp, h, 0, sparsifier, collect=("inputs",))
  samples = {}
  for i, site in enumerate(sites):
    score = sparsifier.score(site, aux["inputs"][site]).astype(jnp.float32).ravel()
    per_window = score.size // h.shape[0]
    idx = jax.random.randint(jax.random.fold_in(key, i), (n,), 0, valid * per_window)
    samples[site] = score[idx]
  return samples


def calibrate(
  params: dict,
  cfg: ModelConfig,
  method: Union[str, Method],
  windows: np.ndarray,
  *,
  upstream: Optional[Sparsities] = None,
  batch_size: int = 4,
  samples_per_site: int = 2**17,
  seed: int = 0,
  progress: bool = True,
) -> Calibration:
  """Score statistics of `method` over `windows` [N, T] (every token counted), layer by layer with one
  compiled layer function. `method`: a `Method` or a registered name ('teal', 'wina', 'cats', ...).

  upstream: None (default, as TEAL): every site sees the dense model's inputs, and the thresholds serve
    any target. A target (float or {site: s}): each site's inputs come from the model with every site
    before it (earlier layers, and earlier sites of its layer) sparsified at that target with the
    thresholds calibrated so far, so thresholds for that target absorb the shift upstream sparsity
    causes and the achieved sparsity lands on the target.
  """
  method = get_method(method) if isinstance(method, str) else method
  windows = np.asarray(windows)
  if windows.ndim != 2 or windows.size == 0:
    raise ValueError(
      f"cannot calibrate on empty windows (shape {windows.shape}); pass [N, T] token "
      "windows from `windows_from_text` with N, T >= 1"
    )
  sites = method.sites(cfg)
  targets = site_sparsities(method, cfg, 0.0 if upstream is None else upstream)
  state = method.state(params, cfg)
  batch_size = min(batch_size, len(windows))
  n_batches = math.ceil(len(windows) / batch_size)
  n = max(1, math.ceil(samples_per_site / n_batches))
  key = jax.random.PRNGKey(seed)
  levels = np.linspace(0.0, 1.0, N_LEVELS)
  batches, valid = [], []
  for b in range(n_batches):
    batch = windows[b * batch_size : (b + 1) * batch_size]
    valid.append(len(batch))
    batch = np.concatenate(
      [batch, np.resize(batch, (batch_size - len(batch), batch.shape[1]))]
    )  # fixed shape
    batches.append(layerwise.embed_tokens(params, batch, cfg))
  quantiles = {}
  for layer in tqdm(range(cfg.num_hidden_layers), desc=f"calibrate {method.name}", disable=not progress):
    here = layerwise.layer_sites(sites, layer)
    local = tuple(layerwise.local_site(s) for s in here)
    lstate = layerwise.local_state(state, here)
    lp, lcfg = params["layers"][str(layer)], cfg.layer_config(layer)
    # dense: one pass; upstream: one pass per input group, earlier groups of the layer already masked
    groups = (
      [here]
      if upstream is None
      else [
        [s for s in here if layerwise.input_group(s) == g]
        for g in dict.fromkeys(map(layerwise.input_group, here))
      ]
    )
    th = {l: jnp.asarray(-jnp.inf, jnp.float32) for l in local}
    for group in groups:
      names = [layerwise.local_site(s) for s in group]
      sp = ScoreSparsifier(method=method, mode="threshold", thresholds=dict(th), state=lstate)
      samples = {s: [] for s in group}
      for b, h in enumerate(batches):
        out = _layer_samples(
          lp, h, valid[b], sp, jax.random.fold_in(jax.random.fold_in(key, b), layer), lcfg, local, n
        )  # all sites sampled (one compile), the group's kept
        for s, l in zip(group, names):
          samples[s].append(np.asarray(out[l])[: n * valid[b] // batch_size])  # equal samples per window
      for s, l in zip(group, names):
        quantiles[s] = np.quantile(np.concatenate(samples[s]), levels).astype(np.float32)
        th[l] = jnp.asarray(
          Calibration(method, "", levels, quantiles, 0).threshold(s, targets[s]), jnp.float32
        )
    if upstream is None:
      batches = [layerwise.dense_layer(lp, h, lcfg) for h in batches]
    else:
      sp = ScoreSparsifier(method=method, mode="threshold", thresholds=th, state=lstate)
      batches = [layerwise.sparse_layer(lp, h, sp, lcfg) for h in batches]
  return Calibration(method, fingerprint(params, cfg), levels, quantiles, int(windows.size))

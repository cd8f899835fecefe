"""TEAL's greedy per-layer (block-wise) sparsity allocation across sites (runs the model).

Greedy, for each decoder layer on saved calibration inputs (the residual entering the layer):
weights w_j = parameters behind site j / hidden_size^2; effective sparsity = sum w_j s_j / sum w_j.
Starting from all s_j = 0, every step tries raising each site by 0.05 / w_j (thresholds from the
calibration quantiles) and keeps the raise with the least layer-output error (mean per-token l2 error
over the last 25% of tokens, vs the dense layer), until the effective sparsity reaches `max_effective`.
The recorded path serves any target: `thresholds.pick` takes, per layer, the row closest to it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from wina_jax.config import ModelConfig
from wina_jax.model import decoder_layer
from wina_jax.sparsity import layerwise
from wina_jax.sparsity.base import ScoreSparsifier, check_sparsity
from wina_jax.sparsity.measure import site_weights
from wina_jax.sparsity.thresholds import Calibration, GreedyPath


@functools.partial(jax.jit, static_argnames=("cfg", "method", "sites", "start"))
def _errors(lp, h, target, thresholds, state, cfg, method, sites, start):
  """Mean per-token l2 error over tokens >= start of the layer under each row of thresholds [C, n]."""

  def one(th):
    sp = ScoreSparsifier(method=method, mode="threshold", thresholds=dict(zip(sites, th)), state=state)
    out = decoder_layer(cfg, lp, h, 0, sp)  # sites renamed to layer 0, cfg the layer's (layer_config)
    return jnp.mean(jnp.linalg.norm((out - target)[:, start:].astype(jnp.float32), axis=-1))

  return jax.vmap(one)(thresholds)


def greedy(
  params: dict,
  cfg: ModelConfig,
  calib: Calibration,
  windows: np.ndarray,
  *,
  layers: Optional[Sequence[int]] = None,
  max_effective: float = 0.9,
  step: float = 0.05,
  max_site: float = 0.99,
  last_fraction: float = 0.25,
  progress: bool = True,
) -> dict[int, GreedyPath]:
  """Greedy paths {layer: GreedyPath} for `calib.method` on `windows` [N, T] (calibration text)."""
  check_sparsity(max_effective, "max_effective")
  if not 0 < last_fraction <= 1:
    raise ValueError(f"last_fraction={last_fraction} must be in (0, 1]")
  method = calib.method
  state_all = method.state(params, cfg)
  start = int(windows.shape[1] * (1 - last_fraction))
  wanted = set(range(cfg.num_hidden_layers) if layers is None else layers)
  counts = site_weights(cfg)
  paths = {}
  todo = layerwise.residuals(params, cfg, windows, upto=max(wanted) + 1)
  for layer, h in tqdm(todo, total=max(wanted) + 1, desc=f"greedy {method.name}", disable=not progress):
    sites = layerwise.layer_sites(method.sites(cfg), layer)
    if layer not in wanted or not sites:
      continue
    lp, lcfg = params["layers"][str(layer)], cfg.layer_config(layer)
    w = np.asarray([counts[s] / cfg.hidden_size**2 for s in sites])
    errors = functools.partial(
      _errors,
      lp,
      h,
      layerwise.dense_layer(lp, h, lcfg),
      state=layerwise.local_state(state_all, sites),
      cfg=lcfg,
      method=method,
      sites=tuple(layerwise.local_site(s) for s in sites),
      start=start,
    )

    def run(rows, uniform_at):
      """Errors of each row of sparsities [n, n] plus uniform sparsity `uniform_at` (one fixed shape)."""
      rows = np.concatenate([rows, np.full((1, len(sites)), min(uniform_at, max_site))])
      th = [[calib.threshold(s, v) for s, v in zip(sites, r)] for r in rows]
      e = np.asarray(errors(jnp.asarray(th, jnp.float32)))
      return e[:-1], float(e[-1])

    cur = np.zeros(len(sites))
    rows, effs, errs, bases = [cur], [0.0], [0.0], []
    while effs[-1] < max_effective and (cur < max_site).any():
      cands = np.repeat(cur[None], len(sites), axis=0)
      for j in range(len(sites)):
        cands[j, j] = min(cur[j] + step / w[j], max_site)
      e, base = run(cands, effs[-1])
      bases.append(base)  # uniform error at the previous row's effective sparsity
      j = int(np.argmin(np.where(cur < max_site, e, np.inf)))
      cur = cands[j]
      rows.append(cur)
      effs.append(float(w @ cur / w.sum()))
      errs.append(float(e[j]))
    bases.append(run(np.repeat(cur[None], len(sites), axis=0), effs[-1])[1])
    paths[layer] = GreedyPath(
      tuple(sites), w, np.asarray(rows), np.asarray(effs), np.asarray(errs), np.asarray(bases)
    )
  return paths

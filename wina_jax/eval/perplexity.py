"""Perplexity over fixed-length windows, batched and jitted."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from wina_jax import sites as S
from wina_jax.config import ModelConfig
from wina_jax.model import jit_forward


def window_nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Summed next-token NLL per window: logits [B, T, V], tokens [B, T] -> [B] (T-1 predictions each)."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0].sum(axis=-1)


def perplexity(
  params: dict,
  cfg: ModelConfig,
  windows: np.ndarray,
  sparsifier: Any = S.dense,
  *,
  batch_size: int = 8,
  dense_prefix: Optional[int] = None,
  progress: bool = True,
  zero_frac: bool = False,
) -> dict:
  """exp(mean NLL) over `windows` [N, T]; returns {'ppl', 'nll', 'tokens', 'window_nll'} (window_nll [N]:
  each window's mean NLL per predicted token, what bootstrap bands resample).

  dense_prefix: the first positions of every window run dense (TEAL/WINA evaluate this way).
  zero_frac: also return 'zero_frac' {site: fraction of zeroed inputs over sparse tokens}, averaged
    over windows (what `wina_jax.sparsity.parameter_weighted_sparsity` turns into measured sparsity).
  """
  windows = np.asarray(windows)
  if windows.ndim != 2 or len(windows) == 0 or windows.shape[1] < 2:
    raise ValueError(f"windows must be [N >= 1, T >= 2] token ids, got shape {windows.shape}")
  total, count, fracs, per_window = 0.0, 0, {}, []
  nll_fn = jax.jit(window_nll)
  collect = ("zero_frac",) if zero_frac else ()
  for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress, leave=False):
    batch = windows[i : i + batch_size]
    pad = batch_size - len(batch)
    toks = jnp.asarray(np.pad(batch, ((0, pad), (0, 0))))  # fixed batch shape: one compile
    out = jit_forward(params, toks, cfg, sparsifier, dense_prefix=dense_prefix, collect=collect)
    nll = np.asarray(nll_fn(out.logits, toks))[: len(batch)]
    total += float(nll.sum())
    per_window.extend((nll.astype(np.float64) / (windows.shape[1] - 1)).tolist())
    count += len(batch) * (windows.shape[1] - 1)
    for site, v in out.aux.get("zero_frac", {}).items():
      fracs[site] = fracs.get(site, 0.0) + float(v) * len(batch) / len(windows)
  res = {"ppl": float(np.exp(total / count)), "nll": total / count, "tokens": count, "window_nll": per_window}
  if zero_frac:
    res["zero_frac"] = fracs
  return res

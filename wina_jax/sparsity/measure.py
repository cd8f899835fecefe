"""Measured model-level sparsity: the fraction of linear-layer weights a sparse forward can skip.

From `forward(..., collect=("zero_frac",))` ({site: fraction of zeroed inputs over sparse tokens}):
a zeroed input i of a linear site skips row i of its kernel; a zeroed MLP activation (CATS) also skips
the matching up_proj output column (down_proj's input already shows the zero). Embeddings and lm_head
are not counted.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from wina_jax import families
from wina_jax import sites as S
from wina_jax.config import ModelConfig


def site_weights(cfg: ModelConfig) -> dict[str, int]:
  """Parameters each site's mask can skip: d_in * d_out at linear sites; at `act`, the up-projection
  columns (d * I) and down_proj rows (I * d) it zeroes."""
  out = dict(S.site_param_counts(cfg))
  for site in S.act_sites(cfg):
    out[site] = 2 * cfg.hidden_size * cfg.intermediate_size
  return out


def per_matrix_sparsity(zero_frac: Mapping[str, float], cfg: ModelConfig) -> dict[str, float]:
  """{linear site: skipped fraction of its kernel}. up_proj (or the up half of gate_up_proj) combines
  its input sparsity a and the activation sparsity b as 1 - (1 - a)(1 - b), exact when either is 0."""
  zf = {k: float(np.asarray(v)) for k, v in zero_frac.items()}
  up, cols = families.get(cfg.model_type).locate(cfg, "mlp", "up_proj")
  up_share = (cols.stop - cols.start) / families.proj_shapes(cfg)["mlp"][up][1]  # gate_up: the up half
  out = {}
  for site in S.linear_sites(cfg):
    layer, block, proj = S.parse_site(site)
    a = zf.get(site, 0.0)
    b = zf.get(S.site_name(layer, "mlp", S.ACT), 0.0)
    if block == "mlp" and proj == up:  # the up columns also skip where the activation is zero
      a = (1 - up_share) * a + up_share * (1 - (1 - a) * (1 - b))
    out[site] = a
  return out


def parameter_weighted_sparsity(zero_frac: Mapping[str, float], cfg: ModelConfig) -> float:
  """Model-level sparsity: sum over linear kernels of params * skipped fraction / all linear params."""
  counts = S.site_param_counts(cfg)
  frac = per_matrix_sparsity(zero_frac, cfg)
  return float(sum(counts[s] * frac[s] for s in counts) / sum(counts.values()))


def target_sparsity(sparsities: Mapping[str, float], cfg: ModelConfig) -> float:
  """The model-level sparsity intended by per-site targets {site: s} (linear or act sites; others 0):
  sum of s * `site_weights` / all linear params (ignores overlaps of an act mask with down_proj's own)."""
  w = site_weights(cfg)
  return float(sum(w[s] * v for s, v in sparsities.items()) / sum(S.site_param_counts(cfg).values()))

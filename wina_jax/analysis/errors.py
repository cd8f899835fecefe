"""Site-by-site errors of a sparsifier, isolated (dense inputs) or propagated (inputs of the sparse run).

A linear site's error compares its output on the unmasked input x with its output on the masked input
xs = sparsifier(site, x, kernel). At down_proj, x = act * up and the MLP activation's mask (CATS masks
`layers.i.mlp.act`) counts as part of the site: xs = sparsifier(down, where(act kept, x, 0), kernel).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from wina_jax import families
from wina_jax import sites as S
from wina_jax.analysis.metrics import column_orthogonality_defect, error_sums, logit_kl
from wina_jax.config import ModelConfig
from wina_jax.model import Output, forward

HI = jax.lax.Precision.HIGHEST


def dense_run(params: dict, cfg: ModelConfig, tokens: jax.Array) -> Output:
  """Dense forward on tokens [B, T] that collects every site's input (the isolated mode's inputs)."""
  return forward(params, tokens, cfg, collect=("inputs",))


def _up(params: dict, cfg: ModelConfig, layer: int, inputs: dict, sparsifier: Any) -> jax.Array:
  """up_proj output [..., I] from its recorded input, masked by `sparsifier` at the up (or gate_up) site."""
  proj, cols = families.get(cfg.model_type).locate(cfg, "mlp", "up_proj")
  site = S.site_name(layer, "mlp", proj)
  lin = params["layers"][str(layer)]["mlp"][proj]
  y = jnp.matmul(sparsifier(site, inputs[site], lin["kernel"]), lin["kernel"], precision=HI)
  y = y + lin["bias"] if "bias" in lin else y
  return y[..., cols]


def site_input(
  params: dict, cfg: ModelConfig, inputs: dict, sparsifier: Any, site: str, *, propagated: bool = False
) -> tuple[jax.Array, jax.Array]:
  """(x, xs) [..., d_in] at linear `site` from recorded `inputs` ({site: dense-side input}).

  propagated: the inputs come from the sparse run, so down_proj's `up` factor is recomputed with the
  up site masked as in that run (isolated mode keeps every other site dense).
  """
  layer, block, proj = S.parse_site(site)
  kernel = S.site_kernel(params, site)
  if proj != "down_proj":
    x = inputs[site]
    return x, sparsifier(site, x, kernel)
  act_site = S.site_name(layer, "mlp", S.ACT)
  act = inputs[act_site]
  x = act * _up(params, cfg, layer, inputs, sparsifier if propagated else S.dense)
  kept = sparsifier(act_site, act, None) != 0
  return x, sparsifier(site, jnp.where(kept, x, jnp.zeros((), x.dtype)), kernel)


def _relative(sums: dict, drift: Optional[jax.Array]) -> dict[str, float]:
  ref = float(sums["ref"])
  actual, lemma = float(sums["actual"]) / ref, float(sums["lemma"]) / ref
  row = {"rel_actual": actual, "rel_lemma": lemma, "gap": actual - lemma, "dropped": float(sums["dropped"])}
  if drift is not None:
    row["rel_drift"] = float(drift)
  return row


def site_errors(
  params: dict,
  cfg: ModelConfig,
  inputs: dict,
  sparsifier: Any,
  sites: Optional[Sequence[str]] = None,
  *,
  propagated: bool = False,
  dense_inputs: Optional[dict] = None,
) -> dict[str, dict[str, float]]:
  """{site: {'rel_actual', 'rel_lemma', 'gap', 'dropped'[, 'rel_drift']}} over linear `sites` (default all).

  rel_actual = sum ||(x - xs) K||^2 / sum ||x K||^2 over tokens; rel_lemma the same ratio for Lemma 3.1's
  sum_i (x_i - xs_i)^2 ||c_i||^2; gap = rel_actual - rel_lemma (the cross terms).
  dense_inputs: the dense run's inputs; adds rel_drift = sum ||x_dense K - xs K||^2 / sum ||x_dense K||^2,
  the site's output error against the dense model including errors flowing from earlier sites.
  """
  out = {}
  for site in sites or S.linear_sites(cfg):
    x, xs = site_input(params, cfg, inputs, sparsifier, site, propagated=propagated)
    kernel = S.site_kernel(params, site)
    drift = None
    if dense_inputs is not None:
      d = error_sums(dense_inputs[site], xs, kernel)
      drift = d["actual"] / d["ref"]
    out[site] = _relative(error_sums(x, xs, kernel), drift)
  return out


def isolated(
  params: dict, cfg: ModelConfig, dense: Output, sparsifier: Any, sites: Optional[Sequence[str]] = None
) -> dict[str, dict[str, float]]:
  """Errors with every site fed the dense model's input (`dense` from `dense_run`); see `site_errors`."""
  return site_errors(params, cfg, dense.aux["inputs"], sparsifier, sites)


def propagated(
  params: dict,
  cfg: ModelConfig,
  tokens: jax.Array,
  dense: Output,
  sparsifier: Any,
  sites: Optional[Sequence[str]] = None,
) -> tuple[dict[str, dict[str, float]], float]:
  """Errors on the inputs of the sparse run (errors flow), with rel_drift against `dense`; and the
  final-logit KL(dense || sparse) in nats per token."""
  run = forward(params, tokens, cfg, sparsifier, collect=("inputs",))
  rows = site_errors(
    params, cfg, run.aux["inputs"], sparsifier, sites, propagated=True, dense_inputs=dense.aux["inputs"]
  )
  return rows, logit_kl(dense.logits, run.logits)


def orthogonality_defects(
  params: dict, cfg: ModelConfig, sites: Optional[Sequence[str]] = None
) -> dict[str, float]:
  """{site: column-orthogonality defect of its kernel} (`metrics.column_orthogonality_defect`)."""
  return {
    s: column_orthogonality_defect(np.asarray(S.site_kernel(params, s))) for s in sites or S.linear_sites(cfg)
  }

"""Sparsifier sites and the callback protocol the model calls at each of them.

A *site* is the input of one linear layer, or the MLP activation, named by its parameter path with
dots: `layers.3.self_attn.k_proj`, `layers.3.mlp.down_proj`, `layers.3.mlp.act` (the SiLU(gate)
that CATS thresholds). The projections of a block come from the model family (`families.proj_shapes`):
Phi-3 has `qkv_proj` and `gate_up_proj` instead of q/k/v and gate/up.

The model knows sparsifiers only through `Sparsifier`: a callable `(site, x, kernel) -> x_masked`.
A sparsifier may also define `linear(site, x, kernel) -> y` to compute the masked matmul itself
(a fused GPU kernel); the model then calls that instead of `mask @ kernel`.
"""

from __future__ import annotations

from typing import Optional, Protocol, runtime_checkable

import jax

from wina_jax import families
from wina_jax.config import ModelConfig

ACT = "act"


@runtime_checkable
class Sparsifier(Protocol):
  """Masks the input of a site. `x`: [..., d_in]; `kernel`: [d_in, d_out] or None at `act` sites."""

  def __call__(self, site: str, x: jax.Array, kernel: Optional[jax.Array]) -> jax.Array: ...


def dense(site: str, x: jax.Array, kernel: Optional[jax.Array]) -> jax.Array:
  """The identity sparsifier (the model's default)."""
  del site, kernel
  return x


def block_sites(cfg: ModelConfig, block: str) -> tuple[str, ...]:
  """Linear projection names of one block ('self_attn' or 'mlp') in forward order."""
  shapes = families.proj_shapes(cfg)
  if block not in shapes:
    raise ValueError(f"unknown block {block!r}; expected one of {tuple(shapes)}")
  return tuple(shapes[block])


def site_name(layer: int, block: str, proj: str) -> str:
  return f"layers.{layer}.{block}.{proj}"


def linear_sites(cfg: ModelConfig) -> list[str]:
  """Every linear site of the model, in forward order (lm_head is never sparsified)."""
  return [
    site_name(l, b, p)
    for l in range(cfg.num_hidden_layers)
    for b, projs in families.proj_shapes(cfg).items()
    for p in projs
  ]


def act_sites(cfg: ModelConfig) -> list[str]:
  return [site_name(l, "mlp", ACT) for l in range(cfg.num_hidden_layers)]


def parse_site(site: str) -> tuple[int, str, str]:
  """'layers.3.mlp.down_proj' -> (3, 'mlp', 'down_proj'). Raises on malformed names."""
  parts = site.split(".")
  if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit():
    raise ValueError(f"malformed site name {site!r}; expected 'layers.<i>.<block>.<proj>'")
  return int(parts[1]), parts[2], parts[3]


def site_kernel(params: dict, site: str) -> jax.Array:
  """The [d_in, d_out] kernel whose input is `site`."""
  layer, block, proj = parse_site(site)
  return params["layers"][str(layer)][block][proj]["kernel"]


def site_param_counts(cfg: ModelConfig) -> dict[str, int]:
  """Weights of each linear site: d_in * d_out."""
  shapes = families.proj_shapes(cfg)
  return {
    site_name(l, b, p): d_in * d_out
    for l in range(cfg.num_hidden_layers)
    for b, projs in shapes.items()
    for p, (d_in, d_out) in projs.items()
  }

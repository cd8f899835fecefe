"""Built-in methods: dense, teal (|x|), wina (|x| * column norm), cats (|act(gate)| at the MLP act).

Each declares what the fast decode kernels compute for it (`fast_scale`, `wina_jax.sparsity.fastpath`):
exact masks in float32 for all three.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from wina_jax import families
from wina_jax import sites as S
from wina_jax.config import ModelConfig
from wina_jax.sparsity.base import Method
from wina_jax.sparsity.fastpath import FastScale
from wina_jax.sparsity.registry import register

# Projections whose column norms WINA's official code uses (c = 1 elsewhere): the transform's key
# projections; the fused Phi-3 projections stand in for k_proj and gate_proj, their norms taken over the
# whole fused kernel.
OFFICIAL_C_PROJS = families.key_projections()
C_SITES = ("official", "all")


@register("dense")
@dataclasses.dataclass(frozen=True)
class Dense(Method):
  """Masks nothing."""

  def sites(self, cfg: ModelConfig) -> list[str]:
    return []


@register("teal")
@dataclasses.dataclass(frozen=True)
class Teal(Method):
  """TEAL (Liu et al. 2024): keep the largest |x_i| at every linear site."""

  def fast_scale(self, site: str, state: Optional[jax.Array]) -> FastScale:
    return FastScale()  # |x| > t


@register("wina")
@dataclasses.dataclass(frozen=True)
class Wina(Method):
  """WINA: keep the largest |x_i| * c_i, c_i = ||kernel[i, :]||_2 (torch `weight.norm(dim=0)`).

  c_sites: 'official' uses c only at k_proj and gate_proj (c = 1 elsewhere, as the reference code);
  'all' uses c at every linear site.
  """

  c_sites: str = "official"

  def __post_init__(self):
    if self.c_sites not in C_SITES:
      raise ValueError(f"wina c_sites={self.c_sites!r} is unknown; choose from {C_SITES}")

  def uses_c(self, site: str) -> bool:
    return self.c_sites == "all" or S.parse_site(site)[2] in OFFICIAL_C_PROJS

  def state(self, params: dict, cfg: ModelConfig) -> dict[str, jax.Array]:
    return {s: column_norms(S.site_kernel(params, s)) for s in self.sites(cfg) if self.uses_c(s)}

  def score(self, site: str, x: jax.Array, state: Optional[jax.Array]) -> jax.Array:
    return jnp.abs(x) if state is None else jnp.abs(x) * state.astype(x.dtype)

  def fast_scale(self, site: str, state: Optional[jax.Array]) -> FastScale:
    return FastScale(scale=state)  # |x| * c > t; plain |x| where c is not used


@register("cats")
@dataclasses.dataclass(frozen=True)
class Cats(Method):
  """CATS (Lee et al. 2024): zero the MLP activation SiLU(gate) (GELU(gate) in GeGLU models) where it is
  small.

  Masks only `layers.i.mlp.act`; down_proj's input act * up inherits the zeros.
  """

  def sites(self, cfg: ModelConfig) -> list[str]:
    return S.act_sites(cfg)

  def fast_scale(self, site: str, state: Optional[jax.Array]) -> FastScale:
    """|act| > t, exact; the act site has no kernel, so the fused sparsifier masks the activation with an
    XLA select and down_proj runs dense: CATS gets its masks on the fast path, not a sparse kernel."""
    return FastScale()


def column_norms(kernel: jax.Array) -> jax.Array:
  """c_i = l2 norm of the weights input i multiplies: kernel [d_in, d_out] -> [d_in] float32."""
  return jnp.linalg.norm(kernel.astype(jnp.float32), axis=1)

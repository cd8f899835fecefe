"""Score-based sparsifiers: a `Method` scores each input entry, a `ScoreSparsifier` keeps the best.

A method (frozen, hashable dataclass) says which sites it masks, what per-site state it precomputes
from params (e.g. WINA's column norms) and how it scores an input `x: [..., d_in]`. The sparsifier is a
`flax.struct.dataclass` pytree applying one of two modes per site:
  - 'topk': keep the k = round((1 - s) * d_in) highest scores of every token (`keep_count`'s k_rule='floor'
    gives the official code's int(d_in * (1 - s))); k is a traced int32 per site, so every sparsity level
    and allocation runs through one compiled program (`select.topk_mask`: lax.top_k's mask, by value);
  - 'threshold': keep entries whose score is > a calibrated per-site threshold (a traced scalar, so new
    thresholds never retrace a jitted forward).
Sites a sparsifier does not name are returned untouched. A sparsifier never imports the model.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import struct

from wina_jax import sites as S
from wina_jax.config import ModelConfig
from wina_jax.sparsity.fastpath import FastScale
from wina_jax.sparsity.select import topk_mask

MODES = ("topk", "threshold")


@dataclasses.dataclass(frozen=True)
class Method:
  """Base class of a sparsification method; subclass, override, and `@register('name')` it.

  Fields of a subclass are the method's settings (static, hashable: they key the jit cache).
  """

  name: ClassVar[str] = ""

  def sites(self, cfg: ModelConfig) -> list[str]:
    """Sites this method masks (default: every linear site)."""
    return S.linear_sites(cfg)

  def state(self, params: dict, cfg: ModelConfig) -> dict[str, jax.Array]:
    """Per-site arrays the score needs, precomputed once from params (default: none)."""
    del params, cfg
    return {}

  def score(self, site: str, x: jax.Array, state: Optional[jax.Array]) -> jax.Array:
    """Non-negative importance of every entry of `x` [..., d_in] -> [..., d_in] (default |x|)."""
    del site, state
    return jnp.abs(x)

  def fast_scale(self, site: str, state: Optional[jax.Array]) -> Optional[FastScale]:
    """What the fast decode kernels (`|x| * scale > t`) compute for this score at `site`: a `FastScale`
    (the score is outer(|x| * scale)), or None, undeclared (the default): the fast path refuses the method.
    Raise `fastpath.FastPathError(reason)` to refuse with a reason (`wina_jax.sparsity.fastpath`)."""
    del site, state
    return None


def check_sparsity(s: float, what: str = "sparsity") -> float:
  """Validate one target sparsity: a float in [0, 1)."""
  s = float(s)
  if not 0.0 <= s < 1.0:
    raise ValueError(f"{what}={s} is outside [0, 1); pass the fraction of inputs to zero, e.g. 0.5")
  return s


K_RULES = ("round", "floor")


def keep_count(s: float, d_in: int, k_rule: str = "round") -> int:
  """Entries kept per token at sparsity `s`, at least 1: 'round' -> round((1 - s) * d_in) (the project's
  default); 'floor' -> int(d_in * (1 - s)), the official TEAL/WINA code's rule (one fewer at e.g. 40 %)."""
  if k_rule not in K_RULES:
    raise ValueError(f"unknown k_rule {k_rule!r}; choose from {K_RULES}")
  return max(1, int(round((1.0 - s) * d_in)) if k_rule == "round" else int(d_in * (1.0 - s)))


@struct.dataclass
class ScoreSparsifier:
  """A `wina_jax.sites.Sparsifier` for any `Method`, in 'topk' or 'threshold' mode.

  k: {site: int32 scalar} kept entries per token in top-k mode (traced: new k values reuse the compiled
  program). thresholds: {site: scalar} for threshold mode (traced). state: {site: array} from
  `method.state` (e.g. WINA column norms [d_in]), traced. impl: top-k selection (`select.IMPLS`; None = the
  backend's default).
  """

  method: Method = struct.field(pytree_node=False)
  mode: str = struct.field(pytree_node=False)
  k: dict = struct.field(default_factory=dict)
  thresholds: dict = struct.field(default_factory=dict)
  state: dict = struct.field(default_factory=dict)
  impl: Optional[str] = struct.field(pytree_node=False, default=None)

  def score(self, site: str, x: jax.Array) -> jax.Array:
    return self.method.score(site, x, self.state.get(site))

  def mask(self, site: str, x: jax.Array) -> Optional[jax.Array]:
    """Boolean keep-mask for `x` [..., d_in] at `site`, or None where the site stays dense."""
    if self.mode == "topk":
      k = self.k.get(site)
      return None if k is None else topk_mask(self.score(site, x), k, self.impl)
    t = self.thresholds.get(site)
    if t is None:
      return None
    return self.score(site, x) > t

  def __call__(self, site: str, x: jax.Array, kernel: Optional[jax.Array]) -> jax.Array:
    del kernel  # column norms are precomputed in `state`, never re-read from the weights here
    m = self.mask(site, x)
    return x if m is None else jnp.where(m, x, jnp.zeros((), x.dtype))

"""What the fast decode path may compute for a method: its kernels keep `|x| * scale > t` (float32) only.

A method declares, per site, the scale its score reduces to with `Method.fast_scale(site, state)`:
`FastScale(scale, outer)` says the score is `outer(|x| * scale)` with `outer` non-decreasing on float32
(strictly increasing in real arithmetic; None = the identity). Then

  score > t   <=>   |x| * scale > t',   t' = the largest float32 u >= 0 with outer(u) <= t

(`invert`, a bisection over float32 bit patterns; -inf when outer(0) > t already: keep everything). The
masks are then equal bit for bit whenever the score is computed as `outer(|x| * scale)` in float32 (the
kernel's product, then `outer`; `FastScale.score` does exactly that). A score written another way that is
equal in real arithmetic (x**2 * c for (|x| * sqrt(c))**2) maps too, but the two roundings can disagree
where the score lies within a few ulps of t: such entries may flip. In bfloat16 a method's own score is
rounded to bfloat16 and the kernels' is not, so the masks agree only up to that rounding.

`fast_state(sp)` turns a threshold-mode `ScoreSparsifier` into the kernels' (thresholds, scales) or raises
`FastPathError` naming the method and the reason: a method that declares nothing (`fast_scale` returns
None, the default), a `fast_scale` inherited from a class above the one that defines `score` (it describes
another score), a refusal the method raises itself, or top-k mode. Never a silent substitute.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

import jax
import jax.numpy as jnp

if TYPE_CHECKING:
  from wina_jax.sparsity.base import ScoreSparsifier

_INF_BITS = 0x7F800000  # float32 +inf; non-negative floats order like their bit patterns


class FastPathError(ValueError):
  """The fast path cannot compute a method's masks; the message names the method and the reason."""


@dataclasses.dataclass(frozen=True, eq=False)
class FastScale:
  """A site's score as the kernels see it: `outer(|x| * scale)`.

  scale: [d_in] (None: ones, TEAL's |x|); outer: elementwise, non-decreasing on float32 (None: identity).
  """

  scale: Optional[jax.Array] = None
  outer: Optional[Callable[[jax.Array], jax.Array]] = None

  def score(self, x: jax.Array) -> jax.Array:
    """outer(|x| * scale) in float32, x: [..., d_in] -> [..., d_in]: a score the kernels reproduce exactly."""
    u = jnp.abs(x.astype(jnp.float32))
    u = u if self.scale is None else u * jnp.asarray(self.scale, jnp.float32)
    return u if self.outer is None else self.outer(u)

  def threshold(self, t: jax.Array) -> jax.Array:
    """The kernels' threshold t' for a score threshold t (module docstring)."""
    t = jnp.asarray(t, jnp.float32)
    return t if self.outer is None else invert(self.outer, t)


def invert(outer: Callable[[jax.Array], jax.Array], t: jax.Array) -> jax.Array:
  """Largest float32 u >= 0 with outer(u) <= t, elementwise over t [...] (-inf where there is none), for
  `outer` non-decreasing on float32: then outer(u) > t <=> u > invert(outer, t) for every float32 u >= 0."""
  t = jnp.asarray(t, jnp.float32)
  as_float = lambda bits: jax.lax.bitcast_convert_type(bits, jnp.float32)

  def step(_, lohi):  # invariant: outer(lo) <= t (lo = -1: none yet), outer(hi) > t (hi past +inf: none)
    lo, hi = lohi
    mid = lo + (hi - lo) // 2
    ok = outer(as_float(jnp.maximum(mid, 0))) <= t
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  lo = jnp.full(t.shape, -1, jnp.int32)
  hi = jnp.full(t.shape, _INF_BITS + 1, jnp.int32)
  lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
  return jnp.where(lo < 0, -jnp.inf, as_float(jnp.maximum(lo, 0)))


def _owners(cls: type, attr: str) -> list[type]:
  """The classes of `cls`'s MRO that define `attr`, most derived first (the last is `Method`'s default)."""
  return [c for c in cls.__mro__ if attr in vars(c)]


def method_name(method: Any) -> str:
  return method.name or type(method).__qualname__


def declaration(method: Any, site: str, state: Optional[jax.Array]) -> FastScale:
  """`method.fast_scale(site, state)`, checked; raises `FastPathError` where the fast path must refuse."""
  name, cls = method_name(method), type(method)
  scored, declarers = _owners(cls, "score")[0], _owners(cls, "fast_scale")
  declared = declarers[0]
  if len(declarers) > 1 and scored is not declared and issubclass(scored, declared):
    raise FastPathError(
      f"method {name!r} cannot run on the fast path: {scored.__qualname__} overrides `score` but inherits "
      f"`fast_scale` from {declared.__qualname__}, which describes another score; declare `fast_scale` in "
      f"{scored.__qualname__} (wina_jax.sparsity.fastpath says how)"
    )
  try:
    fs = method.fast_scale(site, state)
  except FastPathError as e:
    raise FastPathError(f"method {name!r} cannot run on the fast path at {site}: {e}") from None
  if fs is None:
    raise FastPathError(
      f"method {name!r} cannot run on the fast path: it does not declare `fast_scale`, and the kernels "
      "compute only |x| * scale > t. If its score is an increasing function of |x| * s, return "
      "FastScale(scale=s, outer=that function) from `fast_scale` (wina_jax.sparsity.fastpath); else run "
      "it with the model's mask-then-matmul path (no fused sparsifier)"
    )
  return fs


def fast_state(sp: ScoreSparsifier) -> tuple[dict, dict]:
  """A threshold-mode `ScoreSparsifier` -> (thresholds {site: float32 []}, scales {site: [d_in] float32}) of
  the kernels' `|x| * scale > t`, with the masks of `sp` (the rule in the module docstring); for
  `decode.fuse_state` or `FusedThresholdSparsifier.create`. Raises `FastPathError` where it cannot."""
  if sp.mode != "threshold" and sp.k:
    raise FastPathError(
      f"method {method_name(sp.method)!r} is in top-k mode; the fast path compares with calibrated "
      "thresholds: make the sparsifier with mode='threshold' and a calibration"
    )
  thresholds, scales = {}, {}
  for site, t in sp.thresholds.items():
    fs = declaration(sp.method, site, sp.state.get(site))
    thresholds[site] = fs.threshold(t)
    if fs.scale is not None:
      scales[site] = jnp.asarray(fs.scale, jnp.float32)
  return thresholds, scales

"""Per-token top-k masks with k as data: select the k-th largest score by value, not by sorting indices.

`topk_mask(score, k)` returns the mask `jax.lax.top_k` + scatter gives, bit for bit: the k highest scores of
every row, ties broken toward the lower index (top_k's documented rule). k may be a traced int32 (a scalar,
or one per row), so a sweep over sparsities reuses one compiled program.

How (impl):
  'radix'  the default ('radix:2' on CPUs, 'radix:16' elsewhere). Scores map to uint32 keys in the same order (`sort_keys`); each pass
           counts, per row, the keys >= each of `fanout - 1` pivots spread over the row's live key range and
           narrows the range to one slot (~log2(fanout) bits a pass, one read of the keys). When the range is
           one key t, the mask is key > t plus the first (k - #{key > t}) entries equal to t by index.
  'sort'   the k-th largest key from a sort of each row, then the same tie rule.
  'lax'    `lax.top_k` + scatter; k must be a Python int (it compiles one program per k).
Scores must not be NaN; -0.0 ranks below 0.0 (top_k's total order; a masked -0.0 or 0.0 changes no output).
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp

IMPLS = ("radix", "sort", "lax")
FANOUT = 16  # radix pivots per pass + 1: 8 passes pin a 32-bit key (measured choice: benchmarks, README)


_DEFAULT: list[Optional[str]] = [None]


def impl_problem(impl: str, *, traced_k: bool = False) -> Optional[str]:
  """Why `impl` ('radix[:F]' | 'sort' | 'lax') cannot select, or None; traced_k: k is data (a sparsifier's k,
  one program for every sparsity), which 'lax' cannot take."""
  name, _, fan = impl.partition(":")
  if name not in IMPLS:
    return f"is not a top-k impl; choose from {IMPLS} (radix takes ':fanout')"
  if fan and (name != "radix" or not fan.isdigit() or int(fan) < 2 or int(fan) & (int(fan) - 1)):
    return "takes a fanout only as radix:F, F a power of two >= 2"
  if traced_k and name == "lax":
    return "needs a static k (lax.top_k); here k is data: use radix[:F] or sort"
  return None


def set_default_impl(impl: Optional[str]) -> None:
  """Set the impl `default_impl` returns (None: by backend). Sparsifiers store the impl they were made
  with (a static field, so the jit cache keys on it): set this before `sparsity.make`."""
  if impl is not None and (why := impl_problem(impl)):
    raise ValueError(f"top-k impl {impl!r} {why}")
  _DEFAULT[0] = impl


def default_impl() -> str:
  """The set default, else 'radix:2' on a CPU (measured there: faster than 'sort', which beats lax.top_k),
  'radix' (fanout `FANOUT`) on accelerators."""
  return _DEFAULT[0] or ("radix:2" if jax.default_backend() == "cpu" else "radix")


def sort_keys(score: jax.Array) -> jax.Array:
  """uint32 keys in the total order of the float scores (-0.0 below 0.0, as top_k): [..., d] -> [..., d]."""
  bits = jax.lax.bitcast_convert_type(score.astype(jnp.float32), jnp.uint32)
  neg = (bits >> 31).astype(bool)
  return jnp.where(neg, ~bits, bits | jnp.uint32(0x80000000))


def _count_ge(keys: jax.Array, pivots: jax.Array) -> jax.Array:
  """#{keys >= pivot} per row and pivot: keys [N, d], pivots [N, P] -> [N, P] int32."""
  return jnp.sum((keys[:, None, :] >= pivots[:, :, None]).astype(jnp.int32), axis=-1)


def _kth_radix(keys: jax.Array, k: jax.Array, fanout: int) -> jax.Array:
  """The k-th largest key of each row: keys [N, d] uint32, k [N] int32 (1 <= k <= d) -> [N] uint32.

  Invariant: #{key >= lo} >= k and #{key > hi} < k, so the answer lies in [lo, hi]."""
  lo, hi = jnp.min(keys, axis=-1), jnp.max(keys, axis=-1)
  j = jnp.arange(1, fanout, dtype=jnp.uint32)
  passes = -(-32 // (fanout.bit_length() - 1)) + 1

  def one(_, bounds):
    lo, hi = bounds
    step = (hi - lo) // fanout + 1  # pivots lo + j * step, j = 1 .. fanout - 1 (no uint32 overflow)
    piv = jnp.minimum(lo[:, None] + j[None] * step[:, None], hi[:, None] + 1)  # non-NaN keys < 0xFF800001
    ok = _count_ge(keys, piv) >= k[:, None]  # non-increasing along j
    lo = jnp.maximum(lo, jnp.max(jnp.where(ok, piv, jnp.uint32(0)), axis=-1))
    hi = jnp.minimum(hi, jnp.min(jnp.where(ok, jnp.uint32(0xFFFFFFFF), piv - 1), axis=-1))
    return lo, hi

  lo, _ = jax.lax.fori_loop(0, passes, one, (lo, hi))
  return lo


def _kth_sort(keys: jax.Array, k: jax.Array) -> jax.Array:
  srt = jnp.sort(keys, axis=-1)
  return jnp.take_along_axis(srt, (keys.shape[-1] - k)[:, None], axis=-1)[:, 0]


def _mask_from_kth(keys: jax.Array, t: jax.Array, k: jax.Array, skip_ties: bool) -> jax.Array:
  """key > t, plus the first k - #{key > t} entries equal to t (lower index first): -> [N, d] bool.

  skip_ties: rank the ties (a cumsum over d) only when some row has more ties than places left, through
  `lax.cond` (accelerators: the common case costs no scan); else always rank them (CPUs: no conditional,
  whose stand-alone compile in eager mode crashed XLA's CPU backend once under load)."""
  gt = keys > t[:, None]
  eq = keys == t[:, None]
  need = k - jnp.sum(gt, axis=-1, dtype=jnp.int32)

  def ties(_):
    return gt | (eq & (jnp.cumsum(eq, axis=-1, dtype=jnp.int32) <= need[:, None]))

  if not skip_ties:
    return ties(None)
  partial = jnp.sum(eq, axis=-1, dtype=jnp.int32) > need
  return jax.lax.cond(jnp.any(partial), ties, lambda _: gt | eq, None)


def _lax_mask(flat: jax.Array, k: int) -> jax.Array:
  _, idx = jax.lax.top_k(flat, k)
  rows = jnp.arange(flat.shape[0])[:, None]
  return jnp.zeros(flat.shape, bool).at[rows, idx].set(True)


def topk_mask(
  score: jax.Array,
  k: Union[int, jax.Array],
  impl: Optional[str] = None,
  fanout: int = FANOUT,
  skip_ties: Optional[bool] = None,
) -> jax.Array:
  """Boolean mask [..., d] with the k highest scores of every row True (ties: lower index first).

  score: [..., d] float; k: int or int32 array, scalar or of shape score.shape[:-1], each in [1, d]
  (clipped there). impl: 'radix' | 'sort' | 'lax' (static k only), default `default_impl()`; 'radix:F'
  sets the fanout F (a power of two). skip_ties: rank tied scores only when needed, through `lax.cond`
  (default: on accelerators; the mask is the same either way)."""
  impl, _, fan = (impl or default_impl()).partition(":")
  fanout = int(fan) if fan else fanout
  if impl not in IMPLS:
    raise ValueError(f"unknown top-k impl {impl!r}; choose from {IMPLS}")
  d = score.shape[-1]
  flat = score.reshape(-1, d)
  if impl == "lax":
    if not isinstance(k, int):
      raise TypeError("impl='lax' needs a Python int k (lax.top_k's k is static); use 'radix' or 'sort'")
    return _lax_mask(flat, min(max(k, 1), d)).reshape(score.shape)
  if fanout < 2 or fanout & (fanout - 1):
    raise ValueError(f"fanout={fanout} must be a power of two >= 2")
  kk = jnp.clip(jnp.broadcast_to(jnp.asarray(k, jnp.int32), score.shape[:-1]).reshape(-1), 1, d)
  skip_ties = jax.default_backend() != "cpu" if skip_ties is None else skip_ties
  return _select(flat, kk, impl, fanout, skip_ties).reshape(score.shape)


@functools.partial(jax.jit, static_argnames=("impl", "fanout", "skip_ties"))
def _select(flat: jax.Array, k: jax.Array, impl: str, fanout: int, skip_ties: bool) -> jax.Array:
  """The mask of `topk_mask` for flat [N, d] scores and k [N] (one program: eager calls dispatch it whole,
  traced calls inline it)."""
  keys = sort_keys(flat)
  t = _kth_radix(keys, k, fanout) if impl == "radix" else _kth_sort(keys, k)
  return _mask_from_kth(keys, t, k, skip_ties)

"""Pallas (Triton backend) decode attention: one launch per layer for one new token per batch row.

One program per (batch row, KV head, group of `heads_per_program` of its G = H / K query heads) does, for
its query heads: RoPE on q and the new k (the
model's half-split rotary embedding on the first `rotary_dim` dims, with the inverse frequencies of
`layers.rope_inv_freq`, so rope scaling included), the KV-cache write of the new k, v at slot `length`,
then a flash-decoding loop over blocks of `block_s` cache slots before `length` (online softmax in
float32, the sliding window honoured), and finally the new token itself, taken from registers rather
than read back from the cache (no store-to-load ordering inside the program). The first program of each
KV head writes the cache; the others of that head read only slots before `length`, so no program waits on
another. The caches are aliased input -> output, so under a donated cache XLA updates them in place.
Splitting a KV head's query heads over programs (`heads_per_program` < G) trades re-reading its cache
blocks (from L2) for more programs and a shorter serial chain per program: batch-1 decode has only B * K
programs otherwise (4 for Qwen-2.5-7B).

Numerics: RoPE in the activations' dtype (as `layers.apply_rope`), scores, softmax and the value sum in
float32, the output cast to q's dtype. In float32 this equals `layers.attention` to rounding; in bf16 the
XLA path rounds scores and probabilities to bf16 and this kernel does not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from wina_jax.kernels.pallas_gemv import compiler_params

MAX_BATCH = 8  # batch rows the kernel is built for (decode); more go to the XLA path
_NEG = -1e30  # finite start of the running max: a fully masked block never makes exp(-inf + inf)


def supported(batch: int, tokens: int, head_dim: int) -> bool:
  """Whether the kernel takes this step: one token per row, batch <= MAX_BATCH, head_dim a power of two."""
  return tokens == 1 and batch <= MAX_BATCH and head_dim & (head_dim - 1) == 0


# Query heads per program when the caller names none. On the H200 (`attention_sweep`, 2026-12-01,
# benchmarks/results/attention_sweep_h200.json) one head per program was the fastest setting at every
# measured shape, batch (1, 8) and cache length (32, 511): e.g. Qwen-2.5-7B batch 1, 32 slots 13.9 us per
# layer vs 29.8 us with all 7 heads in one program and 37.3 us for XLA's ops.
HEADS_PER_PROGRAM = 1


def _kernel(
  len_ref,
  inv_ref,
  q_ref,
  kn_ref,
  vn_ref,
  kc_ref,
  vc_ref,
  o_ref,
  ko_ref,
  vo_ref,
  *,
  group: int,
  heads: int,
  head_dim: int,
  rotary_dim: int,
  block_s: int,
  window,
  scale: float,
  k_base: int,
  v_base: int,
):
  b, kh, hg = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  length = plgpu.load(len_ref.at[jnp.int32(0)])
  dims = jax.lax.iota(jnp.int32, head_dim)
  half = rotary_dim // 2
  rotary = dims < rotary_dim
  partner = jnp.where(dims < half, dims + half, jnp.where(rotary, dims - half, dims))
  sign = jnp.where(dims < half, -1.0, 1.0)
  ang = length.astype(jnp.float32) * plgpu.load(inv_ref.at[dims])
  cos = jnp.where(rotary, jnp.cos(ang), 1.0)
  sin = jnp.where(rotary, jnp.sin(ang) * sign, 0.0)

  def rope(ref, head):
    """`layers.apply_rope` of ref[b, head] [hd] at position `length`, in the ref's dtype."""
    x, xp = plgpu.load(ref.at[b, head, dims]), plgpu.load(ref.at[b, head, partner])
    return x * cos.astype(x.dtype) + xp * sin.astype(x.dtype)

  k_new = rope(kn_ref, k_base + kh).astype(ko_ref.dtype)
  v_new = plgpu.load(vn_ref.at[b, v_base + kh, dims]).astype(vo_ref.dtype)
  # the head's first program writes; a full cache is left alone, never overrun
  inside = (dims >= 0) & (length < ko_ref.shape[1]) & (hg == 0)
  plgpu.store(ko_ref.at[b, length, kh, dims], k_new, mask=inside)
  plgpu.store(vo_ref.at[b, length, kh, dims], v_new, mask=inside)
  head0 = kh * group + hg * heads  # this program's first query head
  qs = [rope(q_ref, head0 + g).astype(jnp.float32) for g in range(heads)]

  first = 0 if window is None else jnp.maximum(length - window + 1, 0)

  def body(j, carry):
    pos = j * block_s + jax.lax.iota(jnp.int32, block_s)
    valid = (pos < length) & (pos >= first)
    kb = plgpu.load(kc_ref.at[b, pos[:, None], kh, dims[None, :]], mask=valid[:, None], other=0).astype(
      jnp.float32
    )
    vb = plgpu.load(vc_ref.at[b, pos[:, None], kh, dims[None, :]], mask=valid[:, None], other=0).astype(
      jnp.float32
    )
    out = []
    for q, (m, l, acc) in zip(qs, carry):
      s = jnp.where(valid, jnp.sum(kb * q[None, :], axis=1) * scale, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s))
      p, alpha = jnp.exp(s - m_new), jnp.exp(m - m_new)
      out.append((m_new, l * alpha + jnp.sum(p), acc * alpha + jnp.sum(p[:, None] * vb, axis=0)))
    return tuple(out)

  init = tuple((jnp.float32(_NEG), jnp.float32(0.0), jnp.zeros((head_dim,), jnp.float32)) for _ in qs)
  carry = jax.lax.fori_loop(first // block_s, (length + block_s - 1) // block_s, body, init)
  kf, vf = k_new.astype(jnp.float32), v_new.astype(jnp.float32)
  for g, (q, (m, l, acc)) in enumerate(zip(qs, carry)):
    s = jnp.sum(q * kf) * scale  # the new token: always inside the window
    m_new = jnp.maximum(m, s)
    alpha, p = jnp.exp(m - m_new), jnp.exp(s - m_new)
    o = (acc * alpha + p * vf) / (l * alpha + p)
    plgpu.store(o_ref.at[b, head0 + g, dims], o.astype(o_ref.dtype))


@functools.partial(
  jax.jit,
  static_argnames=(
    "rotary_dim",
    "window",
    "scale",
    "block_s",
    "heads_per_program",
    "num_warps",
    "num_stages",
    "interpret",
  ),
)
def decode_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  cache_k: jax.Array,
  cache_v: jax.Array,
  length: jax.Array,
  inv_freq: jax.Array,
  *,
  rotary_dim: int,
  window=None,
  scale=None,
  block_s: int = 64,
  heads_per_program=None,
  num_warps: int = 4,
  num_stages: int = 2,
  interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """One decode step of attention, before RoPE: q [B, H, hd], k, v [B, K, hd] of the token at position
  `length` (int32 scalar), or packed: q [B, H + 2K, hd] (a fused q|k|v projection's output, reshaped: no XLA
  slices between it and this kernel) with k and v None; cache_k, cache_v [B, S, K, hd] with `length` valid
  slots; inv_freq
  [rotary_dim // 2] (`layers.rope_inv_freq`); window: the sliding window or None; scale: of the scores (None:
  hd ** -1/2); heads_per_program:
  query heads per program, a divisor of G = H / K (None: `HEADS_PER_PROGRAM`).
  -> (out [B, H, hd] in q's dtype, cache_k, cache_v with slot `length` written).
  """
  if (k is None) != (v is None):
    raise ValueError("give both k and v, or neither (q then packs q|k|v as [B, H + 2K, hd])")
  kheads = cache_k.shape[2]
  packed = k is None
  b, h, hd = q.shape[0], q.shape[1] - 2 * kheads * packed, q.shape[2]
  if packed:
    k = v = q  # the kernel reads k at heads H.., v at H + K..
  if not supported(b, 1, hd):
    raise ValueError(
      f"decode_attention takes batch <= {MAX_BATCH} and a power-of-two head_dim; got batch "
      f"{b}, head_dim {hd}: use the XLA attention"
    )
  if block_s & (block_s - 1):
    raise ValueError(f"block_s={block_s} must be a power of two")
  group = h // kheads
  hp = HEADS_PER_PROGRAM if heads_per_program is None else heads_per_program
  if group % hp:
    raise ValueError(f"heads_per_program={hp} must divide the {group} query heads per KV head")
  inv = jnp.zeros((hd,), jnp.float32).at[:rotary_dim].set(jnp.tile(inv_freq.astype(jnp.float32), 2))
  body = functools.partial(
    _kernel,
    group=group,
    heads=hp,
    head_dim=hd,
    rotary_dim=rotary_dim,
    block_s=block_s,
    window=window,
    scale=hd**-0.5 if scale is None else scale,
    k_base=h * packed,
    v_base=(h + kheads) * packed,
  )
  out_shape = (
    jax.ShapeDtypeStruct((b, h, hd), q.dtype),
    jax.ShapeDtypeStruct(cache_k.shape, cache_k.dtype),
    jax.ShapeDtypeStruct(cache_v.shape, cache_v.dtype),
  )
  call = pl.pallas_call(
    body,
    out_shape=out_shape,
    grid=(b, kheads, group // hp),
    interpret=interpret,
    input_output_aliases={5: 1, 6: 2},
    compiler_params=None if interpret else compiler_params(num_warps, num_stages),
    name="decode_attention",
  )
  return call(jnp.reshape(length, (1,)).astype(jnp.int32), inv, q, k, v, cache_k, cache_v)

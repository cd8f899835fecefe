"""Pallas (Triton backend) sparse GEMV: y = (x * mask) @ W that never loads the rows of dropped inputs.

Layout: W [K, N] ([in, out]), so one input's weights are one contiguous row. The grid is
(N / BN, K / C): each program owns C input rows (a chunk) and BN output columns. Its fp32 partial sum
reaches the output one of three ways (`KernelConfig.reduce`): stored for XLA to add up afterwards
('partials'), atomically added into an fp32 output that XLA zeroes first ('atomic'), or stored and
counted on a per-column-block semaphore so that the block's last program loads all the block's partials
at once, adds them up and writes the output itself ('semaphore': one launch per site, no zero-fill and
no reduction kernel).
The threshold compare is fused: row i is loaded iff |x[b, i]| * scale[s, i] > threshold[s] for some
batch row b (the union over rows), and every row b still multiplies only by its own kept inputs, so
results equal the per-row masked matmul.

'compact' mode first compacts the kept row ids of its chunk (cumsum, scatter into a per-program
scratch, barrier), then loads full [BK, BN] tiles of kept rows only; 'masked' mode walks fixed
[BK, BN] tiles and masks dropped rows out of each load (TEAL's design). 'balanced' mode compacts over the
whole input instead: program k along K takes kept rows [k C, (k + 1) C) of the input's kept list, so
every working program holds C kept rows (the last one fewer) whatever the sparsity, where 'compact'
programs hold a chunk's kept rows, fewer as sparsity grows and uneven across chunks. 'indexed' mode takes
the same shares of a list that XLA compacts once per input (`kept_rows`). On the H200 decode step
'compact' (and 'masked' for some shapes) with 'partials' is fastest; the other modes and reduces lost,
by the amounts in benchmarks/results/decode_h200.md (session 7).

Fused projections: the output columns split into segments (q|k|v or gate|up), each with its own
threshold and scale; a program's BN columns lie in one segment.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from wina_jax.kernels.config import KernelConfig

SCAN_ROWS = 4096  # input rows per step of a whole-input pass (the norm's sum of squares, 'balanced' mode's
# scan): a power of two, the last step masked


def compiler_params(num_warps: int, num_stages: int):
  """Triton compiler params under either name (jax 0.10: TritonCompilerParams; 0.11: CompilerParams)."""
  cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
  return cls(num_warps=num_warps, num_stages=num_stages)


def acc_zeros(acc: str, bk: int, bn: int) -> jax.Array:
  """A GEMV program's float32 accumulator for `KernelConfig.acc` / `PersistentConfig.acc`: [BN] ('vector')
  or [BK, BN] ('tile')."""
  return jnp.zeros((bk, bn) if acc == "tile" else (bn,), jnp.float32)


def acc_add(acc: jax.Array, products: jax.Array) -> jax.Array:
  """acc plus one tile's products [BK, BN]: elementwise into a [BK, BN] accumulator, summed over rows into
  a [BN] one."""
  return acc + (products if acc.ndim == 2 else jnp.sum(products, axis=0))


def acc_total(acc: jax.Array) -> jax.Array:
  """The [BN] sum an accumulator holds (the one reduction over rows of a [BK, BN] one)."""
  return jnp.sum(acc, axis=0) if acc.ndim == 2 else acc


def launch_dependents(v: jax.Array) -> jax.Array:
  """v (int32, any shape) after `griddepcontrol.launch_dependents` in every thread that holds part of it: once
  every program of the grid has run it (or ended), the kernel after this one in the stream may launch, where it
  is launched with programmatic dependent launch; it still waits for this kernel's end before it reads. The asm
  is pure to Triton, so v must feed the kernel's work, or the trigger is dropped. sm_90+ (PTX griddepcontrol)."""
  return plgpu.elementwise_inline_asm(
    "griddepcontrol.launch_dependents;\n\tmov.b32 $0, $1;",
    args=[v],
    constraints="=r,r",
    pack=1,
    result_shape_dtypes=[jax.ShapeDtypeStruct(v.shape, v.dtype)],
  )[0]


def _iota(n: int) -> jax.Array:
  return jax.lax.iota(jnp.int32, n)


def _only(inside, other=0) -> dict:
  """`plgpu.load` keywords that load only the rows marked `inside` (None: every row), `other` elsewhere."""
  return {} if inside is None else dict(mask=inside, other=other)


def _kernel(
  x_ref,
  t_ref,
  s_ref,
  g_ref,
  w_ref,
  *refs,
  cfg: KernelConfig,
  rows: int,
  nk: int,
  slot: int,
  bounds: tuple[int, ...],
  has_scale: bool,
  norm_eps: Optional[float],
  interpret: bool,
):
  c, bk, bn = cfg.chunk, cfg.block_k, cfg.block_n
  if cfg.mode == "indexed":  # the input's kept-row ids per segment [S, K] and their counts [S], from XLA
    ids_ref, cnt_ref, *refs = refs
  if cfg.reduce == "atomic":
    _, o_ref, *scratch = refs  # the zeroed input aliased to o_ref comes first
  elif cfg.reduce == "semaphore":
    sem_ref, o_ref, part_ref, *scratch = refs
  else:
    o_ref, *scratch = refs
  pn, pk = pl.program_id(0), pl.program_id(1)
  n0, k0 = pn * bn, pk * c
  seg = sum((n0 >= b).astype(jnp.int32) for b in bounds) if bounds else jnp.int32(0)
  thr = plgpu.load(t_ref.at[seg])
  lanes = _iota(bn)
  if cfg.pdl_trigger and not interpret:  # the column ids feed every weight load: the trigger stays, early
    lanes = launch_dependents(lanes)
  cols = (n0 + lanes)[None, :]
  d_in = x_ref.shape[0]
  piece = min(SCAN_ROWS, 1 << (d_in - 1).bit_length())  # input rows per step of a whole-input pass
  n_pieces = -(-d_in // piece)

  def piece_rows(j):
    """Input rows of whole-input pass step j [piece] and which exist (None: all do)."""
    ids = j * piece + _iota(piece)
    return ids, (ids < d_in if d_in % piece else None)

  if norm_eps is not None:  # RMSNorm prologue: each row's 1 / rms over all K inputs, in float32

    def sum_squares(j, acc):
      ids, inside = piece_rows(j)
      return tuple(
        a + jnp.sum(jnp.square(plgpu.load(x_ref.at[ids, jnp.int32(b)], **_only(inside)).astype(jnp.float32)))
        for b, a in enumerate(acc)
      )

    ss = jax.lax.fori_loop(0, n_pieces, sum_squares, tuple(jnp.float32(0.0) for _ in range(rows)))
    inv_rms = [jax.lax.rsqrt(v / d_in + norm_eps) for v in ss]

  def load_x(idx, b, inside=None):
    """Row b's input at rows idx [R], float32: x, or with the prologue `layers.rms_norm`'s value (the
    normalised input rounded to x's dtype, times the gain, rounded again: bf16 products are exact in f32).
    inside [R] bool: rows past the input, not loaded (0)."""
    xb = plgpu.load(x_ref.at[idx, jnp.int32(b)], **_only(inside))
    if norm_eps is None:
      return xb.astype(jnp.float32)
    y = (xb.astype(jnp.float32) * inv_rms[b]).astype(xb.dtype).astype(jnp.float32)
    return (
      (y * plgpu.load(g_ref.at[idx], **_only(inside)).astype(jnp.float32))
      .astype(xb.dtype)
      .astype(jnp.float32)
    )

  def load_rows(idx, valid=None, inside=None):
    """x at input rows idx [R] -> (per batch row: x [R] f32, keep [R] bool), and their union [R] bool.
    valid [R]: rows that may be kept; inside [R]: rows that exist (others are neither loaded nor kept)."""
    valid = inside if valid is None else valid
    scale = plgpu.load(s_ref.at[seg, idx], **_only(inside, 0.0)) if has_scale else None
    xs, keeps = [], []
    for b in range(rows):
      xb = load_x(idx, b, inside)
      kb = (jnp.abs(xb) * scale if has_scale else jnp.abs(xb)) > thr
      xs.append(xb)
      keeps.append(kb if valid is None else kb & valid)
    union = keeps[0]
    for kb in keeps[1:]:
      union = union | kb
    return xs, keeps, union

  def accumulate(acc, xs, keeps, w):
    """acc, xs, keeps: per batch row an accumulator (`acc_zeros`), [BK] f32, [BK] bool; w: [BK, BN] f32."""
    return tuple(acc_add(a, jnp.where(kb, xb, 0.0)[:, None] * w) for a, xb, kb in zip(acc, xs, keeps))

  acc0 = tuple(acc_zeros(cfg.acc, bk, bn) for _ in range(rows))

  def tile(j, acc, masked):
    """acc plus row tile j of the chunk (contiguous rows); masked: dropped rows are not loaded."""
    idx = k0 + j * bk + _iota(bk)
    xs, keeps, union = load_rows(idx)
    w = plgpu.load(
      w_ref.at[idx[:, None], cols], eviction_policy="evict_first", **_only(union[:, None] if masked else None)
    )
    return accumulate(acc, xs, keeps, w.astype(jnp.float32))

  if cfg.mode == "balanced":
    (idx_ref,) = scratch

    def scan(j, base):
      """Kept rows of input piece j: those at kept positions [k0, k0 + C) of the whole input go to this
      program's list (every other lane to the spare slot C, masked); returns the kept count so far."""
      ids, inside = piece_rows(j)
      keep = load_rows(ids, inside=inside)[2]
      k32 = keep.astype(jnp.int32)
      pos = base + jnp.cumsum(k32) - k32 - k0
      mine = keep & (pos >= 0) & (pos < c)
      plgpu.store(idx_ref.at[pn, pk, jnp.where(mine, pos, c)], ids, mask=mine)
      return base + jnp.sum(k32)

    total = jax.lax.fori_loop(0, n_pieces, scan, jnp.int32(0))
    if not interpret:
      plgpu.debug_barrier()
    count = jnp.clip(total - k0, 0, c)  # this program's share of the kept rows: full, a tail, or none
  elif cfg.mode == "indexed":
    count = jnp.clip(plgpu.load(cnt_ref.at[seg]) - k0, 0, c)  # this program's share, as in 'balanced'
  elif cfg.mode == "compact":
    (idx_ref,) = scratch
    chunk_rows = k0 + _iota(c)
    keep = load_rows(chunk_rows)[2].astype(jnp.int32)
    kept = jnp.sum(keep)

    def compact():
      pos = jnp.cumsum(keep) - keep
      plgpu.store(idx_ref.at[pn, pk, pos], chunk_rows, mask=keep > 0)
      if not interpret:
        plgpu.debug_barrier()

    if cfg.dense_at > 1:  # no fallback: always compact (a constant False condition would not lower)
      compact()
      count = kept
    else:
      dense_rows = min(c, math.ceil(cfg.dense_at * c))
      pl.when(kept < dense_rows)(compact)
      count = jnp.where(kept < dense_rows, kept, 0)  # rows the compacted loop walks: none on the fallback
      # the dense fallback: every row tile of the chunk, contiguous and unmasked (a dense GEMV's loads)
      trips = (kept >= dense_rows).astype(kept.dtype) * (c // bk)  # int32 like the lower bound
      acc0 = jax.lax.fori_loop(0, trips, lambda j, acc: tile(j, acc, False), acc0)
  if cfg.mode != "masked":

    def index(j):
      """Kept-row ids of compacted tile j [BK] (0 past the kept count) and their validity [BK]."""
      pos = j * bk + _iota(bk)
      valid = pos < count
      ref = ids_ref.at[seg, k0 + pos] if cfg.mode == "indexed" else idx_ref.at[pn, pk, pos]
      return plgpu.load(ref, mask=valid, other=0), valid

    def fetch(idx, valid):
      """x and keep per batch row, and the weight tile [BK, BN] (bf16) of the kept rows idx."""
      if rows == 1:  # every compacted row is kept; only the ragged tail needs masking
        xs, keeps = [load_x(idx, 0)], [valid]
      else:
        xs, keeps, _ = load_rows(idx, valid)
      w = plgpu.load(
        w_ref.at[idx[:, None], cols], mask=valid[:, None], other=0, eviction_policy="evict_first"
      )
      return xs, keeps, w

    trips = (count + bk - 1) // bk
    if cfg.loop == "prefetch":

      def body(j, carry):  # loads of tile j + 1 and ids of tile j + 2 issued before tile j sums
        acc, (xs, keeps, w), ahead = carry
        nxt, ids = fetch(*ahead), index(j + 2)
        return accumulate(acc, xs, keeps, w.astype(jnp.float32)), nxt, ids

      acc = jax.lax.fori_loop(0, trips, body, (acc0, fetch(*index(0)), index(1)))[0]
    else:

      def body(j, acc):
        xs, keeps, w = fetch(*index(j))
        return accumulate(acc, xs, keeps, w.astype(jnp.float32))

      acc = jax.lax.fori_loop(0, trips, body, acc0)
  else:
    acc = jax.lax.fori_loop(0, c // bk, lambda j, acc: tile(j, acc, True), acc0)
  acc = tuple(acc_total(a) for a in acc)
  out_cols = n0 + _iota(bn)
  if cfg.reduce == "atomic":
    for b in range(rows):
      plgpu.atomic_add(o_ref, (b, out_cols), acc[b])
  elif cfg.reduce == "partials":
    for b in range(rows):
      plgpu.store(o_ref.at[pk, b, out_cols], acc[b])
  else:
    for b in range(rows):
      plgpu.store(part_ref.at[pk, b, out_cols], acc[b])
    if not interpret:
      plgpu.debug_barrier()  # every thread's partial is stored before the (acq_rel) count
    arrived = plgpu.atomic_add(sem_ref, (jnp.int32(slot), pn), jnp.int32(1))

    @pl.when(arrived == nk - 1)  # the column block's last program: one load of all partials, reset
    def _():
      nkp = 1 << (nk - 1).bit_length()
      ks = _iota(nkp)
      for b in range(rows):
        part = plgpu.load(
          part_ref.at[ks[:, None], b, out_cols[None, :]], mask=(ks < nk)[:, None], other=0.0, volatile=True
        )
        plgpu.store(o_ref.at[b, out_cols], jnp.sum(part, axis=0).astype(o_ref.dtype))
      plgpu.store(sem_ref.at[jnp.int32(slot), pn], jnp.int32(0))


def kept_rows(x: jax.Array, thresholds: jax.Array, scales: Optional[jax.Array], n_seg: int):
  """x [M, K], thresholds [S], scales [S, K] or None -> (ids [S, K] int32: per segment, the input rows kept
  by any batch row (|x| * scale > threshold) in order, then zeros; counts [S] int32). 'indexed' mode's
  compaction, as XLA ops: once per site input instead of once per program."""
  k = x.shape[1]
  score = jnp.abs(x.astype(jnp.float32))[None] * (
    1.0 if scales is None else scales[:, None, :]
  )  # [S|1, M, K]
  return compact_ids(jnp.broadcast_to(jnp.any(score > thresholds[:, None, None], axis=1), (n_seg, k)))


def compact_ids(keep: jax.Array) -> tuple[jax.Array, jax.Array]:
  """keep [..., K] bool -> (ids [..., K] int32: the kept positions along the last axis in order, then zeros;
  counts [...] int32)."""
  k = keep.shape[-1]
  pos = jnp.where(keep, jnp.cumsum(keep, axis=-1, dtype=jnp.int32) - 1, k)  # past the end: dropped
  flat_pos = pos.reshape(-1, k)
  ids = jnp.zeros((flat_pos.shape[0], k + 1), jnp.int32)
  ids = ids.at[jnp.arange(flat_pos.shape[0])[:, None], flat_pos].set(
    jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), flat_pos.shape)
  )
  return ids[:, :k].reshape(keep.shape), jnp.sum(keep, axis=-1, dtype=jnp.int32)


@functools.partial(jax.jit, static_argnames=("segments", "cfg", "interpret", "slot", "norm_eps"))
def sparse_gemv(
  x: jax.Array,
  kernel: jax.Array,
  thresholds: jax.Array,
  scales: Optional[jax.Array],
  segments: Sequence[int],
  cfg: KernelConfig,
  interpret: bool = False,
  workspace: Optional[jax.Array] = None,
  slot: int = 0,
  norm_scale: Optional[jax.Array] = None,
  norm_eps: Optional[float] = None,
) -> jax.Array:
  """x: [M, K] (M <= 8); kernel: [K, N]; thresholds: [S]; scales: [S, K] or None -> [M, N]
  (float32, or x.dtype for the 'semaphore' reduce).

  `cfg` must tile the kernel exactly (`config.fits`); M is padded to a power of two with zeros.
  workspace: int32 [slots, >= N / block_n] zeros, for the 'semaphore' reduce only. The kernel counts
  arrivals in row `slot` and the last arrival resets its count, so the workspace is all zeros again
  when the kernel ends: one zeroed buffer serves every call, and no zero-fill runs per call. XLA sees
  it as a read-only input, so a row must not be shared by calls that may run at the same time.
  norm_scale [K] (x's dtype), norm_eps: the RMSNorm prologue. x is then the un-normalised residual and
  every program first computes each row's 1 / rms over all K inputs, so the product, the threshold
  compare included, runs on `layers.rms_norm(x, norm_scale, norm_eps)` without a separate norm kernel.
  """
  m, k = x.shape
  n = kernel.shape[1]
  rows = 1 << (m - 1).bit_length()
  xt = jnp.pad(x, ((0, rows - m), (0, 0))).T  # [K, rows]
  bounds = tuple(int(sum(segments[: i + 1])) for i in range(len(segments) - 1))
  has_scale = scales is not None
  s = scales.astype(jnp.float32) if has_scale else jnp.zeros((1, 1), jnp.float32)
  nk, nn = k // cfg.chunk, n // cfg.block_n
  if (norm_scale is None) != (norm_eps is None):
    raise ValueError("the RMSNorm prologue needs both norm_scale and norm_eps")
  if norm_scale is not None and (norm_scale.shape != (k,) or norm_scale.dtype != x.dtype):
    raise ValueError(
      f"norm_scale must be [{k}] in x's dtype {x.dtype}; got {norm_scale.shape} {norm_scale.dtype}"
    )
  g = norm_scale if norm_scale is not None else jnp.zeros((1,), x.dtype)
  args = [xt, thresholds.astype(jnp.float32), s, g, kernel]
  if cfg.mode == "indexed":
    if norm_scale is not None:
      raise ValueError("'indexed' mode compacts in XLA before the kernel and takes no RMSNorm prologue")
    args += list(kept_rows(x, thresholds, scales, len(segments)))
  if cfg.reduce == "atomic":
    out_shape = [jax.ShapeDtypeStruct((rows, n), jnp.float32)]
    args.append(jnp.zeros((rows, n), jnp.float32))
  elif cfg.reduce == "semaphore":
    if workspace is None or workspace.dtype != jnp.int32 or workspace.ndim != 2:
      raise ValueError("the 'semaphore' reduce needs an int32 [slots, blocks] zero workspace")
    if slot >= workspace.shape[0] or nn > workspace.shape[1]:
      raise ValueError(f"workspace {workspace.shape} has no row {slot} of {nn} column blocks")
    out_shape = [jax.ShapeDtypeStruct((rows, n), x.dtype), jax.ShapeDtypeStruct((nk, rows, n), jnp.float32)]
    args.append(workspace)
  else:
    out_shape = [jax.ShapeDtypeStruct((nk, rows, n), jnp.float32)]
  if cfg.mode == "compact":
    out_shape.append(jax.ShapeDtypeStruct((nn, nk, cfg.chunk), jnp.int32))
  elif cfg.mode == "balanced":  # one spare slot per program for the scan's masked lanes
    out_shape.append(jax.ShapeDtypeStruct((nn, nk, cfg.chunk + 1), jnp.int32))
  body = functools.partial(
    _kernel,
    cfg=cfg,
    rows=rows,
    nk=nk,
    slot=slot,
    bounds=bounds,
    has_scale=has_scale,
    norm_eps=norm_eps,
    interpret=interpret,
  )
  call = pl.pallas_call(
    body,
    out_shape=tuple(out_shape),
    grid=(nn, nk),
    interpret=interpret,
    input_output_aliases={len(args) - 1: 0} if cfg.reduce == "atomic" else {},
    compiler_params=None if interpret else compiler_params(cfg.num_warps, cfg.num_stages),
    name=f"sparse_gemv_{cfg.mode}",
  )
  out = call(*args)[0]
  return (jnp.sum(out, axis=0) if cfg.reduce == "partials" else out)[:m]

"""Pallas (Mosaic GPU backend, Hopper) GEMV: weights streamed by TMA into shared memory, summed on tensor cores.

y [M, N] = x [M, K] @ W [K, N] for M <= 8 batch rows, bfloat16 in, float32 sums. Each program computes
W^T x^T with `wgmma` (swap-AB: A = a [BK, BN] weight tile read transposed from shared memory, M = BN
outputs; B = x^T [BK, 8], the batch rows padded to 8), so a weight tile goes from global memory to the
tensor cores without passing through registers: no unpacking, no reduction across threads, and the
bytes in flight sit in shared memory (`stages` tiles per program), not in registers. This is the
design the Pallas-Triton kernels could not reach (benchmarks/results/decode_h200.md, sessions 13-16: their
time went to per-tile register and reduction instructions at few warps per SM).

Two kernels, one output contract (float32 partial sums [S, N, 8] over S splits of K, which XLA adds):
- `dense_partials`: every row; `emit_pipeline` streams [BK, BN] tiles by TMA.
- `rows_partials`: only kept rows. Hopper's TMA has no row gather: every thread copies 16-byte pieces of
  the kept rows with cp.async into the swizzled tile ('cp_async'), or one thread issues one TMA copy per
  row ('tma', 6-8x slower on the H200). XLA compacts the kept row ids once per site input (`compact`),
  per split and segment.

Measured on the H200 (benchmarks/results/decode_h200.md, session 17): the dense kernel streams the Llama
gate|up weight at 0.91-0.97x XLA's dense matmul with one program per SM; in the Llama-3-8B decode step the
kept-row kernel (backend 'mosaic') is 2x slower than the Pallas-Triton per-site kernels (6.41 vs 3.13 ms at
TEAL 50 %), its fixed cost ~28 us per site (XLA's compaction kernels, each work item's id copy and waits).

Work items (column block, split) are spread over a persistent grid of `programs` (default: one per SM).
Interpret mode does not run Mosaic GPU kernels, so the CPU path is `partials_reference` (the same
contract in jnp, which the tests hold the wrapper to) and the kernels are checked on the CPU by lowering
only; they run on an H100 / H200 (`tests/test_mosaic_gemv.py` GPU cases).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, memref, nvvm

from wina_jax.kernels.config import check_powers_of_two, spec_fields
from wina_jax.kernels.pallas_gemv import compact_ids
from wina_jax.kernels.persistent_config import sm_count
from wina_jax.kernels.reference import keep_mask

WARPGROUP = 128  # threads of a program
ROWS = 8  # batch rows a program multiplies (wgmma's smallest N); fewer are zero-padded
SWIZZLE = 128  # bytes: one 64-column bfloat16 row of a tile
TILE_COLS = SWIZZLE // 2  # bfloat16 columns per swizzled tile row (and per row copy)
IDS_COLS = 128  # the kept-row ids travel as [K / S / 128, 128] (TMA boxes hold at most 256 per dim)
H100_SMS = 132  # programs where the device does not report its SMs
GATHERS = ("tma", "cp_async")
CHUNK = 8  # bfloat16 elements per 16-byte cp.async piece (and per swizzle unit)


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Tiling of the Mosaic GPU GEMV.

  block_k: rows per weight tile (a multiple of 64); block_n: output columns per work item (a multiple of
  64, at most 256); stages: tiles in flight per program; splits: K ranges whose partial sums XLA adds
  (0: the fewest, a power of two, that give every program a work item); programs: the persistent grid
  (0: the device's SM count); gather: how `rows_partials` brings a tile's kept rows into shared memory:
  'cp_async' (every thread of the warpgroup copies 16-byte pieces with cp.async, placed at their swizzled
  offsets) or 'tma' (one 128-byte TMA copy per row, issued by one thread, counted on the tile's barrier).
  On the H200 'tma' streamed 0.46-0.58 TB/s at 0 % sparsity (Llama gate|up, 264-528 programs: the one issuing
  thread bounds it), 6-8x slower than the dense kernel; 'cp_async' 3.2 TB/s (decode_h200.md, session 17).
  """

  block_k: int = 64
  block_n: int = 64
  stages: int = 4
  splits: int = 0
  programs: int = 0
  gather: str = "cp_async"

  def __post_init__(self):
    if self.gather not in GATHERS:
      raise ValueError(f"gather={self.gather!r} is not one of {GATHERS}")
    check_powers_of_two(self, ("block_k", "block_n"))
    if self.stages < 1:
      raise ValueError(f"stages={self.stages} must be >= 1")
    if self.block_k % TILE_COLS or self.block_n % TILE_COLS:
      raise ValueError(f"block_k={self.block_k} and block_n={self.block_n} must be multiples of {TILE_COLS}")
    if self.block_n > 256:
      raise ValueError(f"block_n={self.block_n} is over wgmma's 256")
    if self.splits < 0 or self.programs < 0:
      raise ValueError("splits and programs must be >= 0 (0: automatic)")


def parse(spec: str) -> MosaicConfig:
  """A config from 'block_k:block_n:stages[:splits[:programs[:gather]]]', e.g. '64:64:4' or
  '64:64:4:0:264:cp_async'."""
  return MosaicConfig(**spec_fields(MosaicConfig, spec, 3, "mosaic config"))


def resolved(cfg: MosaicConfig, d_in: int, d_out: int) -> MosaicConfig:
  """`cfg` with splits and programs filled in for a [d_in, d_out] weight; ValueError if it does not tile."""
  programs = cfg.programs or sm_count() or H100_SMS
  blocks = d_out // cfg.block_n
  splits = cfg.splits or 1
  if not cfg.splits:
    while blocks * splits < programs and d_in % (2 * splits * max(cfg.block_k, IDS_COLS)) == 0:
      splits *= 2
  cfg = dataclasses.replace(cfg, splits=splits, programs=programs)
  if d_out % cfg.block_n:
    raise ValueError(f"d_out={d_out} is not a multiple of block_n={cfg.block_n}")
  if d_in % (splits * max(cfg.block_k, IDS_COLS)):
    raise ValueError(
      f"d_in={d_in} does not split into {splits} ranges of whole {max(cfg.block_k, IDS_COLS)}-row blocks"
    )
  return cfg


def _params():
  return plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup)


def _store(acc, o_gmem, s, n, bn):
  """acc [BN, 8] float32 -> o_gmem[s, n * BN : (n + 1) * BN] through shared memory."""

  @functools.partial(pl.run_scoped, o_smem=plgpu.SMEM((bn, ROWS), jnp.float32))
  def _(o_smem):
    o_smem[...] = acc
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[s, pl.ds(n * bn, bn)])
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def dense_partials(x8: jax.Array, w: jax.Array, cfg: MosaicConfig) -> jax.Array:
  """x8 [8, K] bf16, w [K, N] bf16 -> float32 partial sums [S, N, 8] of x8 @ w over S splits of K."""
  cfg = resolved(cfg, *w.shape)
  (k, n), bk, bn, s_n = w.shape, cfg.block_k, cfg.block_n, cfg.splits
  nb, kb = n // bn, k // bk // s_n

  def body(x_gmem, w_gmem, o_gmem):
    @plgpu.nd_loop((nb * s_n,), collective_axes="sm")
    def _(info):
      (i,) = info.index
      col, s = i // s_n, i % s_n

      def acc_scope(acc_ref):
        plgpu.emit_pipeline(
          lambda _, x_smem, w_smem: plgpu.wgmma(
            acc_ref, plgpu.transpose_ref(w_smem, (1, 0)), plgpu.transpose_ref(x_smem, (1, 0))
          ),
          grid=(kb,),
          in_specs=[
            plgpu.BlockSpec((ROWS, bk), lambda j: (0, s * kb + j), delay_release=1),
            plgpu.BlockSpec((bk, bn), lambda j: (s * kb + j, col), delay_release=1),
          ],
          max_concurrent_steps=cfg.stages,
        )(x_gmem, w_gmem)
        return acc_ref[...]

      _store(pl.run_scoped(acc_scope, plgpu.ACC((bn, ROWS))), o_gmem, s, col, bn)

  return plgpu.kernel(
    body,
    out_type=jax.ShapeDtypeStruct((s_n, n, ROWS), jnp.float32),
    grid=(cfg.programs,),
    grid_names=("sm",),
    compiler_params=_params(),
  )(x8, w)


def _untiled(tile_ref):
  """The bfloat16 buffer behind a tiled, swizzled scratch ref (for the row-tiled view: [stages, BK, 1, 1, 64],
  128-byte rows): its transforms without the last two (the swizzle and tiling its declaration added). Not
  `tile_ref.ref`, which in a RefUnion is the union's int8 bytes (indexing it by slot addressed bytes: a
  misaligned-address fault on the H200). Only for a view used no other way (layout inference gives one
  shape per view)."""
  return type(tile_ref)(tile_ref.ref, tile_ref.transforms[:-2])


def _cp_async_rows(ids, w_cols, dst) -> None:
  """Every thread of the warpgroup copies its 16-byte pieces of a tile's kept rows with cp.async (one
  commit group per call): ids [BK] int32 (shared), w_cols [K, 64] bf16 (global, the work item's columns),
  dst [BK, 1, 1, 64] bf16 (the tile's physical shared buffer, 128-byte swizzle: piece q of row r goes to
  piece q ^ (r % 8) of its 128-byte row, where wgmma and TMA expect it)."""

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * 3)
  def issue(ctx, ids_ref, w_ref, dst_ref):
    del ctx
    i32, i64, bf16 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64), ir.BF16Type.get()
    stride = ir.MemRefType(w_ref.type).get_strides_and_offset()[0][0]
    gbase = llvm.addrspacecast(llvm.PointerType.get(address_space=1), mgpu_utils.memref_ptr(w_ref))
    sbase = mgpu_utils.memref_ptr(dst_ref)
    tid = mgpu_utils.thread_idx()
    pieces = ir.MemRefType(ids_ref.type).shape[0] * TILE_COLS // CHUNK
    for j in range(pieces // WARPGROUP):
      piece = arith.addi(tid, mgpu_utils.c(WARPGROUP * j, i32))
      r = arith.shrui(piece, mgpu_utils.c(3, i32))
      q = arith.andi(piece, mgpu_utils.c(7, i32))
      row = memref.load(ids_ref, [arith.index_cast(ir.IndexType.get(), r)])
      src = arith.addi(
        arith.muli(arith.extsi(i64, row), mgpu_utils.c(stride, i64)),
        arith.extui(i64, arith.muli(q, mgpu_utils.c(CHUNK, i32))),
      )
      swizzled = arith.xori(q, arith.andi(r, mgpu_utils.c(7, i32)))
      to = arith.addi(
        arith.muli(r, mgpu_utils.c(TILE_COLS, i32)), arith.muli(swizzled, mgpu_utils.c(CHUNK, i32))
      )
      nvvm.cp_async_shared_global(
        mgpu_utils.getelementptr(sbase, [to], bf16),
        mgpu_utils.getelementptr(gbase, [src], bf16),
        16,
        nvvm.LoadCacheModifierKind.CG,
      )

  issue(ids, w_cols, dst)


def _cp_async_commit() -> None:
  """Close this thread's current cp.async group (empty groups too, so the count stays static)."""

  @plgpu.inline_mgpu()
  def commit(ctx):
    del ctx
    nvvm.cp_async_commit_group()

  commit()


def _cp_async_wait(pending: int) -> None:
  """Wait until at most `pending` of this thread's cp.async groups are in flight, then make every thread's
  copies visible to the tensor cores (fence.proxy.async and a warpgroup barrier)."""

  @plgpu.inline_mgpu()
  def wait(ctx):
    del ctx
    nvvm.cp_async_wait_group(pending)
    mgpu_utils.commit_shared()

  wait()


def rows_partials(
  xk: jax.Array, ids: jax.Array, counts: jax.Array, w: jax.Array, cfg: MosaicConfig, segments: Sequence[int]
) -> jax.Array:
  """Kept rows only. xk [G, S, 8, K / S] bf16: per segment g and split s, x^T at the kept rows in order
  (zero past the count); ids [G, S, K / S] int32: those rows' ids in w (past the count: any valid id);
  counts [G, S] int32; w [K, N] bf16 with N = sum(segments), each a multiple of block_n.
  -> float32 partial sums [S, N, 8]."""
  cfg = resolved(cfg, *w.shape)
  (k, n), bk, bn, s_n, stages = w.shape, cfg.block_k, cfg.block_n, cfg.splits, cfg.stages
  kp, nb = k // s_n, n // bn
  if bn != TILE_COLS:
    raise ValueError(f"rows_partials takes block_n={TILE_COLS} (one swizzled row per copy), got {bn}")
  starts = [sum(segments[:j]) // bn for j in range(1, len(segments))]  # first column block of each segment
  cp_async = cfg.gather == "cp_async"

  def body(xk_gmem, ids_gmem, cnt_gmem, w_gmem, o_gmem, x_smem, w_union, i_smem, bar, ibar):
    rows, w_smem = w_union  # one buffer, two views: row-tiled for the copies, (8, 64)-tiled for wgmma

    @plgpu.nd_loop((nb * s_n,), collective_axes="sm")
    def _(info):
      (i,) = info.index
      col, s = i // s_n, i % s_n
      g = sum((col >= b).astype(jnp.int32) for b in starts) if starts else 0
      plgpu.copy_gmem_to_smem(ids_gmem.at[g, s], i_smem, ibar)
      plgpu.barrier_wait(ibar)
      tiles = (cnt_gmem[g, s] + bk - 1) // bk

      def issue(t):
        slot = t % stages
        plgpu.copy_gmem_to_smem(xk_gmem.at[g, s, :, pl.ds(t * bk, bk)], x_smem.at[slot], bar.at[slot])
        if cp_async:
          tile_ids = i_smem.at[(t * bk) // IDS_COLS, pl.ds((t * bk) % IDS_COLS, bk)]
          _cp_async_rows(tile_ids, w_gmem.at[:, pl.ds(col * bn, bn)], _untiled(rows).at[slot])
          return

        def one(r, _):
          row = i_smem[(t * bk + r) // IDS_COLS, (t * bk + r) % IDS_COLS]
          plgpu.copy_gmem_to_smem(
            w_gmem.at[pl.ds(row, 1), pl.ds(col * bn, bn)], rows.at[slot, pl.ds(r, 1)], bar.at[slot]
          )
          return ()

        lax.fori_loop(0, bk, one, ())

      ahead = min(stages, kp // bk)  # a split holds at most kp // bk tiles
      for t in range(ahead):
        pl.when(t < tiles)(functools.partial(issue, t))
        if cp_async:
          _cp_async_commit()

      def acc_scope(acc_ref):
        def step(t, _):
          slot = t % stages
          if cp_async:  # tile t's group: `ahead` were committed before it and one per step since
            _cp_async_wait(ahead - 1)
          plgpu.barrier_wait(bar.at[slot])
          plgpu.wgmma(
            acc_ref,
            plgpu.transpose_ref(w_smem.at[slot], (1, 0)),
            plgpu.transpose_ref(x_smem.at[slot], (1, 0)),
          )
          plgpu.wgmma_wait(0)
          pl.when(t + stages < tiles)(lambda: issue(t + stages))
          if cp_async:
            _cp_async_commit()
          return ()

        lax.fori_loop(0, tiles, step, ())
        return acc_ref[...]

      _store(pl.run_scoped(acc_scope, plgpu.ACC((bn, ROWS))), o_gmem, s, col, bn)

  tiled = (plgpu.TilingTransform((8, TILE_COLS)), plgpu.SwizzleTransform(SWIZZLE))
  by_row = (plgpu.TilingTransform((1, TILE_COLS)), plgpu.SwizzleTransform(SWIZZLE))
  return plgpu.kernel(
    body,
    out_type=jax.ShapeDtypeStruct((s_n, n, ROWS), jnp.float32),
    grid=(cfg.programs,),
    grid_names=("sm",),
    scratch_types=dict(
      x_smem=plgpu.SMEM((stages, ROWS, bk), jnp.bfloat16, transforms=tiled),
      w_union=plgpu.RefUnion(
        plgpu.SMEM((stages, bk, bn), jnp.bfloat16, transforms=by_row),
        plgpu.SMEM((stages, bk, bn), jnp.bfloat16, transforms=tiled),
      ),
      i_smem=plgpu.SMEM((kp // IDS_COLS, IDS_COLS), jnp.int32),
      bar=plgpu.Barrier(num_arrivals=1 if cp_async else bk + 1, num_barriers=stages),
      ibar=plgpu.Barrier(),
    ),
    compiler_params=_params(),
  )(xk, ids.reshape(*ids.shape[:2], kp // IDS_COLS, IDS_COLS), counts, w)


def compact(x: jax.Array, keep: jax.Array, splits: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """x [M, K], keep [G, M, K] bool (per segment, the inputs each batch row keeps) -> `rows_partials`'
  (xk [G, S, 8, K / S] bf16, ids [G, S, K / S] int32, counts [G, S] int32): a row is loaded if any batch row
  keeps it, and each batch row multiplies only its own kept inputs."""
  (m, k), g = x.shape, keep.shape[0]
  kp = k // splits
  local, counts = compact_ids(jnp.any(keep, axis=1).reshape(g, splits, kp))
  # kept rows in order, then the split's first row (a valid id; its x is zero)
  ids = local + (jnp.arange(splits, dtype=jnp.int32) * kp)[None, :, None]
  xm = jnp.where(keep, x[None], 0).astype(jnp.bfloat16)  # [G, M, K]
  xm = jnp.pad(xm, ((0, 0), (0, ROWS - m), (0, 0)))
  xk = jnp.take_along_axis(xm[:, None], ids[:, :, None, :], axis=3)  # [G, S, 8, Kp]
  valid = jnp.arange(kp)[None, None, None, :] < counts[:, :, None, None]
  return jnp.where(valid, xk, 0), ids, counts


def partials_reference(
  xk: jax.Array, ids: jax.Array, counts: jax.Array, w: jax.Array, cfg: MosaicConfig, segments: Sequence[int]
) -> jax.Array:
  """`rows_partials`' contract in jnp (the CPU path): float32 partial sums [S, N, 8]."""
  del counts  # xk is zero past each count
  g_of = jnp.repeat(jnp.arange(len(segments)), jnp.asarray(segments), total_repeat_length=w.shape[1])
  rows = w[ids].astype(jnp.float32)  # [G, S, Kp, N]
  per_g = jnp.einsum("gsbk,gskn->gsnb", xk.astype(jnp.float32), rows, precision=lax.Precision.HIGHEST)
  return per_g[g_of, :, jnp.arange(w.shape[1])].transpose(1, 0, 2)  # [S, N, 8]


def unsupported(
  rows: int, dtype, kernel: jax.Array, segments: Sequence[int], cfg: MosaicConfig
) -> Optional[str]:
  """Why the kept-row kernel cannot take this site (None if it can): more than 8 rows, not bfloat16, or a
  shape its tiling does not divide."""
  if rows > ROWS:
    return f"{rows} rows (at most {ROWS})"
  if dtype != jnp.bfloat16 or kernel.dtype != jnp.bfloat16:
    return f"x {jnp.dtype(dtype).name}, kernel {kernel.dtype.name} (bfloat16 only)"
  try:
    cfg = resolved(cfg, *kernel.shape)
  except ValueError as e:
    return str(e)
  if any(w % cfg.block_n for w in segments):
    return f"segments {tuple(segments)} are not multiples of block_n={cfg.block_n}"
  return None


def masked_linear_mosaic(
  x: jax.Array,
  kernel: jax.Array,
  thresholds: jax.Array,
  scales: Optional[jax.Array],
  segments: Sequence[int],
  cfg: MosaicConfig,
  *,
  impl=None,
) -> jax.Array:
  """`masked_linear` on the Mosaic GPU kernel: x [M <= 8, K] bf16, kernel [K, N] bf16, thresholds [S_seg],
  scales None or [S_seg, K] -> [M, N] in x's dtype. impl: the partials function (default `rows_partials`;
  `partials_reference` on the CPU)."""
  m, k = x.shape
  if why := unsupported(m, x.dtype, kernel, segments, cfg):
    raise ValueError(f"the Mosaic GEMV does not take this site: {why}; use backend 'pallas' or 'xla'")
  cfg = resolved(cfg, k, kernel.shape[1])
  keep = jnp.stack(
    [keep_mask(x, thresholds[g], None if scales is None else scales[g]) for g in range(len(segments))]
  )
  parts = (impl or rows_partials)(*compact(x, keep, cfg.splits), kernel, cfg, tuple(segments))
  return jnp.sum(parts, axis=0)[:, :m].T.astype(x.dtype)

"""Pallas (Mosaic GPU backend, Hopper) GEMV: weights streamed by TMA into shared memory, summed on tensor cores.

y [M, N] = x [M, K] @ W [K, N] for M <= 8 batch rows, bfloat16 in, float32 sums. Each program computes
W^T x^T with `wgmma` (swap-AB: A = a [BK, BN] weight tile read transposed from shared memory, M = BN
outputs; B = x^T [BK, 8], the batch rows padded to 8), so a weight tile goes from global memory to the
tensor cores without passing through registers: no unpacking, no reduction across threads, and the
bytes in flight sit in shared memory (`stages` tiles per program), not in registers. This is the
design the Pallas-Triton kernels could not reach (benchmarks/results/decode_h200.md, sessions 13-16: their
time went to per-tile register and reduction instructions at few warps per SM).

Three kernels, one output contract (float32 partial sums [S, N, 8] over S splits of K, which XLA adds):
- `dense_partials`: every row; `emit_pipeline` streams [BK, BN] tiles by TMA.
- `rows_partials`: only kept rows, compacted by XLA first (`compact`, per split and segment). Hopper's TMA has
  no row gather: every thread copies 16-byte pieces of the kept rows with cp.async into the swizzled tile
  ('cp_async'), or one thread issues one TMA copy per row ('tma', 6-8x slower on the H200).
- `fused_partials` (`MosaicConfig.compact='kernel'`): the threshold and the compaction inside the kernel; each
  program writes its split's kept ids and x^T to shared memory, then gathers as 'cp_async'.

Measured on the H200 (benchmarks/results/decode_h200.md, sessions 17-18): the dense kernel streams the Llama
gate|up weight at 0.91-0.97x XLA's dense matmul with one program per SM. In the Llama-3-8B decode step at TEAL
50 %, `rows_partials` (XLA compaction) gave 0.65x dense, ~28 us fixed per site. `fused_partials` gave
1.07-1.09x, ~8.4 us per site. The Pallas-Triton per-site kernels gave 1.30-1.32x, ~5.3 us per site.

Work items (column block, split) are spread over a persistent grid of `programs` (default: one per SM).
Interpret mode does not run Mosaic GPU kernels, so the CPU path is `partials_reference` (the same
contract in jnp, which the tests hold the wrapper to) and the kernels are checked on the CPU by lowering
only; they run on an H100 / H200 (`tests/test_mosaic_gemv.py` GPU cases).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, memref, nvvm
from jaxlib.mlir.dialects import math as mlir_math

from wina_jax.kernels import mosaic_sync
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
COMPACTS = ("xla", "kernel")
FUSED_MAX_KP = 4096  # rows of a split the in-kernel compaction holds (x^T and ids in shared memory)
SMEM_BYTES = 200 * 1024  # shared memory a program may take (the H100 / H200 allow 227 KiB)
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
  compact: where the kept rows are found: 'xla' (`compact`, XLA kernels before the GEMV, then `rows_partials`)
  or 'kernel' (`fused_partials`: each program thresholds its split of x and compacts the kept ids in shared
  memory; no XLA work before the kernel; gather 'cp_async' only).
  pdl: every launch of this config (this module's kernels, `mosaic_site`, `mosaic_mlp`) starts with
  `mosaic_sync.grid_dependency`: launched with programmatic dependent launch where jax does so
  (`mosaic_sync.pdl_launches`), it may start before the kernel ahead of it ends, and lets the one after it start
  early. The results are the same either way; on the H200 the step's time too (decode_h200.md, session 26).
  """

  block_k: int = 64
  block_n: int = 64
  stages: int = 4
  splits: int = 0
  programs: int = 0
  gather: str = "cp_async"
  compact: str = "xla"
  pdl: bool = False

  def __post_init__(self):
    if self.gather not in GATHERS:
      raise ValueError(f"gather={self.gather!r} is not one of {GATHERS}")
    if self.compact not in COMPACTS:
      raise ValueError(f"compact={self.compact!r} is not one of {COMPACTS}")
    if self.compact == "kernel" and self.gather != "cp_async":
      raise ValueError("compact='kernel' gathers by cp_async only (gather='tma' needs XLA's compaction)")
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
  """A config from 'block_k:block_n:stages[:splits[:programs[:gather[:compact[:pdl]]]]]', e.g. '64:64:4' or
  '64:64:4:0:264:cp_async:kernel' or '64:256:3:0:132:cp_async:kernel:true'."""
  return MosaicConfig(**spec_fields(MosaicConfig, spec, 3, "mosaic config"))


def in_kernel(cfg: MosaicConfig) -> MosaicConfig:
  """cfg gathering by cp.async and compacting in the kernel: the persistent launches' only mode (`mosaic_mlp`,
  `mosaic_site`)."""
  return dataclasses.replace(cfg, gather="cp_async", compact="kernel")


def resolved(cfg: MosaicConfig, d_in: int, d_out: int) -> MosaicConfig:
  """`cfg` with splits and programs filled in for a [d_in, d_out] weight; ValueError if it does not tile."""
  programs = cfg.programs or sm_count() or H100_SMS
  blocks = d_out // cfg.block_n
  splits = cfg.splits or 1
  if not cfg.splits:

    def fits():
      return d_in % (2 * splits * max(cfg.block_k, IDS_COLS)) == 0

    while blocks * splits < programs and fits():
      splits *= 2
    while cfg.compact == "kernel" and d_in // splits > FUSED_MAX_KP and fits():
      splits *= 2
  cfg = dataclasses.replace(cfg, splits=splits, programs=programs)
  if d_out % cfg.block_n:
    raise ValueError(f"d_out={d_out} is not a multiple of block_n={cfg.block_n}")
  if d_in % (splits * max(cfg.block_k, IDS_COLS)):
    raise ValueError(
      f"d_in={d_in} does not split into {splits} ranges of whole {max(cfg.block_k, IDS_COLS)}-row blocks"
    )
  return cfg


def items_per_program(cfg: MosaicConfig, d_out: int) -> np.ndarray:
  """[programs] int: how many work items (column block, split) each program of a resolved config's persistent
  grid walks (program p takes items p, p + programs, ...)."""
  total = d_out // cfg.block_n * cfg.splits
  return np.array([len(range(p, total, cfg.programs)) for p in range(cfg.programs)])


def compiler_params():
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

  def mosaic_dense_partials(x_gmem, w_gmem, o_gmem):
    mosaic_sync.grid_dependency(cfg.pdl)

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
    mosaic_dense_partials,  # the kernel's name in profiles
    out_type=jax.ShapeDtypeStruct((s_n, n, ROWS), jnp.float32),
    grid=(cfg.programs,),
    grid_names=("sm",),
    compiler_params=compiler_params(),
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
  commit group per call): ids [BK] int32 (shared), w_cols [K, BN] bf16 (global, the work item's columns),
  dst: the tile's shared buffer, addressed from its first element (`_swizzled_offset` of a [BK, BN] tile). For
  BN = 64 that is also the (1, 64)-tiled row layout."""

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * 3)
  def issue(ctx, ids_ref, w_ref, dst_ref):
    del ctx
    i32, i64, bf16 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64), ir.BF16Type.get()
    c = functools.partial(mgpu_utils.c, ty=i32)
    (stride, _), _ = ir.MemRefType(w_ref.type).get_strides_and_offset()
    blocks = ir.MemRefType(w_ref.type).shape[1] // TILE_COLS  # 64-column blocks of a row
    per_row = blocks * TILE_COLS // CHUNK  # pieces of a row
    gbase = llvm.addrspacecast(llvm.PointerType.get(address_space=1), mgpu_utils.memref_ptr(w_ref))
    sbase = mgpu_utils.memref_ptr(dst_ref)
    tid = mgpu_utils.thread_idx()
    pieces = ir.MemRefType(ids_ref.type).shape[0] * per_row
    for j in range(pieces // WARPGROUP):
      piece = arith.addi(tid, c(WARPGROUP * j))
      r = arith.divui(piece, c(per_row))
      qa = arith.remui(piece, c(per_row))  # piece of the row
      row = memref.load(ids_ref, [arith.index_cast(ir.IndexType.get(), r)])
      src = arith.addi(
        arith.muli(arith.extsi(i64, row), mgpu_utils.c(stride, i64)),
        arith.extui(i64, arith.muli(qa, c(CHUNK))),
      )
      to = _swizzled_offset(r, arith.muli(qa, c(CHUNK)), blocks * TILE_COLS)
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

  def mosaic_rows_partials(xk_gmem, ids_gmem, cnt_gmem, w_gmem, o_gmem, x_smem, w_union, i_smem, bar, ibar):
    mosaic_sync.grid_dependency(cfg.pdl)
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
    mosaic_rows_partials,  # the kernel's name in profiles
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
    compiler_params=compiler_params(),
  )(xk, ids.reshape(*ids.shape[:2], kp // IDS_COLS, IDS_COLS), counts, w)


WARPS = WARPGROUP // 32


def _swizzled_offset(row, col, cols: int):
  """Element offset (i32) of (row, col) (i32) in a [R, cols] bfloat16 buffer tiled (8, 64) with the 128-byte
  swizzle, the layout wgmma and TMA expect: tile (row // 8, col // 64) of 8 * 64 elements, row % 8 within it,
  16-byte piece ((col // 8) % 8) ^ (row % 8), element col % 8."""
  c = functools.partial(mgpu_utils.c, ty=ir.IntegerType.get_signless(32))
  r8 = arith.andi(row, c(7))
  tile = arith.addi(arith.muli(arith.shrui(row, c(3)), c(cols // TILE_COLS)), arith.shrui(col, c(6)))
  piece = arith.xori(arith.andi(arith.shrui(col, c(3)), c(7)), r8)
  within = arith.addi(arith.muli(piece, c(CHUNK)), arith.andi(col, c(CHUNK - 1)))
  return arith.addi(arith.muli(tile, c(ROWS * TILE_COLS)), arith.addi(arith.muli(r8, c(TILE_COLS)), within))


def _xk_offset(p, b: int, bk: int):
  """Element offset of x^T's batch row b at kept position p (i32) in the flat [T, 8, BK] tiles: row
  (p // BK) * 8 + b, column p % BK of a [T * 8, BK] `_swizzled_offset` buffer."""
  c = functools.partial(mgpu_utils.c, ty=ir.IntegerType.get_signless(32))
  row = arith.addi(arith.shli(arith.shrui(p, c(bk.bit_length() - 1)), c(3)), c(b))
  return _swizzled_offset(row, arith.andi(p, c(bk - 1)), bk)


def load_vector(ref, at, n: int, ty) -> list:
  """n elements of type ty from global ref (flat element index `at`, i32, from the ref's first element) by one
  aligned vector load (the address must be a multiple of n elements, up to 16 bytes)."""
  width = mgpu_utils.bitwidth(ty) // 8
  ptr = mgpu_utils.getelementptr(mgpu_utils.memref_ptr(ref), [at], ty)
  got = llvm.load(ir.VectorType.get((n,), ty), ptr, alignment=min(n * width, 16))
  return [llvm.extractelement(got, mgpu_utils.c(e, ir.IntegerType.get_signless(32))) for e in range(n)]


def row_loads(ref, rows: int, ty, first, per: int) -> list:
  """[rows][per] values of a global [R, kp] ref: row b's elements first .. first + per - 1 (first: i32), by
  aligned vector loads of gcd(per, 8) elements (16 bytes of bfloat16 where a thread's rows allow)."""
  chunk = math.gcd(per, CHUNK)
  stride = ir.MemRefType(ref.type).get_strides_and_offset()[0][0]
  c = functools.partial(mgpu_utils.c, ty=ir.IntegerType.get_signless(32))
  return [
    [
      v
      for k in range(per // chunk)
      for v in load_vector(ref, arith.addi(first, c(b * stride + k * chunk)), chunk, ty)
    ]
    for b in range(rows)
  ]


def x_values(rows: int):
  """`compact_split`'s value source for a split of x [M, kp] bf16 (global): its rows as they are."""
  return lambda refs, first, per: row_loads(refs[0], rows, ir.BF16Type.get(), first, per)


def compact_split(srcs, values, thr, scale, scratch: PhaseScratch, *, rows: int, block_k: int) -> None:
  """Threshold a split of an input and write its kept rows, in order, to shared memory (every thread of the
  warpgroup: kp / 128 consecutive rows; an exclusive scan of the threads' counts by warp shuffles and the
  warps' totals). srcs: the global refs `values(src_refs, first, per)` reads to give this thread's inputs,
  [rows][per] bf16 (`x_values`: a split of x [M, kp]); thr [1] f32, scale [kp] f32 or None (global: the
  segment's threshold and WINA scales); scratch: the phase's shared memory (kp = its ids' length): xk's flat
  view [T * 8 * BK] bf16 (x^T's tiles, `_xk_offset`; batch row b keeps its own |x| * scale > thr, rows
  b >= M are zero), ids [T * BK] int32 (the kept rows' split-local ids), totals [WARPS + 1] int32 (the warps'
  counts, then the split's count). From
  the count to the end of its tile: id 0 and x 0. Inputs are read once, by vector loads, and stay in
  registers between the count and the writes. Ends with the writes visible to the tensor cores and to every
  thread."""
  kp = scratch.ids.shape[0]
  refs = tuple(srcs) + (thr, scratch.xk[0], scratch.ids, scratch.totals) + (() if scale is None else (scale,))

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * len(refs))
  def run(ctx, *args):
    del ctx
    i32, f32, bf16, index = (
      ir.IntegerType.get_signless(32),
      ir.F32Type.get(),
      ir.BF16Type.get(),
      ir.IndexType.get(),
    )
    c = functools.partial(mgpu_utils.c, ty=i32)
    at = functools.partial(arith.index_cast, index)
    per = kp // WARPGROUP
    src_refs, (thr_ref, xk_ref, ids_ref, tot_ref), scale_ref = (
      args[: len(srcs)],
      args[len(srcs) : len(srcs) + 4],
      args[len(srcs) + 4 :],
    )
    tid = mgpu_utils.thread_idx()
    lane, warp = arith.andi(tid, c(31)), arith.shrui(tid, c(5))
    first = arith.muli(tid, c(per))
    threshold = memref.load(thr_ref, [mgpu_utils.c(0, index)])
    zero = mgpu_utils.c(0.0, bf16)
    xv = values(src_refs, first, per)
    sv = row_loads(scale_ref[0], 1, f32, first, per)[0] if scale_ref else None

    def kept(j):
      """Row first + j: (its id, whether any batch row keeps it, each batch row's x or 0)."""
      keep, xs = None, []
      for b in range(rows):
        v = xv[b][j]
        score = mlir_math.absf(arith.extf(f32, v))
        if sv is not None:
          score = arith.mulf(score, sv[j])
        k = arith.cmpf(arith.CmpFPredicate.OGT, score, threshold)
        xs.append(arith.select(k, v, zero))
        keep = k if keep is None else arith.ori(keep, k)
      return arith.addi(first, c(j)), keep, xs

    rows_kept = [kept(j) for j in range(per)]  # loaded once: the count and the writes share them

    def put(p, r, xs):
      memref.store(r, ids_ref, [at(p)])
      for b in range(ROWS):
        memref.store(xs[b] if b < len(xs) else zero, xk_ref, [at(_xk_offset(p, b, block_k))])

    # barriers here follow `when` blocks (the caller's or this function's): unaligned (`mosaic_sync.barrier`)
    mosaic_sync.barrier()  # the previous split's readers of ids, xk and totals are done
    count = c(0)
    for _, keep, _ in rows_kept:
      count = arith.addi(count, arith.extui(i32, keep))
    incl = count  # inclusive scan over the warp's lanes
    for d in (1, 2, 4, 8, 16):
      up = llvm.inline_asm(i32, [incl], f"shfl.sync.up.b32 $0, $1, {d}, 0, -1;", "=r,r")
      incl = arith.select(arith.cmpi(arith.CmpIPredicate.uge, lane, c(d)), arith.addi(incl, up), incl)
    with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.eq, lane, c(31))):
      memref.store(incl, tot_ref, [at(warp)])
    mosaic_sync.barrier()
    before, total = c(0), c(0)
    for w in range(WARPS):
      n = memref.load(tot_ref, [mgpu_utils.c(w, index)])
      before = arith.addi(before, arith.select(arith.cmpi(arith.CmpIPredicate.ugt, warp, c(w)), n, c(0)))
      total = arith.addi(total, n)
    pos = arith.addi(before, arith.subi(incl, count))
    for r, keep, xs in rows_kept:
      with mgpu_utils.when(keep):
        put(pos, r, xs)
      pos = arith.addi(pos, arith.extui(i32, keep))
    end = arith.andi(arith.addi(total, c(block_k - 1)), c(-block_k))  # the count rounded up to whole tiles
    for j in range(-(-block_k // WARPGROUP)):
      p = arith.addi(total, arith.addi(tid, c(j * WARPGROUP)))
      with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.ult, p, end)):
        put(p, c(0), [])
    with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.eq, tid, c(0))):
      memref.store(total, tot_ref, [mgpu_utils.c(WARPS, index)])
    mosaic_sync.commit_shared()

  run(*refs)


_TILED = (plgpu.TilingTransform((8, TILE_COLS)), plgpu.SwizzleTransform(SWIZZLE))
MARKS = 4  # `fused_partials(marks=True)`: clock reads per work item


@dataclasses.dataclass(frozen=True)
class PhaseScratch:
  """One kept-row phase's shared memory (`scratch_types`): xk, x^T's tiles (flat for the compaction's writes,
  tiled for wgmma); ids, the kept rows; totals, the compaction's counts."""

  xk: object
  ids: object
  totals: object


def scratch_types(cfg: MosaicConfig, phases) -> dict:
  """Shared memory of a kernel of kept-row phases that share cfg's block_k, block_n and stages. phases:
  [(prefix, kp)], one per phase over splits of kp rows -> {prefix + 'xk' | 'ids' | 'totals': its
  `PhaseScratch` fields; 'w_union': the weight tiles in flight, `stages` slots of [BK, BN], flat for the
  cp.async copies, tiled for wgmma}. The swizzled buffers come first: each is a multiple of 1024 bytes, so
  each starts where the 128-byte swizzle needs it to."""
  bk, bn, stages = cfg.block_k, cfg.block_n, cfg.stages
  out = {
    f"{prefix}xk": plgpu.RefUnion(
      plgpu.SMEM((kp * ROWS,), jnp.bfloat16),
      plgpu.SMEM((kp // bk, ROWS, bk), jnp.bfloat16, transforms=_TILED),
    )
    for prefix, kp in phases
  }
  out["w_union"] = plgpu.RefUnion(
    plgpu.SMEM((stages * bk * bn,), jnp.bfloat16),
    plgpu.SMEM((stages, bk, bn), jnp.bfloat16, transforms=_TILED),
  )
  for prefix, kp in phases:
    out[f"{prefix}ids"] = plgpu.SMEM((kp,), jnp.int32)
    out[f"{prefix}totals"] = plgpu.SMEM((WARPS + 1,), jnp.int32)
  return out


def kept_row_phase(
  cfg: MosaicConfig, shape, segments, compact_split_of, w_gmem, o_gmem, scratch, w_union, mark
):
  """Inside a kernel of cfg.programs programs: this program's work items (column block, split) of a resolved
  cfg's kept-row GEMV of a [K, N] = `shape` weight (global w_gmem) into float32 partial sums o_gmem [S, N, 8].
  compact_split_of(s, g): compacts split s of segment g into `scratch` (a PhaseScratch; `compact_split`); it
  runs only when an item's (segment, split) differs from the previous one's; then the next item's first copies
  are issued before this item's store, so their latency overlaps it. mark(j, e): the clock hook, e = 0 .. 3 at
  item j's start, after its compaction, after its last wgmma and after its store."""
  (k, n), bk, bn, s_n, stages, programs = (
    shape,
    cfg.block_k,
    cfg.block_n,
    cfg.splits,
    cfg.stages,
    cfg.programs,
  )
  kp, nb = k // s_n, n // bn
  starts = [sum(segments[:j]) // bn for j in range(1, len(segments))]
  (_, xk_tiles), (w_flat, w_smem), ids, totals = scratch.xk, w_union, scratch.ids, scratch.totals
  pid = lax.axis_index("sm")
  items = (nb * s_n - pid + programs - 1) // programs  # this program's work items
  ahead = min(stages, kp // bk)  # tiles issued before the first wgmma (a split holds kp // bk)

  def where(j):
    """Work item j of this program: (column block, split, segment, its (segment, split) key)."""
    i = pid + j * programs
    col, s = i // s_n, i % s_n
    g = sum((col >= b).astype(jnp.int32) for b in starts) if starts else 0
    return col, s, g, g * s_n + s

  def issue(col, s, t):
    """Tile t's kept rows of item (col, s) into slot t % stages (one cp.async group, committed by the caller)."""
    w_cols = w_gmem.at[pl.ds(s * kp, kp), pl.ds(col * bn, bn)]
    _cp_async_rows(ids.at[pl.ds(t * bk, bk)], w_cols, w_flat.at[pl.ds((t % stages) * bk * bn, bk * bn)])

  def first_tiles(col, s, tiles):
    for t in range(ahead):
      pl.when(t < tiles)(functools.partial(issue, col, s, t))
      _cp_async_commit()

  def item(j, carry):
    prev, ready = carry  # ready: the previous item already issued this one's first tiles
    col, s, g, key = where(j)
    mark(j, 0)
    pl.when(key != prev)(lambda: compact_split_of(s, g))
    mark(j, 1)
    tiles = (totals[WARPS] + bk - 1) // bk
    pl.when(ready == 0)(lambda: first_tiles(col, s, tiles))
    col_next, s_next, _, key_next = where(j + 1)
    chain = jnp.logical_and(j + 1 < items, key_next == key).astype(jnp.int32)

    def acc_scope(acc_ref):
      def step(t, _):
        _cp_async_wait(ahead - 1)  # tile t's rows are in (its group and every earlier one)
        plgpu.wgmma(
          acc_ref,
          plgpu.transpose_ref(w_smem.at[t % stages], (1, 0)),
          plgpu.transpose_ref(xk_tiles.at[t], (1, 0)),
        )
        plgpu.wgmma_wait(0)
        pl.when(t + stages < tiles)(lambda: issue(col, s, t + stages))
        _cp_async_commit()
        return ()

      lax.fori_loop(0, tiles, step, ())
      mark(j, 2)
      # every slot is free: the next item, if it shares this one's kept rows, starts its copies before the store
      pl.when(chain == 1)(lambda: first_tiles(col_next, s_next, tiles))
      return acc_ref[...]

    _store(pl.run_scoped(acc_scope, plgpu.ACC((bn, ROWS))), o_gmem, s, col, bn)
    mark(j, 3)
    return key, chain

  lax.fori_loop(0, items, item, (jnp.int32(-1), jnp.int32(0)))


def fused_partials(
  x: jax.Array,
  thresholds: jax.Array,
  scales: Optional[jax.Array],
  w: jax.Array,
  cfg: MosaicConfig,
  segments: Sequence[int],
  *,
  marks: bool = False,
):
  """Threshold, compaction and kept-row GEMV in one kernel. x [M <= 8, K] bf16, thresholds [G] f32, scales
  None or [G, K] f32, w [K, N] bf16 with N = sum(segments) (each a multiple of block_n) -> float32 partial
  sums [S, N, 8], `rows_partials`' contract. One `kept_row_phase`: a program compacts its split's kept rows
  (`compact_split`) when its work item's (segment, split) changes; with `programs` a multiple of the splits a
  program's split never changes. block_n 64, 128 or 256: a kept row's BN columns are one contiguous read of
  2 * BN bytes, and wider items mean fewer items (each a chain of copy, wait and store).
  marks: also return the kernel's own clock, int32 [programs, items per program, MARKS]: the GPU's global
  nanosecond clock (low 32 bits, read by thread 0) at each work item's start, after its compaction (equal
  to the start where none ran, to the clock's resolution), after its last wgmma and after its store."""
  cfg = resolved(cfg, *w.shape)
  (k, n), (m, _), bk, s_n, programs = w.shape, x.shape, cfg.block_k, cfg.splits, cfg.programs
  kp = k // s_n
  wina = scales is not None

  def mosaic_fused_partials(x_gmem, thr_gmem, *refs, xk, w_union, ids, totals):
    mosaic_sync.grid_dependency(cfg.pdl)
    sc_gmem = refs[0] if wina else None
    w_gmem, o_gmem, *marks_gmem = refs[wina:]
    scratch = PhaseScratch(xk, ids, totals)
    pid = lax.axis_index("sm")

    def mark(j, e):
      if marks_gmem:
        mosaic_sync.clock(marks_gmem[0].at[pid, j, pl.ds(e, 1)])

    def compact_split_of(s, g):
      compact_split(
        (x_gmem.at[:, pl.ds(s * kp, kp)],),
        x_values(m),
        thr_gmem.at[pl.ds(g, 1)],
        None if sc_gmem is None else sc_gmem.at[g, pl.ds(s * kp, kp)],
        scratch,
        rows=m,
        block_k=bk,
      )

    kept_row_phase(cfg, w.shape, segments, compact_split_of, w_gmem, o_gmem, scratch, w_union, mark)

  parts = jax.ShapeDtypeStruct((s_n, n, ROWS), jnp.float32)
  marks_type = jax.ShapeDtypeStruct((programs, int(items_per_program(cfg, n).max()), MARKS), jnp.int32)
  return plgpu.kernel(
    mosaic_fused_partials,  # the kernel's name in profiles
    out_type=(parts, marks_type) if marks else parts,
    grid=(programs,),
    grid_names=("sm",),
    scratch_types=scratch_types(cfg, [("", kp)]),
    compiler_params=compiler_params(),
  )(x, thresholds, *((scales,) if wina else ()), w)


def partials_output(parts: jax.Array, m: int, dtype) -> jax.Array:
  """Partial sums [S, N, 8] (any of this module's kernels, or `mosaic_mlp`'s) -> the site's output [m, N] in
  dtype: the splits summed in float32, the batch rows past m dropped."""
  return jnp.sum(parts, axis=0)[:, :m].T.astype(dtype)


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


def smem_bytes(cfg: MosaicConfig, kps: Sequence[int]) -> int:
  """Shared memory a program takes: the weight tiles in flight, the store's [BN, 8] float32 and, per phase
  that compacts in the kernel over splits of kp rows (`scratch_types`), x^T's tiles and the kept ids."""
  tiles = cfg.stages * cfg.block_k * cfg.block_n * 2 + cfg.block_n * ROWS * 4
  return tiles + sum(kp * (ROWS * 2 + 4) for kp in kps)


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
  if cfg.compact == "xla" and cfg.block_n != TILE_COLS:
    return (
      f"block_n={cfg.block_n}: compact 'xla' (rows_partials) takes {TILE_COLS} (compact 'kernel' up to 256)"
    )
  kp = kernel.shape[0] // cfg.splits
  if cfg.compact == "kernel":
    smem = smem_bytes(cfg, [kp])
  else:  # rows_partials: x^T per stage and the ids
    smem = smem_bytes(cfg, []) + cfg.stages * ROWS * cfg.block_k * 2 + kp * 4
  if smem > SMEM_BYTES:
    return (
      f"{smem} bytes of shared memory a program (at most {SMEM_BYTES}; "
      f"{kp} rows a split: set more splits or fewer stages)"
    )
  return None


def masked_linear_mosaic(
  x: jax.Array,
  kernel: jax.Array,
  thresholds: jax.Array,
  scales: Optional[jax.Array],
  segments: Sequence[int],
  cfg: MosaicConfig,
  *,
  reference: bool = False,
) -> jax.Array:
  """`masked_linear` on the Mosaic GPU kernel: x [M <= 8, K] bf16, kernel [K, N] bf16, thresholds [S_seg],
  scales None or [S_seg, K] -> [M, N] in x's dtype. compact 'xla': `compact`, then `rows_partials`; 'kernel':
  `fused_partials`. reference: the kernels' shared contract in jnp instead (`compact`, then
  `partials_reference`: the CPU path)."""
  m, k = x.shape
  if why := unsupported(m, x.dtype, kernel, segments, cfg):
    raise ValueError(f"the Mosaic GEMV does not take this site: {why}; use backend 'pallas' or 'xla'")
  cfg = resolved(cfg, k, kernel.shape[1])
  return _masked_linear_mosaic(x, kernel, thresholds, scales, tuple(int(s) for s in segments), cfg, reference)


@functools.partial(jax.jit, static_argnames=("segments", "cfg", "reference"))
def _masked_linear_mosaic(
  x, kernel, thresholds, scales, segments: tuple[int, ...], cfg: MosaicConfig, reference
):
  """`masked_linear_mosaic` past its checks, under its own jit: a decode step's layers call it with the same
  shapes and statics, so their kernels lower once, not once a layer (~1.2 s a Llama-3-8B layer on the CPU)."""
  m = x.shape[0]
  if cfg.compact == "kernel" and not reference:
    scales = None if scales is None else scales.astype(jnp.float32)
    parts = fused_partials(x, thresholds.astype(jnp.float32), scales, kernel, cfg, segments)
  else:
    keep = jnp.stack(
      [keep_mask(x, thresholds[g], None if scales is None else scales[g]) for g in range(len(segments))]
    )
    impl = partials_reference if reference else rows_partials
    parts = impl(*compact(x, keep, cfg.splits), kernel, cfg, segments)
  return partials_output(parts, m, x.dtype)

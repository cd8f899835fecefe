"""Phases a persistent Mosaic GPU launch runs around its kept-row GEMVs (issue 25), shared by the MLP launch
(`mosaic_mlp`) and the one-site launch (`mosaic_site`): the RMSNorm of the launch's input inside the compaction
(`rms_partials`, then `normed_values` as `compact_split`'s value source), and the site's output after a grid-wide
wait (`site_output`: its partial sums summed in split order, rounded as the site's output, optionally added to
the residual stream). Each has its jnp contract here (`site_sum`, `residual_output`; the norm's is `layers.rms_norm`).

Interpret mode does not run Mosaic GPU kernels; off the GPU these lower only (`tests/test_mosaic_mlp.py`,
`tests/test_mosaic_site.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, llvm, memref
from jaxlib.mlir.dialects import math as mlir_math

from wina_jax.kernels import mosaic_gemv as mg
from wina_jax.kernels import mosaic_sync as ms


def ir_types():
  """Inside a kernel body: (f32, bf16, i32, index types, c(v): an i32 constant)."""
  i32 = ir.IntegerType.get_signless(32)
  return ir.F32Type.get(), ir.BF16Type.get(), i32, ir.IndexType.get(), functools.partial(mgpu_utils.c, ty=i32)


def split_sum(parts, row, splits: int):
  """Inside a kernel body: row `row` (i32) of partial sums parts [S, N, 8] float32 (global), the S splits summed
  in order -> [8] bf16, one per batch row (as `site_sum`)."""
  f32, bf16, _, _, c = ir_types()
  stride = ir.MemRefType(parts.type).shape[1] * mg.ROWS  # one split
  total = None
  for s in range(splits):
    got = mg.load_vector(parts, arith.addi(arith.muli(row, c(mg.ROWS)), c(s * stride)), mg.ROWS, f32)
    total = got if total is None else [arith.addf(a, b) for a, b in zip(total, got)]
  return [arith.truncf(bf16, v) for v in total]


def each_row(n: int, programs: int, body) -> None:
  """Inside a kernel body: body(r) for every row r < n once over the grid (thread t of program p takes
  r = t + 128 * (p + programs * i))."""
  c, program = ir_types()[-1], ms.program()
  for i in range(-(-n // (mg.WARPGROUP * programs))):
    r = arith.addi(mgpu_utils.thread_idx(), arith.muli(arith.addi(program, c(programs * i)), c(mg.WARPGROUP)))
    with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.ult, r, c(n))):
      body(r)


def site_output(parts, out, *, residual=None, splits: int, programs: int) -> None:
  """A site's output, each column once over the grid: out [M, N] bf16 (global) column n = y, y the partial sums
  (parts [S, N, 8] float32, global, the splits summed in order) rounded to bfloat16 (`site_sum`); with residual
  [M, N] bf16 (global), residual[:, n] + y instead, the sum in float32 rounded to bfloat16 (`residual_output`).
  Runs after a grid-wide wait: every program's partials are read."""
  rows, n = out.shape
  refs = (parts, out) + (() if residual is None else (residual,))

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * len(refs))
  def run(ctx, parts, out, *res):
    del ctx
    f32, bf16, _, index = ir_types()[:4]

    def column(n):
      y, at = split_sum(parts, n, splits), arith.index_cast(index, n)
      for b in range(rows):
        where = [mgpu_utils.c(b, index), at]
        if res:
          total = arith.addf(arith.extf(f32, memref.load(res[0], where)), arith.extf(f32, y[b]))
          memref.store(arith.truncf(bf16, total), out, where)
        else:
          memref.store(y[b], out, where)

    each_row(n, programs, column)

  run(*refs)


def rms_partials(x_gmem, sums) -> None:
  """The first half of the RMSNorm in the launch: each warp's float32 sum of x^2 per batch row of x [M, D] bf16
  (global; thread t: elements t * D / 128 ...) into sums [WARPS * 8] f32 (shared: warp w, row b at w * 8 + b),
  then the warpgroup's barrier. `normed_values` finishes it where the compaction reads x."""
  m, d = x_gmem.shape
  per = d // mg.WARPGROUP

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))
  def run(ctx, x, buf):
    del ctx
    f32, bf16, i32, index, c = ir_types()
    tid = mgpu_utils.thread_idx()
    lane, warp = arith.andi(tid, c(31)), arith.shrui(tid, c(5))
    xv = mg.row_loads(x, m, bf16, arith.muli(tid, c(per)), per)
    for b in range(m):
      acc = mgpu_utils.c(0.0, f32)
      for v in xv[b]:
        v32 = arith.extf(f32, v)
        acc = arith.addf(acc, arith.mulf(v32, v32))
      for step in (16, 8, 4, 2, 1):  # the warp's sum, by butterfly shuffles
        other = llvm.inline_asm(f32, [acc], f"shfl.sync.bfly.b32 $0, $1, {step}, 31, -1;", "=f,f")
        acc = arith.addf(acc, other)
      with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.eq, lane, c(0))):
        at = arith.addi(arith.muli(warp, c(mg.ROWS)), c(b))
        memref.store(acc, buf, [arith.index_cast(index, at)])
    ms.barrier()  # unaligned: the stores above sit in a `when`

  run(x_gmem, sums)


def normed_values(rows: int, d: int, eps: float):
  """`compact_split`'s value source for a split of the RMSNorm's output: srcs (x [M, kp] bf16 and gain [kp] bf16,
  global: the split's part; sums: `rms_partials`' shared [WARPS * 8] f32) -> gain * bf16(x * rsqrt(sum / d +
  eps)) per batch row, rounded as `layers.rms_norm` rounds (float32 product, bf16, bf16 product)."""

  def values(refs, first, per):
    x, gain, sums = refs
    f32, bf16, index = ir.F32Type.get(), ir.BF16Type.get(), ir.IndexType.get()
    xv = mg.row_loads(x, rows, bf16, first, per)
    gv = mg.row_loads(gain, 1, bf16, first, per)[0]
    out = []
    for b in range(rows):
      total = None
      for w in range(mg.WARPS):  # the warps' sums in warp order
        part = memref.load(sums, [mgpu_utils.c(w * mg.ROWS + b, index)])
        total = part if total is None else arith.addf(total, part)
      mean = arith.divf(total, mgpu_utils.c(float(d), f32))
      inv = mlir_math.rsqrt(arith.addf(mean, mgpu_utils.c(float(eps), f32)))

      def normed(v, g):
        y = arith.truncf(bf16, arith.mulf(arith.extf(f32, v), inv))  # y.astype(x.dtype)
        return arith.truncf(bf16, arith.mulf(arith.extf(f32, g), arith.extf(f32, y)))  # scale * y

      out.append([normed(v, g) for v, g in zip(xv[b], gv)])
    return out

  return values


def takes_norm(gain: jax.Array, d: int) -> bool:
  """Whether the launch can apply the RMSNorm of this gain itself (`mlp_partials(gain=...)`): bf16 [d], d a
  multiple of the warpgroup's 128 threads."""
  return gain.shape == (d,) and gain.dtype == jnp.bfloat16 and d % mg.WARPGROUP == 0


def check_inputs(m: int, k: int, n: int, *, gain=None, residual=None, counter=None) -> None:
  """A launch's optional inputs for its input [m, k] and output [m, n] (`mlp_partials`, `site_launch`):
  ValueError naming the fix for a gain the norm cannot take (`takes_norm`), a residual not bf16 [m, n], or a
  counter not int32 [>= 2]."""
  if gain is not None and not takes_norm(gain, k):
    raise ValueError(
      f"gain {gain.shape} {gain.dtype}: the norm in the launch takes a bf16 [{k}] gain, {k} % 128 == 0"
    )
  if residual is not None and (residual.shape != (m, n) or residual.dtype != jnp.bfloat16):
    raise ValueError(
      f"residual {residual.shape} {residual.dtype}: the launch adds a bf16 [{m}, {n}] residual"
    )
  if counter is not None and (counter.ndim != 1 or counter.shape[0] < 2 or counter.dtype != jnp.int32):
    raise ValueError(
      f"counter {counter.shape} {counter.dtype}: give int32 [3] zeros (grid_sync.new_counter())"
    )


def compactor(inp, thr, scale, kp: int, phase, *, rows: int, block_k: int, norm=None, eps: float = 0.0):
  """A kept-row phase's compaction (`mosaic_gemv.kept_row_phase`'s compact_split_of): compact(s, g) thresholds
  split s of inp [M, K] bf16 (global) against segment g's threshold thr[g] and scales scale[g] (or None) into
  `phase`'s shared memory. norm: (gain [K] bf16 global, `rms_partials`' sums), inp then being the RMSNorm's
  input (`normed_values`)."""
  width = inp.shape[1]

  def compact(s, g):
    split = pl.ds(s * kp, kp)
    mg.compact_split(
      (inp.at[:, split],) if norm is None else (inp.at[:, split], norm[0].at[split], norm[1]),
      mg.x_values(rows) if norm is None else normed_values(rows, width, eps),
      thr.at[pl.ds(g, 1)],
      None if scale is None else scale.at[g, split],
      phase,
      rows=rows,
      block_k=block_k,
    )

  return compact


def site_sum(parts: jax.Array, m: int) -> jax.Array:
  """Partial sums [S, N, 8] float32 -> the site's output [M, N] bf16: the splits summed in order, as the launch
  sums them (`mosaic_gemv.partials_output` leaves the order to XLA)."""
  return functools.reduce(jnp.add, list(parts))[:, :m].T.astype(jnp.bfloat16)


def residual_output(parts_down: jax.Array, residual: jax.Array) -> jax.Array:
  """The new residual stream [M, D] bf16 from the down partials [S, D, 8] and the residual [M, D] bf16, as
  `site_output` builds it: residual + the site's output, in float32, rounded to bfloat16."""
  y = site_sum(parts_down, residual.shape[0]).astype(jnp.float32)
  return (residual.astype(jnp.float32) + y).astype(jnp.bfloat16)

"""A gated MLP's two sparse sites in one persistent Mosaic GPU launch (issue 25): gate|up, a grid-wide wait, down.

`mlp_partials`: on one program per SM, the kept-row phase of the fused gate|up site (`mosaic_gemv.kept_row_phase`,
each program thresholding and compacting its split of x), then `mosaic_sync.grid_wait`, then the down site's
phase, whose compaction builds its own input from the gate|up partial sums every program wrote: per row, the
splits' float32 sums rounded to bfloat16 as the site's outputs are (g, u), then a = SiLU(g) * u rounded op by
op as XLA rounds the model's bfloat16 `mlp_block` (`swiglu`); then |a| * scale > the down site's threshold. One launch instead of two, and no XLA kernel between them. XLA still sums the down
partials (and adds the residual) after it.

The CPU path and the kernel's contract: `mlp_reference` (jnp, the same sums in the same order). Interpret mode
does not run Mosaic GPU kernels; off the GPU the kernel lowers only (`tests/test_mosaic_mlp.py`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith
from jaxlib.mlir.dialects import math as mlir_math

from wina_jax.kernels import mosaic_gemv as mg
from wina_jax.kernels import mosaic_sync as ms
from wina_jax.kernels import persistent_config as PC
from wina_jax.kernels.reference import keep_mask


def swiglu_values(rows: int, splits: int):
  """`compact_split`'s value source for the down site: srcs (gate, up), each [S, kp, 8] float32 (global: the
  gate|up phase's partial sums of this split's rows) -> `swiglu`(g, u) per batch row, with g and u the sums
  over the S splits (in split order) rounded to bfloat16."""

  def values(refs, first, per):
    f32, bf16, i32 = ir.F32Type.get(), ir.BF16Type.get(), ir.IntegerType.get_signless(32)
    c = functools.partial(mgpu_utils.c, ty=i32)
    one = mgpu_utils.c(1.0, f32)

    def summed(ref, j):
      """Row first + j of ref, summed over the splits and rounded: [8] bf16 values, one per batch row."""
      stride = ir.MemRefType(ref.type).get_strides_and_offset()[0][0]
      at = arith.muli(arith.addi(first, c(j)), c(mg.ROWS))
      total = None
      for s in range(splits):
        got = mg.load_vector(ref, arith.addi(at, c(s * stride)), mg.ROWS, f32)
        total = got if total is None else [arith.addf(a, b) for a, b in zip(total, got)]
      return [arith.truncf(bf16, v) for v in total]

    def up(v):
      return arith.extf(f32, v)

    def rounded(v):
      return up(arith.truncf(bf16, v))

    out = [[None] * per for _ in range(rows)]
    for j in range(per):
      g, u = summed(refs[0], j), summed(refs[1], j)
      for b in range(rows):  # `swiglu`'s roundings, op by op
        x = up(g[b])
        sig = rounded(arith.divf(one, rounded(arith.addf(one, rounded(mlir_math.exp(arith.negf(x)))))))
        out[b][j] = arith.truncf(bf16, arith.mulf(rounded(arith.mulf(x, sig)), up(u[b])))
    return out

  return values


def configs(cfg: mg.MosaicConfig, d: int, f: int) -> tuple[mg.MosaicConfig, mg.MosaicConfig]:
  """cfg resolved for gate|up ([d, 2f]) and for down ([f, d]): each phase's own splits (compaction in the
  kernel), one grid."""
  cfg = dataclasses.replace(cfg, gather="cp_async", compact="kernel")
  gu, down = mg.resolved(cfg, d, 2 * f), mg.resolved(cfg, f, d)
  if gu.programs != down.programs:
    raise ValueError(f"the phases resolved to {gu.programs} and {down.programs} programs; give programs=")
  return gu, down


@functools.partial(jax.jit, static_argnames=("cfg", "marks"))  # the layers' identical launches lower once
def mlp_partials(
  x: jax.Array,
  thr_gu: jax.Array,
  sc_gu: Optional[jax.Array],
  w_gu: jax.Array,
  thr_down: jax.Array,
  sc_down: Optional[jax.Array],
  w_down: jax.Array,
  cfg: mg.MosaicConfig,
  *,
  marks: bool = False,
):
  """x [M <= 8, D] bf16 (the MLP's normed input); thr_gu [2] f32 (gate's, up's), sc_gu None or [2, D] f32;
  w_gu [D, 2F] bf16 (gate's columns, then up's); thr_down [1] f32, sc_down None or [1, F] f32; w_down [F, D]
  bf16 -> (gate|up partials [S1, 2F, 8] f32, down partials [S2, D, 8] f32, gave_up [programs] int32: the grid
  wait's watchdog, `mosaic_sync.check_gave_up`), plus, with marks, the clock [programs, items, MARKS] int32
  (gate|up's items, then down's: `mosaic_gemv.fused_partials`' marks per item)."""
  (m, d), f = x.shape, w_down.shape[0]
  if w_gu.shape != (d, 2 * f) or w_down.shape != (f, d):
    raise ValueError(f"w_gu {w_gu.shape} and w_down {w_down.shape} are not [{d}, 2F] and [F, {d}]")
  if (sc_gu is None) != (sc_down is None):
    raise ValueError("give WINA scales at both sites or at neither (ones where a site has none)")
  cfg_gu, cfg_down = configs(cfg, d, f)
  programs, bk = cfg_gu.programs, cfg.block_k
  PC.check_grid(programs, PC.sm_count() or ms.H100_SMS)
  kp_gu, kp_down = d // cfg_gu.splits, f // cfg_down.splits
  items_gu = int(mg.items_per_program(cfg_gu, 2 * f).max())  # the clock's rows of gate|up, then down's
  items_down = int(mg.items_per_program(cfg_down, d).max())
  wina = sc_gu is not None

  def mosaic_mlp(x_gmem, thr_gu_gmem, thr_down_gmem, *refs, **scratch):
    sc_gu_gmem, sc_down_gmem = refs[:2] if wina else (None, None)
    w_gu_gmem, w_down_gmem, parts_gu, parts_down, gave_up, *marks_gmem = refs[2 * wina :]
    pid = lax.axis_index("sm")
    w_union = scratch["w_union"]
    phase_a = mg.PhaseScratch(scratch["a_xk"], scratch["a_ids"], scratch["a_totals"])
    phase_b = mg.PhaseScratch(scratch["b_xk"], scratch["b_ids"], scratch["b_totals"])

    def mark(offset):
      def at(j, e):
        if marks_gmem:
          ms.clock(marks_gmem[0].at[pid, offset + j, pl.ds(e, 1)])

      return at

    def compact_gu(s, g):
      mg.compact_split(
        (x_gmem.at[:, pl.ds(s * kp_gu, kp_gu)],),
        mg.x_values(m),
        thr_gu_gmem.at[pl.ds(g, 1)],
        None if sc_gu_gmem is None else sc_gu_gmem.at[g, pl.ds(s * kp_gu, kp_gu)],
        phase_a,
        rows=m,
        block_k=bk,
      )

    def compact_down(s, g):
      del g  # one segment
      rows = pl.ds(s * kp_down, kp_down)
      mg.compact_split(
        (parts_gu.at[:, rows, :], parts_gu.at[:, pl.ds(f + s * kp_down, kp_down), :]),
        swiglu_values(m, cfg_gu.splits),
        thr_down_gmem.at[pl.ds(0, 1)],
        None if sc_down_gmem is None else sc_down_gmem.at[0, rows],
        phase_b,
        rows=m,
        block_k=bk,
      )

    ms.clear(gave_up.at[pl.ds(pid, 1)])
    mg.kept_row_phase(cfg_gu, (d, 2 * f), (f, f), compact_gu, w_gu_gmem, parts_gu, phase_a, w_union, mark(0))
    plgpu.wait_smem_to_gmem(0)  # this program's partial sums are written, not only read out of shared memory
    ms.grid_wait(ms.semaphore(), gave_up.at[pl.ds(pid, 1)], 1, programs)
    mg.kept_row_phase(
      cfg_down, (f, d), (d,), compact_down, w_down_gmem, parts_down, phase_b, w_union, mark(items_gu)
    )

  out_type = [
    jax.ShapeDtypeStruct((cfg_gu.splits, 2 * f, mg.ROWS), jnp.float32),
    jax.ShapeDtypeStruct((cfg_down.splits, d, mg.ROWS), jnp.float32),
    jax.ShapeDtypeStruct((programs,), jnp.int32),
  ]
  if marks:
    out_type.append(jax.ShapeDtypeStruct((programs, items_gu + items_down, mg.MARKS), jnp.int32))
  scratch = mg.scratch_types(cfg, [("a_", kp_gu), ("b_", kp_down)])
  scales = (sc_gu, sc_down) if wina else ()
  return plgpu.kernel(
    mosaic_mlp,
    out_type=tuple(out_type),
    grid=(programs,),
    grid_names=("sm",),
    scratch_types=scratch,
    compiler_params=mg.compiler_params(),
  )(x, thr_gu, thr_down, *scales, w_gu, w_down)


def mlp_reference(x, thr_gu, sc_gu, w_gu, thr_down, sc_down, w_down, cfg: mg.MosaicConfig):
  """`mlp_partials`' contract in jnp (the CPU path): (gate|up partials, down partials), the down input built
  as the kernel builds it (`swiglu_values`)."""
  (m, d), f = x.shape, w_down.shape[0]
  cfg_gu, cfg_down = configs(cfg, d, f)

  def site(inp, thr, sc, w, c, segments):
    keep = jnp.stack([keep_mask(inp, thr[g], None if sc is None else sc[g]) for g in range(len(segments))])
    return mg.partials_reference(*mg.compact(inp, keep, c.splits), w, c, segments)

  parts_gu = site(x, thr_gu, sc_gu, w_gu, cfg_gu, (f, f))
  return parts_gu, site(down_input(parts_gu, m), thr_down, sc_down, w_down, cfg_down, (d,))


def down_input(parts_gu: jax.Array, m: int) -> jax.Array:
  """The down site's input [M, F] bf16 from the gate|up partials [S, 2F, 8], as `swiglu_values` builds it."""
  f = parts_gu.shape[1] // 2
  total = functools.reduce(jnp.add, list(parts_gu))[:, :m].T  # [M, 2F], the splits summed in order
  return swiglu(total[:, :f].astype(jnp.bfloat16), total[:, f:].astype(jnp.bfloat16))


def swiglu(g: jax.Array, u: jax.Array) -> jax.Array:
  """bf16 SiLU(g) * u rounded op by op as XLA computes `jax.nn.silu(g) * u` on bfloat16: its logistic expands
  to 1 / (1 + exp(-g)), each op in float32 rounded to bfloat16, then the two products, each rounded."""

  def rounded(v):
    return v.astype(jnp.bfloat16).astype(jnp.float32)

  x = g.astype(jnp.float32)
  sig = rounded(1 / rounded(1 + rounded(jnp.exp(-x))))
  return (rounded(x * sig) * u.astype(jnp.float32)).astype(jnp.bfloat16)


def unsupported(m: int, d: int, f: int, cfg: mg.MosaicConfig) -> Optional[str]:
  """Why `mlp_partials` cannot take this MLP (None if it can): the rows, a shape the tiling does not divide,
  or more shared memory than a program may take (`mosaic_gemv.smem_bytes` of both phases)."""
  if m > mg.ROWS:
    return f"{m} rows (at most {mg.ROWS})"
  try:
    cfg_gu, cfg_down = configs(cfg, d, f)
  except ValueError as e:
    return str(e)
  kps = (d // cfg_gu.splits, f // cfg_down.splits)
  if max(kps) > mg.FUSED_MAX_KP:
    return f"splits of {max(kps)} rows (at most {mg.FUSED_MAX_KP}): set splits"
  smem = mg.smem_bytes(cfg, kps)
  if smem > mg.SMEM_BYTES:
    return f"{smem} bytes of shared memory a program (at most {mg.SMEM_BYTES}): fewer stages or more splits"
  return None

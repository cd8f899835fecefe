"""A gated MLP's two sparse sites in one persistent Mosaic GPU launch (issue 25): gate|up, wait, SwiGLU, wait, down
[, wait, residual add].

`mlp_partials`: on one program per SM, the kept-row phase of the fused gate|up site (`mosaic_gemv.kept_row_phase`,
each program thresholding and compacting its split of x, optionally applying the RMSNorm), a grid-wide wait
(`mosaic_sync.grid_wait`), then `activation`: the down site's input a = SiLU(g) * u [M, F] bf16, each row once
over the grid, from the splits' float32 sums rounded to bfloat16 as the site's outputs are (g, u), then op by op
as XLA rounds the model's bfloat16 `mlp_block` (`swiglu`); a second wait; then the down site's phase, which
compacts a as gate|up compacts x. Given the residual stream, a third wait and `mosaic_phases.site_output`: the
down partials summed and added to it, so no XLA kernel runs between this launch and the next layer's. (Session 21's
single-wait launch built a inside every down program's compaction from the partials, [S, 2F, 8] float32 of which
batch 1 uses one row in 8: each down split's programs read it again, and the down phase spanned 8.7 us at 99.9 %
sparsity.)

The CPU path and the kernel's contract: `mlp_reference` (jnp, the same sums in the same order). Interpret mode
does not run Mosaic GPU kernels; off the GPU the kernel lowers only (`tests/test_mosaic_mlp.py`).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, memref
from jaxlib.mlir.dialects import math as mlir_math

from wina_jax.kernels import mosaic_gemv as mg
from wina_jax.kernels import mosaic_phases as P
from wina_jax.kernels import mosaic_sync as ms
from wina_jax.kernels import persistent_config as PC
from wina_jax.kernels.reference import keep_mask
from wina_jax.layers import rms_norm


def _swiglu_ir(g, u):
  """bf16 g, u (MLIR values) -> bf16 `swiglu`(g, u): float32 ops, each rounded to bfloat16 as `swiglu`'s."""
  f32, bf16 = ir.F32Type.get(), ir.BF16Type.get()
  one = mgpu_utils.c(1.0, f32)

  def rounded(v):
    return arith.extf(f32, arith.truncf(bf16, v))

  x = arith.extf(f32, g)
  sig = rounded(arith.divf(one, rounded(arith.addf(one, rounded(mlir_math.exp(arith.negf(x)))))))
  return arith.truncf(bf16, arith.mulf(rounded(arith.mulf(x, sig)), arith.extf(f32, u)))


def activation(parts_gu, a_out, *, splits: int, programs: int) -> None:
  """The down site's input, each row once over the grid: a_out [M, F] bf16 (global) row r = `swiglu`(g, u), g
  and u the gate|up partials' sums (parts_gu [S, 2F, 8] float32, global; rows r and F + r, the S splits summed
  in order) rounded to bfloat16 (as `down_input`). Plain stores: the grid-wide wait after it publishes them."""
  rows, f = a_out.shape

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))
  def run(ctx, parts, a):
    del ctx
    index, c = P.ir_types()[3:]

    def row(r):
      g, u = P.split_sum(parts, r, splits), P.split_sum(parts, arith.addi(r, c(f)), splits)
      for b in range(rows):
        memref.store(_swiglu_ir(g[b], u[b]), a, [mgpu_utils.c(b, index), arith.index_cast(index, r)])

    P.each_row(f, programs, row)

  run(parts_gu, a_out)


def configs(cfg: mg.MosaicConfig, d: int, f: int) -> tuple[mg.MosaicConfig, mg.MosaicConfig]:
  """cfg resolved for gate|up ([d, 2f]) and for down ([f, d]): each phase's own splits (compaction in the
  kernel), one grid."""
  cfg = mg.in_kernel(cfg)
  gu, down = mg.resolved(cfg, d, 2 * f), mg.resolved(cfg, f, d)
  if gu.programs != down.programs:
    raise ValueError(f"the phases resolved to {gu.programs} and {down.programs} programs; give programs=")
  return gu, down


# jitted: the layers' identical launches lower once
@functools.partial(jax.jit, static_argnames=("cfg", "marks", "eps"))
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
  gain: Optional[jax.Array] = None,
  eps: float = 0.0,
  residual: Optional[jax.Array] = None,
  counter: Optional[jax.Array] = None,
  marks: bool = False,
):
  """x [M <= 8, D] bf16 (the MLP's normed input); thr_gu [2] f32 (gate's, up's), sc_gu None or [2, D] f32;
  w_gu [D, 2F] bf16 (gate's columns, then up's); thr_down [1] f32, sc_down None or [1, F] f32; w_down [F, D]
  bf16 -> (gate|up partials [S1, 2F, 8] f32, the down site's input a [M, F] bf16 (`activation`), down partials
  [S2, D, 8] f32, [with residual: the new residual stream [M, D] bf16,] gave_up [programs] int32: the grid
  waits' watchdog, `mosaic_sync.check_gave_up`), plus, with marks, the clock [programs, items, MARKS] int32
  (gate|up's items, then down's: `mosaic_gemv.fused_partials`' marks per item). Phases: gate|up, wait,
  `activation`, wait, down[, wait, `mosaic_phases.site_output`]. gain [D] bf16 (with eps): x is the
  un-normalised residual stream and gate|up's compaction applies the RMSNorm (`rms_partials`, `normed_values`),
  so no XLA kernel runs it before the launch. residual [M, D] bf16: what the MLP's output is added to (x
  itself, or its rotation), so no XLA kernel sums the down partials after the launch. counter int32 [>= 2]
  zeros (`grid_sync.new_counter`): the waits count on it and the launch leaves it at zero
  (`mosaic_sync.grid_leave`), so one buffer made once serves every launch; None: a semaphore that Pallas zeroes
  before each launch (one more XLA op a launch)."""
  (m, d), f = x.shape, w_down.shape[0]
  if w_gu.shape != (d, 2 * f) or w_down.shape != (f, d):
    raise ValueError(f"w_gu {w_gu.shape} and w_down {w_down.shape} are not [{d}, 2F] and [F, {d}]")
  if (sc_gu is None) != (sc_down is None):
    raise ValueError("give WINA scales at both sites or at neither (ones where a site has none)")
  P.check_inputs(m, d, d, gain=gain, residual=residual, counter=counter)
  cfg_gu, cfg_down = configs(cfg, d, f)
  programs, bk = cfg_gu.programs, cfg.block_k
  PC.check_grid(programs, PC.sm_count() or ms.H100_SMS)
  kp_gu, kp_down = d // cfg_gu.splits, f // cfg_down.splits
  items_gu = int(mg.items_per_program(cfg_gu, 2 * f).max())  # the clock's rows of gate|up, then down's
  items_down = int(mg.items_per_program(cfg_down, d).max())
  wina = sc_gu is not None

  normed, adds, counted = gain is not None, residual is not None, counter is not None

  def mosaic_mlp(x_gmem, thr_gu_gmem, thr_down_gmem, *refs, **scratch):
    ms.grid_dependency(cfg.pdl)
    gain_gmem = refs[0] if normed else None
    refs = refs[normed:]
    sc_gu_gmem, sc_down_gmem = refs[:2] if wina else (None, None)
    res_gmem = refs[2 * wina] if adds else None
    counter_gmem = refs[2 * wina + adds] if counted else None
    w_gu_gmem, w_down_gmem, parts_gu, a_gmem, parts_down, *refs = refs[2 * wina + adds + counted :]
    h_gmem = refs.pop(0) if adds else None
    gave_up, *marks_gmem = refs
    pid = lax.axis_index("sm")
    w_union = scratch["w_union"]

    def mark(offset):
      def at(j, e):
        if marks_gmem:
          ms.clock(marks_gmem[0].at[pid, offset + j, pl.ds(e, 1)])

      return at

    phase_a = mg.PhaseScratch(scratch["a_xk"], scratch["a_ids"], scratch["a_totals"])
    phase_b = mg.PhaseScratch(scratch["b_xk"], scratch["b_ids"], scratch["b_totals"])
    norm = (gain_gmem, scratch["sums"]) if normed else None
    compact_gu = P.compactor(
      x_gmem, thr_gu_gmem, sc_gu_gmem, kp_gu, phase_a, rows=m, block_k=bk, norm=norm, eps=eps
    )
    compact_down = P.compactor(a_gmem, thr_down_gmem, sc_down_gmem, kp_down, phase_b, rows=m, block_k=bk)
    sem, gave = counter_gmem if counted else ms.semaphore(), gave_up.at[pl.ds(pid, 1)]
    ms.clear(gave)
    if normed:
      P.rms_partials(x_gmem, scratch["sums"])
    mg.kept_row_phase(cfg_gu, (d, 2 * f), (f, f), compact_gu, w_gu_gmem, parts_gu, phase_a, w_union, mark(0))
    plgpu.wait_smem_to_gmem(0)  # this program's partial sums are written, not only read out of shared memory
    ms.grid_wait(sem, gave, 1, programs)
    activation(parts_gu, a_gmem, splits=cfg_gu.splits, programs=programs)
    ms.grid_wait(sem, gave, 2, programs)
    mg.kept_row_phase(
      cfg_down, (f, d), (d,), compact_down, w_down_gmem, parts_down, phase_b, w_union, mark(items_gu)
    )
    if adds:
      plgpu.wait_smem_to_gmem(0)
      ms.grid_wait(sem, gave, 3, programs)
      P.site_output(parts_down, h_gmem, residual=res_gmem, splits=cfg_down.splits, programs=programs)
    if counted:
      ms.grid_leave(counter_gmem, programs)

  out_type = [
    jax.ShapeDtypeStruct((cfg_gu.splits, 2 * f, mg.ROWS), jnp.float32),
    jax.ShapeDtypeStruct((m, f), jnp.bfloat16),
    jax.ShapeDtypeStruct((cfg_down.splits, d, mg.ROWS), jnp.float32),
    *([jax.ShapeDtypeStruct((m, d), jnp.bfloat16)] if adds else []),
    jax.ShapeDtypeStruct((programs,), jnp.int32),
  ]
  if marks:
    out_type.append(jax.ShapeDtypeStruct((programs, items_gu + items_down, mg.MARKS), jnp.int32))
  scratch = mg.scratch_types(cfg, [("a_", kp_gu), ("b_", kp_down)])
  if normed:
    scratch["sums"] = plgpu.SMEM((mg.WARPS * mg.ROWS,), jnp.float32)
  # the kernel's optional inputs, in the body's order
  optional = tuple(v for v in (gain, sc_gu, sc_down, residual, counter) if v is not None)
  return plgpu.kernel(
    mosaic_mlp,
    out_type=tuple(out_type),
    grid=(programs,),
    grid_names=("sm",),
    scratch_types=scratch,
    compiler_params=mg.compiler_params(),
  )(x, thr_gu, thr_down, *optional, w_gu, w_down)


def mlp_reference(
  x,
  thr_gu,
  sc_gu,
  w_gu,
  thr_down,
  sc_down,
  w_down,
  cfg: mg.MosaicConfig,
  *,
  gain=None,
  eps: float = 0.0,
  residual=None,
):
  """`mlp_partials`' contract in jnp (the CPU path): (gate|up partials, the down input a as `activation` builds
  it, down partials[, with residual: the new residual stream as `mosaic_phases.site_output` builds it]); with
  gain, x is normalised first (`layers.rms_norm`)."""
  (m, d), f = x.shape, w_down.shape[0]
  cfg_gu, cfg_down = configs(cfg, d, f)
  if gain is not None:
    x = rms_norm(x, gain, eps)

  def site(inp, thr, sc, w, c, segments):
    keep = jnp.stack([keep_mask(inp, thr[g], None if sc is None else sc[g]) for g in range(len(segments))])
    return mg.partials_reference(*mg.compact(inp, keep, c.splits), w, c, segments)

  parts_gu = site(x, thr_gu, sc_gu, w_gu, cfg_gu, (f, f))
  a = down_input(parts_gu, m)
  parts_down = site(a, thr_down, sc_down, w_down, cfg_down, (d,))
  return (parts_gu, a, parts_down) + (() if residual is None else (P.residual_output(parts_down, residual),))


def down_input(parts_gu: jax.Array, m: int) -> jax.Array:
  """The down site's input [M, F] bf16 from the gate|up partials [S, 2F, 8], as `activation` builds it."""
  g, u = jnp.split(P.site_sum(parts_gu, m), 2, axis=-1)
  return swiglu(g, u)


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

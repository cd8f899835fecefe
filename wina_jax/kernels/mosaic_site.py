"""One sparse site as one Mosaic GPU launch that also runs what XLA runs around it (issue 25): the RMSNorm before
it, the sum of its partials and the residual add after it.

`site_launch`: `mosaic_gemv.fused_partials`' kept-row phase, its compaction normalising x on the way
(`mosaic_phases.rms_partials` / `normed_values`, as the MLP launch does) where given the norm's gain, and, with
`summed` or given the residual stream, a grid-wide wait and `mosaic_phases.site_output`: the site's partial
sums summed into its bf16 output, added to the residual where given. The norm then needs no XLA kernel before
the site (two a layer at q|k|v), and the output none after it (the partials' reduction; at o_proj also the
add); the wait costs about what one kernel boundary costs (session 22: 1.25-1.44 us on 132 programs).

The CPU path and the contract: `site_reference` (jnp). Interpret mode does not run Mosaic GPU kernels; off the
GPU the launch lowers only (`tests/test_mosaic_site.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from wina_jax.kernels import mosaic_gemv as mg
from wina_jax.kernels import mosaic_phases as P
from wina_jax.kernels import mosaic_sync as ms
from wina_jax.kernels import persistent_config as PC
from wina_jax.kernels.reference import keep_mask
from wina_jax.layers import rms_norm


def config(cfg: mg.MosaicConfig, k: int, n: int) -> mg.MosaicConfig:
  """cfg resolved for a [k, n] site with the compaction in the kernel (the launch's only mode)."""
  return mg.resolved(mg.in_kernel(cfg), k, n)


def unsupported(m: int, kernel: jax.Array, segments: Sequence[int], cfg: mg.MosaicConfig) -> Optional[str]:
  """Why `site_launch` cannot take this site (None if it can): `mosaic_gemv.unsupported` with the compaction in
  the kernel."""
  return mg.unsupported(m, jnp.bfloat16, kernel, segments, mg.in_kernel(cfg))


@functools.partial(jax.jit, static_argnames=("cfg", "segments", "eps", "summed"))
def site_launch(
  x: jax.Array,
  thresholds: jax.Array,
  scales: Optional[jax.Array],
  w: jax.Array,
  cfg: mg.MosaicConfig,
  segments: tuple[int, ...],
  *,
  gain: Optional[jax.Array] = None,
  eps: float = 0.0,
  residual: Optional[jax.Array] = None,
  summed: bool = False,
  counter: Optional[jax.Array] = None,
):
  """x [M <= 8, K] bf16, thresholds [G] f32, scales None or [G, K] f32, w [K, N] bf16 (N = sum(segments)) ->
  (partial sums [S, N, 8] f32, [with summed or residual: the output [M, N] bf16,] gave_up [programs] int32:
  the wait's watchdog, `mosaic_sync.check_gave_up`). gain [K] bf16 (with eps): x is un-normalised and the
  compaction applies `layers.rms_norm`'s rounding. summed: after a grid-wide wait the launch sums the partials
  in split order into the site's bf16 output (`mosaic_phases.site_sum`); residual [M, N] bf16: that output
  added to it instead (`mosaic_phases.residual_output`). counter: as `mosaic_mlp.mlp_partials`' (the wait
  counts on it and the launch leaves it at zero); None: Pallas' semaphore."""
  (m, k), n = x.shape, w.shape[1]
  if sum(segments) != n or w.shape[0] != k:
    raise ValueError(f"w {w.shape} is not [{k}, sum(segments) = {sum(segments)}]")
  P.check_inputs(m, k, n, gain=gain, residual=residual, counter=counter)
  cfg = config(cfg, k, n)
  programs, kp = cfg.programs, k // cfg.splits
  PC.check_grid(programs, PC.sm_count() or ms.H100_SMS)
  normed, adds, wina = gain is not None, residual is not None, scales is not None
  outputs = summed or adds  # the launch writes the site's output after a grid-wide wait
  counted = outputs and counter is not None

  def mosaic_site(x_gmem, thr_gmem, *refs, **scratch):
    ms.grid_dependency(cfg.pdl)
    it = iter(refs)  # inputs, then outputs, in the order `optional` and out_type give them
    gain_gmem, sc_gmem, res_gmem, counter_gmem = (
      next(it) if on else None for on in (normed, wina, adds, counted)
    )
    w_gmem, parts = next(it), next(it)
    out_gmem = next(it) if outputs else None
    gave_up = next(it)
    pid = lax.axis_index("sm")
    phase = mg.PhaseScratch(scratch["xk"], scratch["ids"], scratch["totals"])
    gave = gave_up.at[pl.ds(pid, 1)]
    ms.clear(gave)
    if normed:
      P.rms_partials(x_gmem, scratch["sums"])

    norm = (gain_gmem, scratch["sums"]) if normed else None
    compact = P.compactor(
      x_gmem, thr_gmem, sc_gmem, kp, phase, rows=m, block_k=cfg.block_k, norm=norm, eps=eps
    )
    mg.kept_row_phase(
      cfg, (k, n), segments, compact, w_gmem, parts, phase, scratch["w_union"], lambda j, e: None
    )
    if outputs:
      plgpu.wait_smem_to_gmem(0)  # this program's partial sums are written
      ms.grid_wait(counter_gmem if counted else ms.semaphore(), gave, 1, programs)
      P.site_output(parts, out_gmem, residual=res_gmem, splits=cfg.splits, programs=programs)
      if counted:
        ms.grid_leave(counter_gmem, programs)

  out_type = [jax.ShapeDtypeStruct((cfg.splits, n, mg.ROWS), jnp.float32)]
  out_type += [jax.ShapeDtypeStruct((m, n), jnp.bfloat16)] if outputs else []
  out_type += [jax.ShapeDtypeStruct((programs,), jnp.int32)]
  scratch = mg.scratch_types(cfg, [("", kp)])
  if normed:
    scratch["sums"] = plgpu.SMEM((mg.WARPS * mg.ROWS,), jnp.float32)
  optional = tuple(v for v in (gain, scales, residual, counter if outputs else None) if v is not None)
  return plgpu.kernel(
    mosaic_site,
    out_type=tuple(out_type),
    grid=(programs,),
    grid_names=("sm",),
    scratch_types=scratch,
    compiler_params=mg.compiler_params(),
  )(x, thresholds, *optional, w)


def site_reference(
  x,
  thresholds,
  scales,
  w,
  cfg: mg.MosaicConfig,
  segments: Sequence[int],
  *,
  gain=None,
  eps=0.0,
  residual=None,
  summed: bool = False,
):
  """`site_launch`'s contract in jnp (the CPU path): (partial sums[, the output as `mosaic_phases.site_output`
  builds it, with summed or residual]); with gain, x is normalised first (`layers.rms_norm`)."""
  cfg = config(cfg, x.shape[1], w.shape[1])
  if gain is not None:
    x = rms_norm(x, gain, eps)
  keep = jnp.stack(
    [keep_mask(x, thresholds[g], None if scales is None else scales[g]) for g in range(len(segments))]
  )
  parts = mg.partials_reference(*mg.compact(x, keep, cfg.splits), w, cfg, tuple(segments))
  if residual is not None:
    return parts, P.residual_output(parts, residual)
  return (parts, P.site_sum(parts, x.shape[0])) if summed else (parts,)

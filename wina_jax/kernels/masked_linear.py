"""`masked_linear`: the fused threshold linear with automatic backend selection."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp

from wina_jax.kernels import config as C
from wina_jax.kernels import mosaic_gemv as MG
from wina_jax.kernels import mosaic_phases as MP
from wina_jax.kernels import mosaic_site as MS
from wina_jax.kernels.mosaic_sync import guarded
from wina_jax.kernels.pallas_gemv import sparse_gemv
from wina_jax.kernels.reference import masked_linear_xla
from wina_jax.layers import rms_norm

BACKENDS = ("auto", "pallas", "interpret", "xla", "mosaic")


def pick_backend(backend: str, rows: int) -> str:
  """'pallas' on CUDA GPUs for batch-1 decode (rows <= AUTO_MAX_ROWS), else 'xla'; explicit choices kept."""
  if backend not in BACKENDS:
    raise ValueError(f"backend {backend!r} is not one of {BACKENDS}")
  if backend != "auto":
    return backend
  return "pallas" if jax.default_backend() == "gpu" and rows <= C.AUTO_MAX_ROWS else "xla"


def masked_linear(
  x: jax.Array,
  kernel: jax.Array,
  thresholds,
  scales: Optional[jax.Array] = None,
  segments: Optional[Sequence[int]] = None,
  *,
  backend: str = "auto",
  config: Optional[C.KernelConfig | MG.MosaicConfig] = None,
  workspace: Optional[jax.Array] = None,
  slot: int = 0,
  norm: Optional[tuple[jax.Array, float]] = None,
  residual: Optional[jax.Array] = None,
  fold: bool = False,
  counter: Optional[jax.Array] = None,
) -> jax.Array:
  """y = (x * mask) @ kernel with mask = |x| * scale > threshold, per output segment.

  x: [..., d_in]; kernel: [d_in, d_out] (bf16 on GPU); thresholds: scalar or [S];
  scales: None (TEAL: |x|), [d_in] or [S, d_in] (WINA: column norms of the kernel);
  segments: S output widths summing to d_out (fused q|k|v or gate|up), default one segment.
  Returns [..., d_out] in x.dtype, accumulated in float32. The Pallas kernel (never loading the rows
  of dropped inputs) runs for one row under backend 'auto' (the measured crossover, `config.AUTO_MAX_ROWS`)
  and for up to MAX_ROWS rows under 'pallas' / 'interpret', when its tiling fits; else the XLA path.
  workspace, slot: the zeroed int32 workspace and its row for the 'semaphore' reduce (`sparse_gemv`);
  without a workspace a 'semaphore' config runs the 'partials' reduce.
  norm: (gain [d_in], eps): x is un-normalised and the product runs on `layers.rms_norm(x, gain, eps)`;
  the Pallas kernel computes the norm in its prologue (no separate norm kernel), the XLA path first.
  residual [..., d_out]: returns residual + y (the residual add after a block's output projection).
  backend 'mosaic': the Mosaic GPU kept-row kernel (`mosaic_gemv`, config a MosaicConfig; bfloat16, up to 8
  rows; the norm runs first) on the GPU, its jnp contract elsewhere; sites it does not take run as 'auto'.
  With fold, on the GPU one launch (`mosaic_site.site_launch`) also applies the norm (a bf16 gain) and adds the
  bf16 residual, its grid-wide wait counting on counter (`grid_sync.new_counter`; None: Pallas' semaphore).
  """
  d_in, d_out = kernel.shape
  if x.shape[-1] != d_in:
    raise ValueError(f"x has {x.shape[-1]} features but the kernel expects {d_in}")
  segments = (d_out,) if segments is None else tuple(int(w) for w in segments)
  if sum(segments) != d_out:
    raise ValueError(f"segments {segments} do not sum to the kernel's {d_out} outputs")
  lead = x.shape[:-1]
  if residual is not None and residual.shape != (*lead, d_out):
    raise ValueError(f"residual {residual.shape} is not the output's shape {(*lead, d_out)}")
  thresholds = jnp.broadcast_to(jnp.asarray(thresholds, jnp.float32), (len(segments),))
  if scales is not None:
    scales = jnp.broadcast_to(scales, (len(segments), d_in))
  rows = math.prod(lead)
  mode = pick_backend(backend, rows)
  if mode == "mosaic":
    mcfg = config if isinstance(config, MG.MosaicConfig) else MG.MosaicConfig()
    dtype = x.dtype if norm is None else jnp.result_type(x.dtype, norm[0].dtype)  # what the kernel reads
    if MG.unsupported(rows, dtype, kernel, segments, mcfg) is None:
      res = None if residual is None else residual.reshape(rows, d_out)
      out = _mosaic(
        x.reshape(rows, d_in), kernel, thresholds, scales, segments, mcfg, norm, res, fold, counter
      )
      return out.reshape(*lead, d_out)
    mode, config = pick_backend("auto", rows), None
  y = _triton_or_xla(x, kernel, thresholds, scales, segments, mode, config, workspace, slot, norm)
  return y if residual is None else residual + y


def _mosaic(x, kernel, thresholds, scales, segments, cfg, norm, residual, fold, counter) -> jax.Array:
  """`masked_linear` on backend 'mosaic' for a site the kept-row kernel takes: x [M, K] -> [M, N] (plus
  residual [M, N] where given). On the GPU with fold, `mosaic_site.site_launch` takes the norm, sums its
  partials into the output after a grid-wide wait and adds the residual there; else the norm runs first in XLA
  and the sum and the add after it. A launch whose wait gave up returns NaN, or with a counter counts it there
  (`grid_sync.check_waits` raises on it; no XLA op after the launch checks it)."""
  rows = x.shape[0]
  gpu = jax.default_backend() == "gpu"
  gain = None if norm is None or not MP.takes_norm(norm[0], x.shape[1]) else norm[0]
  adds = residual is not None and residual.dtype == jnp.bfloat16
  if gpu and fold and MS.unsupported(rows, kernel, segments, cfg) is None:
    if norm is not None and gain is None:
      x = rms_norm(x, *norm)
    kw = {} if gain is None else {"gain": gain, "eps": float(norm[1])}
    _, out, gave_up = MS.site_launch(
      x,
      thresholds,
      None if scales is None else scales.astype(jnp.float32),
      kernel,
      cfg,
      segments,
      **kw,
      residual=residual if adds else None,
      summed=True,
      counter=counter,
    )
    out = guarded(out, gave_up, counter)
    return out if adds or residual is None else residual + out
  if norm is not None:
    x = rms_norm(x, norm[0], norm[1])
  y = MG.masked_linear_mosaic(x, kernel, thresholds, scales, segments, cfg, reference=not gpu)
  return y if residual is None else residual + y


def _triton_or_xla(x, kernel, thresholds, scales, segments, mode, config, workspace, slot, norm) -> jax.Array:
  """`masked_linear` on the Pallas (Triton) kernel or XLA: x [..., K] -> [..., N]."""
  d_in, d_out = kernel.shape
  lead = x.shape[:-1]
  rows = math.prod(lead)
  cfg = C.resolve(config, d_in, segments) if mode != "xla" else None
  # the kernel's prologue rounds the norm to x's dtype, as rms_norm does only when the gain's dtype is no wider
  in_kernel_norm = norm is None or jnp.promote_types(norm[0].dtype, x.dtype) == x.dtype
  if mode == "xla" or cfg is None or rows > C.MAX_ROWS or not in_kernel_norm:
    if norm is not None:
      x = rms_norm(x, norm[0], norm[1])
    return masked_linear_xla(x, kernel, thresholds, scales, segments)
  if cfg.reduce == "semaphore" and workspace is None:
    cfg = dataclasses.replace(cfg, reduce="partials")
  y = sparse_gemv(
    x.reshape(rows, d_in),
    kernel,
    thresholds,
    scales,
    segments,
    cfg,
    interpret=mode == "interpret",
    workspace=workspace,
    slot=slot,
    norm_scale=None if norm is None else norm[0].astype(x.dtype),
    norm_eps=None if norm is None else float(norm[1]),
  )
  return y.astype(x.dtype).reshape(*lead, d_out)

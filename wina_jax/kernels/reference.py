"""XLA path of the fused threshold linear: the mask, then a dense fp32-accumulated matmul per segment."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp

from wina_jax.kernels.config import MAX_ROWS
from wina_jax.numerics import dot_precision


def keep_mask(x: jax.Array, threshold: jax.Array, scale: Optional[jax.Array]) -> jax.Array:
  """|x| * scale > threshold, in float32. x: [..., d_in]; threshold: scalar; scale: [d_in] or None."""
  score = jnp.abs(x.astype(jnp.float32))
  if scale is not None:
    score = score * scale.astype(jnp.float32)
  return score > jnp.asarray(threshold, jnp.float32)


def masked_linear_xla(
  x: jax.Array, kernel: jax.Array, thresholds: jax.Array, scales: Optional[jax.Array], segments: Sequence[int]
) -> jax.Array:
  """y = concat_s (x * mask_s) @ kernel[:, seg_s], fp32 accumulation, cast to x.dtype.

  x: [..., d_in]; kernel: [d_in, sum(segments)]; thresholds: [S]; scales: [S, d_in] or None.
  With several segments and few rows (<= MAX_ROWS, a memory-bound GEMV) the S masked copies of x go
  through one matmul with the whole kernel, which reads the weights once and slices only the output;
  with many rows each segment multiplies its own column slice (S times fewer FLOPs). The two forms
  differ at rounding level (~4e-7 relative in float32), which thresholds can amplify through a model
  like any rounding difference (notebooks/04_fast_decode.ipynb).
  """
  masked = [
    jnp.where(keep_mask(x, thresholds[s], None if scales is None else scales[s]), x, jnp.zeros((), x.dtype))
    for s in range(len(segments))
  ]
  bounds = [(sum(segments[:s]), sum(segments[: s + 1])) for s in range(len(segments))]
  f32 = dict(preferred_element_type=jnp.float32, precision=dot_precision(x, kernel))
  if len(segments) == 1:
    y = jnp.dot(masked[0], kernel, **f32)
  elif math.prod(x.shape[:-1]) <= MAX_ROWS:
    out = jnp.einsum("s...k,kn->s...n", jnp.stack(masked), kernel, **f32)
    y = jnp.concatenate([out[s, ..., a:b] for s, (a, b) in enumerate(bounds)], axis=-1)
  else:
    y = jnp.concatenate(
      [jnp.dot(xs, kernel[:, a:b], **f32) for xs, (a, b) in zip(masked, bounds)],
      axis=-1,
    )
  return y.astype(x.dtype)

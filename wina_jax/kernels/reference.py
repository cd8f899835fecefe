"""XLA path of the fused threshold linear: the mask, then a dense fp32-accumulated matmul per segment."""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp


def keep_mask(x: jax.Array, threshold: jax.Array, scale: Optional[jax.Array]) -> jax.Array:
  """|x| * scale > threshold, in float32. x: [..., d_in]; threshold: scalar; scale: [d_in] or None."""
  score = jnp.abs(x.astype(jnp.float32))
  if scale is not None:
    score = score * scale.astype(jnp.float32)
  return score > jnp.asarray(threshold, jnp.float32)


def masked_linear_xla(x: jax.Array, kernel: jax.Array, thresholds: jax.Array,
                      scales: Optional[jax.Array], segments: Sequence[int]) -> jax.Array:
  """y = concat_s (x * mask_s) @ kernel[:, seg_s], fp32 accumulation, cast to x.dtype.

  x: [..., d_in]; kernel: [d_in, sum(segments)]; thresholds: [S]; scales: [S, d_in] or None.
  """
  outs, start = [], 0
  for s, width in enumerate(segments):
    keep = keep_mask(x, thresholds[s], None if scales is None else scales[s])
    xs = jnp.where(keep, x, jnp.zeros((), x.dtype))
    outs.append(jnp.dot(xs, kernel[:, start:start + width], preferred_element_type=jnp.float32))
    start += width
  y = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=-1)
  return y.astype(x.dtype)

"""Stateless building blocks: RMSNorm, RoPE, causal GQA attention. Shapes in docstrings."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from wina_jax import numerics
from wina_jax.config import ModelConfig


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """HF LlamaRMSNorm: normalise in float32 (or float64), cast back, multiply by `scale`. x: [..., d]."""
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return scale * y.astype(x.dtype)


def activation(name: str):
  """The gated MLP's activation by HF name: 'silu' (SwiGLU) or 'gelu_pytorch_tanh' (GeGLU, tanh GELU)."""
  if name == "silu":
    return jax.nn.silu
  if name == "gelu_pytorch_tanh":
    return lambda x: jax.nn.gelu(x, approximate=True)
  raise ValueError(f"unsupported activation {name!r}")


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
  """[rotary_dim // 2] inverse frequencies, with 'linear' or 'llama3' scaling."""
  rd = cfg.rotary_dim
  inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, rd, 2, dtype=jnp.float32) / rd))
  rs = cfg.rope_scaling
  if rs is None:
    return inv
  if rs.kind == "linear":
    return inv / rs.factor
  if rs.kind == "llama3":
    old = rs.original_max_position_embeddings
    low_wl, high_wl = old / rs.low_freq_factor, old / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wl, inv / rs.factor, inv)
    smooth = (old / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wl) & (wavelen <= low_wl)
    return jnp.where(medium, smoothed, scaled)
  raise ValueError(f"unsupported rope scaling {rs.kind!r}")


def apply_rope(x: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
  """HF half-split rotary embedding on the first `rotary_dim` dims. x: [B, T, H, hd]; positions: [T]."""
  rd = cfg.rotary_dim
  freqs = positions.astype(jnp.float32)[:, None] * rope_inv_freq(cfg)[None, :]  # [T, rd/2]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  cos = jnp.cos(emb).astype(x.dtype)[None, :, None, :]
  sin = jnp.sin(emb).astype(x.dtype)[None, :, None, :]
  rot, rest = x[..., :rd], x[..., rd:]
  half = rd // 2
  rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
  out = rot * cos + rotated * sin
  return jnp.concatenate([out, rest], axis=-1) if rd < x.shape[-1] else out


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  q_pos: jax.Array,
  kv_len: jax.Array,
  sliding_window: Optional[int],
  scale: Optional[float] = None,
) -> jax.Array:
  """Causal grouped-query attention.

  q: [B, T, H, hd]; k, v: [B, S, K, hd] (S cache slots, the first `kv_len` valid);
  q_pos: [T] absolute positions of the queries; scale: of the scores (default hd ** -1/2).
  Returns [B, T, H, hd].
  """
  b, t, h, hd = q.shape
  kh = k.shape[2]
  qg = q.reshape(b, t, kh, h // kh, hd)
  acc = jnp.promote_types(q.dtype, jnp.float32)  # float32 softmax for bf16/f32 inputs; float64 stays
  scores = numerics.einsum("btkgd,bskd->bkgts", qg, k).astype(acc) * (hd**-0.5 if scale is None else scale)
  k_pos = jnp.arange(k.shape[1])
  allowed = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < kv_len)
  if sliding_window is not None:
    allowed &= (q_pos[:, None] - k_pos[None, :]) < sliding_window
  scores = jnp.where(allowed, scores, jnp.finfo(acc).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = numerics.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, hd)

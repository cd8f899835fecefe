"""Batch decode with the KV cache: a dense prefill, then a jitted sparse (or dense) one-token step.

The step runs `wina_jax.model.forward` (layers unrolled) with the cache donated, so XLA updates it
in place. `decode_step` is one host dispatch per token; `decode_loop` runs many steps in one call (an
on-device loop). On the H200 a 32-layer step whose linear sites read no weights took 2.5-3.8 ms
dispatched per token and 0.8-0.9 ms in the loop; real steps hide most dispatch behind GPU work
(benchmarks/results/decode_h200.md). A `FusedThresholdSparsifier` (threshold mode, no top-k) is
traced: new thresholds reuse the compiled step. `fuse_projections` / `fuse_state` turn q|k|v and
gate|up into one kernel each (the family's fused layout `Family.fused`, Phi-3's; one threshold and scale
per segment), which saves three launches per layer. A sparsifier under backend 'persistent'
(`FusedThresholdSparsifier.as_persistent`) runs each batch-1 layer step as one persistent kernel launch
(`kernels.persistent_layer`) and the per-site kernels elsewhere. `fast_sparsifier(sp, cfg)` is the way in from any
method's calibrated `ScoreSparsifier`: the method's declared `fast_scale` maps its thresholds and scales to
the kernels' `|x| * scale > t`, or it refuses the method (`wina_jax.sparsity.fastpath`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp

from wina_jax import families
from wina_jax import sites as S
from wina_jax.config import ModelConfig
from wina_jax.kernels import FusedThresholdSparsifier
from wina_jax.model import forward, init_cache
from wina_jax.sparsity.fastpath import fast_state


def _fused_cfg(cfg: ModelConfig) -> ModelConfig:
  return cfg.replace(fused_qkv=True, fused_gate_up=True)


def fuse_projections(params: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
  """Concatenate q|k|v and gate|up kernels (and biases) per layer -> (params, cfg with fused flags)."""
  if cfg.fused_qkv or cfg.fused_gate_up:
    raise ValueError("the model is already fused; pass unfused params")
  layout = families.get(cfg.model_type).fused
  layers = {}
  for i, lp in params["layers"].items():
    lp = dict(lp)
    for block, (fused, names) in layout.items():
      b = dict(lp[block])
      parts = [b.pop(p) for p in names]
      new = {"kernel": jnp.concatenate([p["kernel"] for p in parts], axis=1)}
      if any("bias" in p for p in parts):
        new["bias"] = jnp.concatenate(
          [p.get("bias", jnp.zeros(p["kernel"].shape[1], p["kernel"].dtype)) for p in parts]
        )
      b[fused] = new
      lp[block] = b
    layers[i] = lp
  return {**params, "layers": layers}, _fused_cfg(cfg)


def fast_sparsifier(sp: Any, cfg: ModelConfig, *, fused: bool = True, **create) -> FusedThresholdSparsifier:
  """A calibrated threshold-mode `ScoreSparsifier` of any method -> the `FusedThresholdSparsifier` with its
  masks, for `fuse_projections`' model (fused=True) or the unfused one (cfg: the unfused config).

  create: `FusedThresholdSparsifier.create` keywords (backend, configs, fuse_norm). Raises
  `fastpath.FastPathError` naming the method and the reason when the kernels cannot compute its masks.
  """
  thresholds, scales = fast_state(sp)
  if not fused:
    return FusedThresholdSparsifier.create(thresholds, scales, **create)
  return FusedThresholdSparsifier.create(*fuse_state(thresholds, scales, cfg), **create)


def fuse_state(thresholds: Mapping[str, Any], scales: Mapping[str, Any], cfg: ModelConfig):
  """Per-site state of an unfused model -> (thresholds, scales, segments) for `fuse_projections`' model.

  thresholds and scales are the kernels' (`|x| * scale > t`): `fastpath.fast_state(sp)` gives them for a
  method's sparsifier (its raw `state` is a score's input, not necessarily a scale; `fast_sparsifier` does
  both steps). A fused site gets thresholds [S] and scales [S, d_in] (ones for parts without a scale);
  parts without a threshold keep everything (threshold -1). Returns plain dicts for
  `FusedThresholdSparsifier.create`.
  """
  family = families.get(cfg.model_type)
  layout = family.layout(cfg)
  out_t, out_s, segs = {}, {}, {}
  for site, t in thresholds.items():
    layer, block, proj = S.parse_site(site)
    if not any(proj in parts for _, parts in family.fused.values()):
      out_t[site] = t
      if site in scales:
        out_s[site] = scales[site]
  for layer in range(cfg.num_hidden_layers):
    for block, (fused, parts) in family.fused.items():
      names = [S.site_name(layer, block, p) for p in parts]
      if not any(n in thresholds for n in names):
        continue
      site = S.site_name(layer, block, fused)
      out_t[site] = jnp.stack([jnp.asarray(thresholds.get(n, -1.0), jnp.float32) for n in names])
      if any(n in scales for n in names):
        d = jnp.shape(scales[next(n for n in names if n in scales)])[-1]
        out_s[site] = jnp.stack(
          [jnp.asarray(scales[n], jnp.float32) if n in scales else jnp.ones((d,), jnp.float32) for n in names]
        )
      segs[site] = tuple(layout[block][p][1] for p in parts)
  return out_t, out_s, segs


def fused_site_shapes(cfg: ModelConfig) -> list[tuple[int, tuple[int, ...]]]:
  """(d_in, output segments) of the linear sites of a fused layer, forward order: q|k|v, o, gate|up, down."""
  family, fcfg = families.get(cfg.model_type), _fused_cfg(cfg)
  return [
    (d_in, family.segments(fcfg, block, proj))
    for block, projs in family.proj_shapes(fcfg).items()
    for proj, (d_in, _) in projs.items()
  ]


@functools.partial(jax.jit, static_argnames=("cfg", "max_len"))
def prefill(params: dict, tokens: jax.Array, cfg: ModelConfig, max_len: int):
  """Dense prefill of `tokens` [B, T] into a fresh cache of `max_len` slots -> (next [B], logits, cache)."""
  cache = init_cache(cfg, tokens.shape[0], max_len, params["embed_tokens"]["embedding"].dtype)
  out = forward(params, tokens, cfg, cache=cache)
  logits = out.logits[:, -1]
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits, out.cache


def greedy_step(params, token, cache, sparsifier, cfg, dense_prefix=None, attention="xla"):
  """Traced body of one greedy step (`decode_step`, each `decode_loop` and `generate.greedy_decode` iteration):
  token [B] -> (next [B] int32, logits [B, vocab], cache). sparsifier None runs dense; attention: one of
  `model.ATTENTION_BACKENDS` ('pallas': the fused decode-attention kernel, one launch per layer)."""
  sp = S.dense if sparsifier is None else sparsifier
  out = forward(params, token[:, None], cfg, sp, cache=cache, dense_prefix=dense_prefix, attention=attention)
  logits = out.logits[:, -1]
  return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits, out.cache


@functools.partial(jax.jit, static_argnames=("cfg", "attention"), donate_argnames=("cache",))
def decode_step(
  params: dict,
  token: jax.Array,
  cache: dict,
  sparsifier: Optional[Any] = None,
  *,
  cfg: ModelConfig,
  attention: str = "xla",
):
  """One greedy step: `token` [B] at position cache['length'] -> (next [B] int32, logits [B, vocab], cache).

  sparsifier: a pytree sparsifier (e.g. `FusedThresholdSparsifier`), traced; None runs dense.
  attention: 'xla', 'pallas' (GPU) or 'interpret' (`model.ATTENTION_BACKENDS`).
  The cache is donated: do not reuse the one passed in.
  """
  return greedy_step(params, token, cache, sparsifier, cfg, attention=attention)


@functools.partial(jax.jit, static_argnames=("cfg", "attention"), donate_argnames=("cache",))
def decode_loop(
  params: dict,
  tokens: jax.Array,
  cache: dict,
  sparsifier: Optional[Any] = None,
  *,
  cfg: ModelConfig,
  attention: str = "xla",
):
  """`decode_step` over tokens [B, T] (teacher-forced: step j reads tokens[:, j]) in one on-device loop
  -> (greedy next tokens [B, T] int32, logits of the last step [B, vocab], cache). The cache is donated."""

  def step(carry, token):  # only the last logits are kept: no [T, B, vocab] stack
    nxt, logits, cache = greedy_step(params, token, carry[1], sparsifier, cfg, attention=attention)
    return (logits, cache), nxt

  logits0 = jnp.zeros((tokens.shape[0], cfg.vocab_size), jnp.float32)
  (logits, cache), nxt = jax.lax.scan(step, (logits0, cache), tokens.T)
  return nxt.T, logits, cache

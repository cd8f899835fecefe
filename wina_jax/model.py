"""The decoder: pure functions over a nested-dict params pytree named like HF.

Params layout (kernels are [in, out], as in Flax's Dense):

  embed_tokens/embedding                 [vocab, d]
  layers/<i>/input_layernorm/scale       [d]
  layers/<i>/self_attn/{q,k,v}_proj/kernel  [d, H*hd | K*hd]   (+ bias [out] for qwen2)
  layers/<i>/self_attn/qkv_proj/kernel   [d, (H+2K)*hd]        (phi3, instead of q/k/v)
  layers/<i>/self_attn/o_proj/kernel     [H*hd, d]
  layers/<i>/post_attention_layernorm/scale [d]
  layers/<i>/mlp/{gate,up}_proj/kernel   [d, I]   (phi3: gate_up_proj [d, 2I], gate first)
  layers/<i>/mlp/down_proj/kernel        [I, d]
  layers/<i>/residual_attn/kernel        [d, d]   optional: residual rotation before the attention add
  layers/<i>/residual_mlp/kernel         [d, d]   optional: residual rotation before the MLP add
  norm/scale                             [d]
  lm_head/kernel                         [d, vocab]  (absent when embeddings are tied)

The optional residual rotations are what the WINA tensor transform adds (`wina_jax.transform`).
Every linear input and the MLP activation pass through the sparsifier at a named site
(`wina_jax.sites`); the forward can return what it saw there as explicit pytrees.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from wina_jax import layers as L
from wina_jax import sites as S
from wina_jax.config import ModelConfig

Params = dict
COLLECTABLE = ("inputs", "zero_frac", "residual")


class Output(NamedTuple):
  """logits: [B, T, vocab] float32 (float64 for float64 params); cache: updated KV cache or None; aux: dict
  of collected pytrees."""
  logits: jax.Array
  cache: Optional[dict]
  aux: dict


class _Ctx:
  """Per-call state while tracing: the sparsifier, which tokens are sparse, and what to collect."""

  def __init__(self, sparsifier, sparse_tok, collect):
    self.sparsifier = sparsifier
    self.sparse_tok = sparse_tok            # [T] bool, or None when every token is sparse
    self.collect = frozenset(collect)
    self.aux: dict[str, dict] = {k: {} for k in self.collect}

  def _select(self, sparse, dense):
    if self.sparse_tok is None:
      return sparse
    return jnp.where(self.sparse_tok[None, :, None], sparse, dense)

  def _record(self, site, x, xs):
    if "inputs" in self.collect:
      self.aux["inputs"][site] = x
    if "zero_frac" in self.collect:
      w = jnp.ones(x.shape[:2], jnp.float32) if self.sparse_tok is None else (
          jnp.broadcast_to(self.sparse_tok[None, :], x.shape[:2]).astype(jnp.float32))
      frac = jnp.mean((xs == 0).astype(jnp.float32), axis=-1)
      self.aux["zero_frac"][site] = jnp.sum(frac * w) / jnp.maximum(jnp.sum(w), 1.0)

  def mask(self, site: str, x: jax.Array, kernel: Optional[jax.Array]) -> jax.Array:
    if self.sparsifier is S.dense:
      xs = x
    else:
      xs = self._select(self.sparsifier(site, x, kernel), x)
    self._record(site, x, xs)
    return xs

  def linear(self, site: str, x: jax.Array, lin: dict) -> jax.Array:
    kernel = lin["kernel"]
    fused = getattr(self.sparsifier, "linear", None)
    if fused is not None and not (self.collect & {"inputs", "zero_frac"}):
      y = fused(site, x, kernel)
      if self.sparse_tok is not None:   # dense-prefix tokens need the dense product too
        y = self._select(y, x @ kernel)
    else:
      y = self.mask(site, x, kernel) @ kernel
    return y + lin["bias"] if "bias" in lin else y


def attention_block(cfg: ModelConfig, lp: dict, h: jax.Array, layer: int, ctx: _Ctx,
                    positions: jax.Array, kv: Optional[dict], kv_len) -> tuple[jax.Array, Optional[dict]]:
  """Attention output (before the residual add) for residual `h` [B, T, d]; returns (out, new kv)."""
  p = lp["self_attn"]
  x = L.rms_norm(h, lp["input_layernorm"]["scale"], cfg.rms_norm_eps)
  site = lambda proj: S.site_name(layer, "self_attn", proj)
  b, t, _ = x.shape
  if cfg.fused_qkv:
    qkv = ctx.linear(site("qkv_proj"), x, p["qkv_proj"])
    q, k, v = jnp.split(qkv, [cfg.q_dim, cfg.q_dim + cfg.kv_dim], axis=-1)
  else:
    q, k, v = (ctx.linear(site(n), x, p[n]) for n in ("q_proj", "k_proj", "v_proj"))
  q = L.apply_rope(q.reshape(b, t, cfg.num_attention_heads, cfg.head_dim), positions, cfg)
  k = L.apply_rope(k.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim), positions, cfg)
  v = v.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
  if kv is not None:
    start = positions[0]
    k = jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype), (0, start, 0, 0))
    v = jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype), (0, start, 0, 0))
    kv = {"k": k, "v": v}
  o = L.attention(q, k, v, positions, kv_len, cfg.sliding_window).reshape(b, t, cfg.q_dim)
  return ctx.linear(site("o_proj"), o, p["o_proj"]), kv


def mlp_block(cfg: ModelConfig, lp: dict, h: jax.Array, layer: int, ctx: _Ctx) -> jax.Array:
  """SwiGLU MLP output (before the residual add) for residual `h` [B, T, d]."""
  p = lp["mlp"]
  x = L.rms_norm(h, lp["post_attention_layernorm"]["scale"], cfg.rms_norm_eps)
  site = lambda proj: S.site_name(layer, "mlp", proj)
  if cfg.fused_gate_up:
    gate, up = jnp.split(ctx.linear(site("gate_up_proj"), x, p["gate_up_proj"]), 2, axis=-1)
  else:
    gate = ctx.linear(site("gate_proj"), x, p["gate_proj"])
    up = ctx.linear(site("up_proj"), x, p["up_proj"])
  act = ctx.mask(site(S.ACT), jax.nn.silu(gate), None)
  return ctx.linear(site("down_proj"), act * up, p["down_proj"])


def _rotate(h: jax.Array, lp: dict, key: str) -> jax.Array:
  return h @ lp[key]["kernel"] if key in lp else h


def _layer(cfg: ModelConfig, lp: dict, h: jax.Array, layer: int, ctx: _Ctx, positions: jax.Array,
           kv: Optional[dict], kv_len) -> tuple[jax.Array, Optional[dict]]:
  """One decoder layer: residual [B, T, d] in -> residual out, and the layer's updated KV cache."""
  if "residual" in ctx.collect:
    ctx.aux["residual"][f"layers.{layer}.self_attn"] = h
  attn, kv = attention_block(cfg, lp, h, layer, ctx, positions, kv, kv_len)
  h = _rotate(h, lp, "residual_attn") + attn
  if "residual" in ctx.collect:
    ctx.aux["residual"][f"layers.{layer}.mlp"] = h
  return _rotate(h, lp, "residual_mlp") + mlp_block(cfg, lp, h, layer, ctx), kv


def decoder_layer_aux(cfg: ModelConfig, lp: dict, h: jax.Array, layer: int, sparsifier: Any = S.dense,
                      collect: Sequence[str] = ()) -> tuple[jax.Array, dict]:
  """One decoder layer without a cache, every token sparse: residual `h` [B, T, d] entering layer `layer`
  -> (its output residual [B, T, d], aux collected as in `forward`). For per-layer calibration."""
  positions = jnp.arange(h.shape[1], dtype=jnp.int32)
  ctx = _Ctx(sparsifier, None, collect)
  return _layer(cfg, lp, h, layer, ctx, positions, None, h.shape[1])[0], ctx.aux


def decoder_layer(cfg: ModelConfig, lp: dict, h: jax.Array, layer: int, sparsifier: Any = S.dense) -> jax.Array:
  """`decoder_layer_aux` without the aux: the output residual [B, T, d]."""
  return decoder_layer_aux(cfg, lp, h, layer, sparsifier)[0]


def lm_head_kernel(params: Params, cfg: ModelConfig) -> jax.Array:
  """[d, vocab]: the untied lm_head or the transposed embedding."""
  return params["embed_tokens"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
  """Empty KV cache with `max_len` slots: {'length': int32[], 'layers': {i: {'k','v': [B, S, K, hd]}}}."""
  if max_len > cfg.max_position_embeddings:
    raise ValueError(f"cache of {max_len} positions exceeds max_position_embeddings="
                     f"{cfg.max_position_embeddings}; use a shorter max_len")
  shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
  return {"length": jnp.zeros((), jnp.int32),
          "layers": {str(i): {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
                     for i in range(cfg.num_hidden_layers)}}


def forward(params: Params, tokens: jax.Array, cfg: ModelConfig, sparsifier: Any = S.dense, *,
            cache: Optional[dict] = None, dense_prefix: Optional[jax.Array] = None,
            collect: Sequence[str] = ()) -> Output:
  """Run the decoder on `tokens` [B, T] (int).

  sparsifier: a `wina_jax.sites.Sparsifier` called at every site (default: identity).
  cache: from `init_cache`; the T new tokens are written at `cache['length']` and attend to the past.
  dense_prefix: tokens at absolute positions < dense_prefix skip the sparsifier (TEAL's dense prefill
    start); None sparsifies every token. Decode tokens past the prefix are always sparse.
  collect: any of 'inputs' ({site: [B, T, d_in]} dense-side inputs of each site), 'zero_frac'
    ({site: scalar} fraction of zeroed inputs over sparse tokens), 'residual' ({'layers.i.self_attn' |
    'layers.i.mlp': [B, T, d]} residual stream entering each block).
  """
  unknown = set(collect) - set(COLLECTABLE)
  if unknown:
    raise ValueError(f"cannot collect {sorted(unknown)}; choose from {COLLECTABLE}")
  b, t = tokens.shape
  limit = cfg.max_position_embeddings if cache is None else cache["layers"]["0"]["k"].shape[1]
  if t > limit:
    raise ValueError(f"sequence of {t} tokens exceeds the {'cache size' if cache else 'max_position_embeddings'}"
                     f" ({limit}); truncate the input or use a larger cache")
  start = jnp.zeros((), jnp.int32) if cache is None else cache["length"]
  positions = start + jnp.arange(t, dtype=jnp.int32)
  kv_len = start + t
  sparse_tok = None if dense_prefix is None else positions >= dense_prefix
  ctx = _Ctx(sparsifier, sparse_tok, collect)
  h = params["embed_tokens"]["embedding"][tokens]
  new_layers = {}
  for i in range(cfg.num_hidden_layers):
    kv = None if cache is None else cache["layers"][str(i)]
    h, new_layers[str(i)] = _layer(cfg, params["layers"][str(i)], h, i, ctx, positions, kv, kv_len)
  h = L.rms_norm(h, params["norm"]["scale"], cfg.rms_norm_eps)
  logits = h @ lm_head_kernel(params, cfg)
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))   # float64 params keep float64
  new_cache = None if cache is None else {"length": kv_len, "layers": new_layers}
  return Output(logits, new_cache, ctx.aux)


@functools.partial(jax.jit, static_argnames=("cfg", "static_sparsifier", "collect"))
def _jitted(params, tokens, cfg, dynamic_sparsifier, static_sparsifier, cache, dense_prefix, collect):
  sp = static_sparsifier if dynamic_sparsifier is None else dynamic_sparsifier
  return forward(params, tokens, cfg, sp, cache=cache, dense_prefix=dense_prefix, collect=collect)


def split_sparsifier(sparsifier: Any) -> tuple[Any, Any]:
  """(dynamic, static) jit arguments for a sparsifier: a pytree (e.g. a `flax.struct.dataclass` holding
  thresholds) is traced, so new threshold values reuse the compiled code; a plain function is static."""
  if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(sparsifier)):
    return None, sparsifier
  return sparsifier, None


def jit_forward(params: Params, tokens: jax.Array, cfg: ModelConfig, sparsifier: Any = S.dense, *,
                cache: Optional[dict] = None, dense_prefix: Optional[jax.Array] = None,
                collect: Sequence[str] = ()) -> Output:
  """`forward` under `jax.jit`, the sparsifier traced or static as `split_sparsifier` says."""
  dense_prefix = None if dense_prefix is None else jnp.asarray(dense_prefix, jnp.int32)
  return _jitted(params, tokens, cfg, *split_sparsifier(sparsifier), cache, dense_prefix, tuple(collect))

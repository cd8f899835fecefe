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
  layers/<i>/rotate_attn/kernel          [d, d]   optional: rotation of the attention's normed input
  layers/<i>/rotate_mlp/kernel           [d, d]   optional: rotation of the MLP's normed input
  norm/scale                             [d]
  lm_head/kernel                         [d, vocab]  (absent when embeddings are tied)

Gemma-style layers (features on `ModelConfig` and the family's `norms` table) add
  layers/<i>/self_attn/{q,k}_norm/scale  [hd]     per-head RMSNorm of q and k (`cfg.qk_norm`)
  layers/<i>/<post-norm>/scale           [d]      RMSNorm of each block's output before the residual add
and name the pre-MLP norm as the family says (Gemma: pre_feedforward_layernorm; its post_attention_layernorm
is the attention's post-norm). A norm's gain is `cfg.norm_offset + scale`.

The optional residual and input rotations are what the WINA tensor transform adds (`wina_jax.transform`).
Every linear input and the MLP activation pass through the sparsifier at a named site
(`wina_jax.sites`); the forward can return what it saw there as explicit pytrees.

The layer math (`attention_block`, `mlp_block`, `residual_layer`, `run_decoder`) takes its weights as
callables, so the `flax.linen` modules of `wina_jax.nn` run exactly this code over their own params.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from wina_jax import families, numerics
from wina_jax import layers as L
from wina_jax import sites as S
from wina_jax.config import ModelConfig
from wina_jax.kernels import decode_attention as DA

Params = dict
COLLECTABLE = ("inputs", "zero_frac", "residual")
# How a cached one-token step attends: 'xla' (`layers.attention`), 'pallas' (the fused decode-attention
# kernel, `kernels.decode_attention`, on GPU) or 'interpret' (that kernel in Pallas interpret mode, CPU).
# Steps the kernel does not take (prefill, batch > 8, no cache) always run 'xla'.
ATTENTION_BACKENDS = ("xla", "pallas", "interpret")


class Output(NamedTuple):
  """logits: [B, T, vocab] float32 (float64 for float64 params); cache: updated KV cache or None; aux: dict
  of collected pytrees."""

  logits: jax.Array
  cache: Optional[dict]
  aux: dict


class Context:
  """Per-call state while tracing: the sparsifier, which tokens are sparse, and what to collect.

  The functional `forward` and the `wina_jax.nn` modules both route every site through one `Context`.
  """

  def __init__(
    self, sparsifier: Any = S.dense, sparse_tok: Optional[jax.Array] = None, collect: Sequence[str] = ()
  ):
    self.sparsifier = sparsifier
    self.sparse_tok = sparse_tok  # [T] bool, or None when every token is sparse
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
      w = (
        jnp.ones(x.shape[:2], jnp.float32)
        if self.sparse_tok is None
        else (jnp.broadcast_to(self.sparse_tok[None, :], x.shape[:2]).astype(jnp.float32))
      )
      frac = jnp.mean((xs == 0).astype(jnp.float32), axis=-1)
      self.aux["zero_frac"][site] = jnp.sum(frac * w) / jnp.maximum(jnp.sum(w), 1.0)

  def mask(self, site: str, x: jax.Array, kernel: Optional[jax.Array]) -> jax.Array:
    if self.sparsifier is S.dense:
      xs = x
    else:
      xs = self._select(self.sparsifier(site, x, kernel), x)
    self._record(site, x, xs)
    return xs

  def whole_block(self, name: str) -> Optional[Callable]:
    """The sparsifier's kernel for a whole block step (`name`: 'fused_layer' or 'fused_mlp'), or None: none
    when collecting or with dense-prefix tokens, where the block must run site by site."""
    if self.collect or self.sparse_tok is not None:
      return None
    return getattr(self.sparsifier, name, None)

  def linear(
    self,
    site: str,
    x: jax.Array,
    lin: dict,
    norm: Optional[tuple] = None,
    residual: Optional[jax.Array] = None,
  ) -> jax.Array:
    """`x` [..., d_in] through the linear `lin` ({'kernel' [d_in, d_out], 'bias'?}), sparsified at `site`.

    norm: (gain [d_in], eps) of an RMSNorm that x passes through first. A sparsifier with a fused `linear`
    and `norm_linear` (the fused kernels) gets the un-normalised x and normalises inside its kernel;
    otherwise the norm runs first, as XLA ops (`layers.rms_norm`). residual [..., d_out]: returns residual + the
    output (a block's output projection), through the sparsifier's `residual_linear` where it has one.
    """
    kernel = lin["kernel"]
    fused = None if self.collect & {"inputs", "zero_frac"} else getattr(self.sparsifier, "linear", None)
    if residual is not None and norm is None and "bias" not in lin and self.sparse_tok is None and fused:
      fused_residual = getattr(self.sparsifier, "residual_linear", None)
      if fused_residual is not None:
        return fused_residual(site, x, kernel, residual)
    fused_norm = None if fused is None or norm is None else getattr(self.sparsifier, "norm_linear", None)
    if norm is not None and fused_norm is None:
      x, norm = L.rms_norm(x, *norm), None
    if fused is None:
      y = numerics.matmul(self.mask(site, x, kernel), kernel)
    else:
      y = fused(site, x, kernel) if norm is None else fused_norm(site, x, *norm, kernel)
      if self.sparse_tok is not None:  # dense-prefix tokens need the dense product too
        y = self._select(y, numerics.matmul(x if norm is None else L.rms_norm(x, *norm), kernel))
    y = y + lin["bias"] if "bias" in lin else y
    return y if residual is None else residual + y


# (projection name, e.g. 'q_proj' or 'qkv_proj'; input x [B, T, d_in]) -> x through that linear, sparsified
# at its site. The functional path reads the kernel from the params dict, `wina_jax.nn` from a module.
Project = Callable[[str, jax.Array], jax.Array]


# (norm name 'q_norm' | 'k_norm', x [B, T, heads, hd]) -> x through that per-head RMSNorm (`cfg.qk_norm`).
HeadNorm = Callable[[str, jax.Array], jax.Array]


def attention_block(
  cfg: ModelConfig,
  x: jax.Array,
  project: Project,
  positions: jax.Array,
  kv: Optional[dict],
  kv_len,
  attention: str = "xla",
  layer: int = 0,
  head_norm: Optional[HeadNorm] = None,
) -> tuple[jax.Array, Optional[dict]]:
  """Attention of `x` [B, T, d] -> (out [B, T, d], new kv): out is o_proj's result as `project` returns it
  (`_layer`'s adds the residual there where no post-norm follows). x is the block's input as `project` takes
  it: the normed input, or the residual when `project` applies the norm (`_layer`).

  positions: [T] absolute positions; kv: this layer's cache {'k', 'v': [B, S, K, hd]} or None;
  kv_len: valid cache slots after writing the T new tokens; attention: one of ATTENTION_BACKENDS;
  layer: picks the window and rope of `cfg.layer_config(layer)`; head_norm: the q/k norms when `cfg.qk_norm`.
  """
  cfg = cfg.layer_config(layer)
  b, t, _ = x.shape
  if cfg.fused_qkv:
    qkv = project("qkv_proj", x)
    q, k, v = jnp.split(qkv, [cfg.q_dim, cfg.q_dim + cfg.kv_dim], axis=-1)
  else:
    q, k, v = (project(n, x) for n in ("q_proj", "k_proj", "v_proj"))
  q = q.reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
  k = k.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
  if cfg.qk_norm:
    q, k = head_norm("q_norm", q), head_norm("k_norm", k)
  if attention not in ATTENTION_BACKENDS:
    raise ValueError(f"attention {attention!r} is not one of {ATTENTION_BACKENDS}")
  if attention != "xla" and kv is not None and DA.supported(b, t, cfg.head_dim):
    q, k, v = (y.reshape(b, -1, cfg.head_dim) for y in (q, k, v))  # [B, heads, hd]: t == 1
    if cfg.fused_qkv and not cfg.qk_norm:  # the kernel reads q|k|v packed: no slices materialised for it
      q, k, v = qkv.reshape(b, -1, cfg.head_dim), None, None
    o, k, v = DA.decode_attention(
      q,
      k,
      v,
      kv["k"],
      kv["v"],
      positions[0],
      L.rope_inv_freq(cfg),
      rotary_dim=cfg.rotary_dim,
      window=cfg.sliding_window,
      scale=cfg.attn_scale,
      interpret=attention == "interpret",
    )
    return project("o_proj", o.reshape(b, t, cfg.q_dim)), {"k": k, "v": v}
  q = L.apply_rope(q, positions, cfg)
  k = L.apply_rope(k, positions, cfg)
  v = v.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
  if kv is not None:
    start = positions[0]
    k = jax.lax.dynamic_update_slice(kv["k"], k.astype(kv["k"].dtype), (0, start, 0, 0))
    v = jax.lax.dynamic_update_slice(kv["v"], v.astype(kv["v"].dtype), (0, start, 0, 0))
    kv = {"k": k, "v": v}
  o = L.attention(q, k, v, positions, kv_len, cfg.sliding_window, cfg.attn_scale).reshape(b, t, cfg.q_dim)
  return project("o_proj", o), kv


def mlp_block(cfg: ModelConfig, x: jax.Array, project: Project, layer: int, ctx: Context) -> jax.Array:
  """Gated MLP (SwiGLU, or GeGLU per `cfg.hidden_act`) of `x` [B, T, d] (the normed input, or the residual when
  `project` applies the norm, as in `attention_block`) -> down_proj's result as `project` returns it (with the
  residual added where `_layer`'s project adds it); the activation is masked at the site
  `layers.<layer>.mlp.act`."""
  if cfg.fused_gate_up:
    gate, up = jnp.split(project("gate_up_proj", x), 2, axis=-1)
  else:
    gate, up = project("gate_proj", x), project("up_proj", x)
  act = ctx.mask(S.site_name(layer, "mlp", S.ACT), L.activation(cfg.hidden_act)(gate), None)
  return project("down_proj", act * up)


def residual_layer(
  h: jax.Array, layer: int, ctx: Context, attn: Callable, mlp: Callable, rotate: Callable
) -> tuple[jax.Array, Optional[dict]]:
  """The residual structure of one decoder layer: `h` [B, T, d] -> (output residual, updated kv).

  attn(h, skip) -> (skip + out, kv) and mlp(h, skip) -> skip + out norm their own input and add their output to
  skip, the residual as rotate(key, h) carries it past the block (the optional residual rotation `key`,
  'residual_attn' | 'residual_mlp', that `wina_jax.transform` adds, or h itself): a block run as one kernel
  can add it inside that kernel.
  """
  if "residual" in ctx.collect:
    ctx.aux["residual"][f"layers.{layer}.self_attn"] = h
  h, kv = attn(h, rotate("residual_attn", h))
  if "residual" in ctx.collect:
    ctx.aux["residual"][f"layers.{layer}.mlp"] = h
  return mlp(h, rotate("residual_mlp", h)), kv


def norm_gain(cfg: ModelConfig, scale: jax.Array) -> jax.Array:
  """The gain an RMSNorm multiplies by: `scale`, or `norm_offset + scale` (Gemma's 1 + w)."""
  return scale + cfg.norm_offset if cfg.norm_offset else scale


def _layer(
  cfg: ModelConfig,
  lp: dict,
  h: jax.Array,
  layer: int,
  ctx: Context,
  positions: jax.Array,
  kv: Optional[dict],
  kv_len,
  attention: str = "xla",
) -> tuple[jax.Array, Optional[dict]]:
  """One decoder layer over its params dict `lp`: residual [B, T, d] in -> (residual out, updated kv).

  Each block gets the residual itself: its input projections apply the block's RMSNorm through
  `Context.linear(..., norm=)` (so a fused kernel can normalise in its prologue), its output projection is
  plain. With an input rotation (`rotate_attn` / `rotate_mlp`, from the transform) the block's input is
  normed and rotated first; with a post-norm (the family's `norms`) the block's output is normed.
  """
  norms = families.get(cfg.model_type).norms
  rms = lambda x, scale: L.rms_norm(x, norm_gain(cfg, scale), cfg.rms_norm_eps)

  def inputs(block, rot, h, skip):
    """(the block's input as `project` takes it, project, adds): the residual with the norm left to
    `Context.linear`, or with an input rotation the normed, rotated input. Where no post-norm follows the block
    (adds), its output projection returns skip + its output, so a fused kernel can add it."""
    (pre, post_norm), sites = norms[block], S.block_sites(cfg, block)
    reads, out_proj = sites[:-1], sites[-1]  # reads: the projections after the norm
    rotated, adds = rot in lp, post_norm is None

    def project(proj, x):
      norm = (norm_gain(cfg, lp[pre]["scale"]), cfg.rms_norm_eps) if proj in reads and not rotated else None
      residual = skip if adds and proj == out_proj else None
      return ctx.linear(S.site_name(layer, block, proj), x, lp[block][proj], norm, residual)

    return (numerics.matmul(rms(h, lp[pre]["scale"]), lp[rot]["kernel"]) if rotated else h), project, adds

  def post(block, y):
    name = norms[block][1]
    return y if name is None else rms(y, lp[name]["scale"])

  def attn(h, skip):
    x, project, adds = inputs("self_attn", "rotate_attn", h, skip)
    head_norm = lambda name, q: rms(q, lp["self_attn"][name]["scale"])
    o, new_kv = attention_block(cfg, x, project, positions, kv, kv_len, attention, layer, head_norm)
    return (o if adds else skip + post("self_attn", o)), new_kv

  def mlp(h, skip):
    x, project, adds = inputs("mlp", "rotate_mlp", h, skip)
    # a sparsifier's `fused_mlp` may run the MLP step as one kernel (None: not this step), adding the residual
    # inside it unless a post-norm comes between
    fused = ctx.whole_block("fused_mlp")
    norm = None if "rotate_mlp" in lp else (norm_gain(cfg, lp[norms["mlp"][0]]["scale"]), cfg.rms_norm_eps)
    out = None if fused is None else fused(cfg, layer, x, norm, lp["mlp"], residual=skip if adds else None)
    out = mlp_block(cfg, x, project, layer, ctx) if out is None else out
    return out if adds else skip + post("mlp", out)

  rotate = lambda key, h: numerics.matmul(h, lp[key]["kernel"]) if key in lp else h
  return residual_layer(h, layer, ctx, attn, mlp, rotate)


def decoder_layer_aux(
  cfg: ModelConfig, lp: dict, h: jax.Array, layer: int, sparsifier: Any = S.dense, collect: Sequence[str] = ()
) -> tuple[jax.Array, dict]:
  """One decoder layer without a cache, every token sparse: residual `h` [B, T, d] entering layer `layer`
  -> (its output residual [B, T, d], aux collected as in `forward`). For per-layer calibration."""
  positions = jnp.arange(h.shape[1], dtype=jnp.int32)
  ctx = Context(sparsifier, None, collect)
  with numerics.scope():
    return _layer(cfg, lp, h, layer, ctx, positions, None, h.shape[1])[0], ctx.aux


def decoder_layer(
  cfg: ModelConfig, lp: dict, h: jax.Array, layer: int, sparsifier: Any = S.dense
) -> jax.Array:
  """`decoder_layer_aux` without the aux: the output residual [B, T, d]."""
  return decoder_layer_aux(cfg, lp, h, layer, sparsifier)[0]


def lm_head_kernel(params: Params, cfg: ModelConfig) -> jax.Array:
  """[d, vocab]: the untied lm_head or the transposed embedding."""
  return params["embed_tokens"]["embedding"].T if cfg.tie_word_embeddings else params["lm_head"]["kernel"]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
  """Empty KV cache with `max_len` slots: {'length': int32[], 'layers': {i: {'k','v': [B, S, K, hd]}}}."""
  if max_len > cfg.max_position_embeddings:
    raise ValueError(
      f"cache of {max_len} positions exceeds max_position_embeddings="
      f"{cfg.max_position_embeddings}; use a shorter max_len"
    )
  shape = (batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
  return {
    "length": jnp.zeros((), jnp.int32),
    "layers": {
      str(i): {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
      for i in range(cfg.num_hidden_layers)
    },
  }


def scale_embedding(cfg: ModelConfig, h: jax.Array) -> jax.Array:
  """The embedding output [B, T, d] times `cfg.embed_scale` (Gemma: sqrt(d), rounded to the embedding's dtype
  as HF does): the residual entering layer 0."""
  return h if cfg.embed_scale == 1.0 else h * jnp.asarray(cfg.embed_scale, h.dtype)


def embed_tokens(params: Params, tokens, cfg: ModelConfig) -> jax.Array:
  """The residual entering layer 0 for `tokens` [B, T]: [B, T, d] (what `forward` feeds its first layer)."""
  return scale_embedding(cfg, params["embed_tokens"]["embedding"][jnp.asarray(tokens)])


def run_decoder(
  cfg: ModelConfig,
  tokens: jax.Array,
  embed: Callable,
  layer: Callable,
  head: Callable,
  sparsifier: Any = S.dense,
  *,
  cache: Optional[dict] = None,
  dense_prefix: Optional[jax.Array] = None,
  collect: Sequence[str] = (),
) -> Output:
  """The decoder around its weights: checks, positions, the layer loop, the cache and the logits.

  embed(tokens [B, T]) -> h [B, T, d] (scaled here by `cfg.embed_scale`);
  layer(i, h, ctx, positions, kv, kv_len) -> (h, kv) for layer i;
  head(h) -> [B, T, vocab] (final norm and lm_head). `forward` passes closures over a params dict,
  `wina_jax.nn.CausalLM` its submodules; arguments as in `forward`. Matmuls run at the declared precision
  (`wina_jax.numerics`: true float32 unless set otherwise).
  """
  unknown = set(collect) - set(COLLECTABLE)
  if unknown:
    raise ValueError(f"cannot collect {sorted(unknown)}; choose from {COLLECTABLE}")
  b, t = tokens.shape
  limit = cfg.max_position_embeddings if cache is None else cache["layers"]["0"]["k"].shape[1]
  if t > limit:
    raise ValueError(
      f"sequence of {t} tokens exceeds the {'cache size' if cache else 'max_position_embeddings'}"
      f" ({limit}); truncate the input or use a larger cache"
    )
  start = jnp.zeros((), jnp.int32) if cache is None else cache["length"]
  positions = start + jnp.arange(t, dtype=jnp.int32)
  kv_len = start + t
  sparse_tok = None if dense_prefix is None else positions >= dense_prefix
  ctx = Context(sparsifier, sparse_tok, collect)
  with numerics.scope():  # declared matmul precision (true float32 unless set otherwise)
    h = scale_embedding(cfg, embed(tokens))
    new_layers = {}
    for i in range(cfg.num_hidden_layers):
      kv = None if cache is None else cache["layers"][str(i)]
      h, new_layers[str(i)] = layer(i, h, ctx, positions, kv, kv_len)
    logits = head(h)
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # float64 params keep float64
  new_cache = None if cache is None else {"length": kv_len, "layers": new_layers}
  return Output(logits, new_cache, ctx.aux)


def forward(
  params: Params,
  tokens: jax.Array,
  cfg: ModelConfig,
  sparsifier: Any = S.dense,
  *,
  cache: Optional[dict] = None,
  dense_prefix: Optional[jax.Array] = None,
  collect: Sequence[str] = (),
  attention: str = "xla",
) -> Output:
  """Run the decoder on `tokens` [B, T] (int).

  sparsifier: a `wina_jax.sites.Sparsifier` called at every site (default: identity).
  cache: from `init_cache`; the T new tokens are written at `cache['length']` and attend to the past.
  dense_prefix: tokens at absolute positions < dense_prefix skip the sparsifier (TEAL's dense prefill
    start); None sparsifies every token. Decode tokens past the prefix are always sparse.
  collect: any of 'inputs' ({site: [B, T, d_in]} dense-side inputs of each site), 'zero_frac'
    ({site: scalar} fraction of zeroed inputs over sparse tokens), 'residual' ({'layers.i.self_attn' |
    'layers.i.mlp': [B, T, d]} residual stream entering each block).
  attention: how cached one-token steps attend, one of ATTENTION_BACKENDS (default 'xla'); a layer that
    the sparsifier's `fused_layer` runs (`FusedThresholdSparsifier` backend 'persistent') attends inside it.
  """

  def layer(i, h, ctx, positions, kv, kv_len):
    lp = params["layers"][str(i)]
    # a sparsifier's `fused_layer` may run the whole layer step as one kernel (None: not this step)
    fused = ctx.whole_block("fused_layer")
    out = None if fused is None else fused(cfg, lp, h, i, positions, kv)
    return _layer(cfg, lp, h, i, ctx, positions, kv, kv_len, attention) if out is None else out

  def head(h):
    normed = L.rms_norm(h, norm_gain(cfg, params["norm"]["scale"]), cfg.rms_norm_eps)
    return numerics.matmul(normed, lm_head_kernel(params, cfg))

  return run_decoder(
    cfg,
    tokens,
    lambda tok: params["embed_tokens"]["embedding"][tok],
    layer,
    head,
    sparsifier,
    cache=cache,
    dense_prefix=dense_prefix,
    collect=collect,
  )


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


def jit_forward(
  params: Params,
  tokens: jax.Array,
  cfg: ModelConfig,
  sparsifier: Any = S.dense,
  *,
  cache: Optional[dict] = None,
  dense_prefix: Optional[jax.Array] = None,
  collect: Sequence[str] = (),
) -> Output:
  """`forward` under `jax.jit`, the sparsifier traced or static as `split_sparsifier` says."""
  dense_prefix = None if dense_prefix is None else jnp.asarray(dense_prefix, jnp.int32)
  return _jitted(params, tokens, cfg, *split_sparsifier(sparsifier), cache, dense_prefix, tuple(collect))

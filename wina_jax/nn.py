"""`flax.linen` modules of the decoder, over the same params tree and the same math as `wina_jax.model`.

  from wina_jax import nn as wnn
  model = wnn.CausalLM(cfg)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]  # random weights
  out = model.apply({"params": params}, tokens, sparsifier=sp)          # == forward(params, tokens, cfg, sp)
  out = jax.jit(model.apply)({"params": params}, tokens, sparsifier=sp)  # new thresholds: no retrace

Every module declares its weights under the HF names of the params layout (`wina_jax.model`), so
`model.init` builds exactly the tree `convert.expected_shapes(cfg)` describes, and `model.apply` takes the
params `from_gguf` / `from_transformers` / `transform` return (a transformed tree's residual rotations are
used when present). The math is not repeated here: `Attention`, `MLP`, `DecoderLayer` and `CausalLM` call
`model.attention_block`, `model.mlp_block`, `model.residual_layer` and `model.run_decoder` with their
submodules as the weights, and every linear goes through `model.Context.linear`, which calls the
sparsifier at the site named as in `wina_jax.sites` (`layers.3.mlp.down_proj`, ...). Family differences
(fused q|k|v and gate|up for phi3, qwen2's q/k/v biases, llama3 RoPE scaling, mistral's window, Gemma 3's
q/k norms, sandwich norms, (1 + w) gains, scaled embedding, GeGLU and local/global layers) come from `cfg`
and the family's `norms` table through that shared code; which projections carry a bias comes from
`expected_shapes`.

The sparsifier is an ordinary call argument: a pytree sparsifier (`sparsity.make`'s `ScoreSparsifier`) is
traced by `jax.jit(model.apply)`, so new thresholds reuse the compiled code; a plain function must be
static (`jax.jit(model.apply, static_argnames="sparsifier")`), as must `collect`.

Two choices, both to keep the two paths interchangeable:
- `collect=` intermediates come back in the explicit `Output.aux`, not through `sow` / `mutable`: they are
  keyed by site name ({'inputs': {'layers.0.mlp.up_proj': [B, T, d]}}), the keys sparsifiers, calibration
  and measurement use, while `sow` keys them by module path and wraps each in a tuple; the explicit return
  also needs no `mutable=` plumbing under `jit` and gives `forward`'s `Output` unchanged.
- The KV cache is an explicit argument and result (`init_cache`, `Output.cache`) rather than a 'cache'
  collection: it is the pytree `wina_jax.decode` donates and `wina_jax.sharding` shards, and one prefill
  can feed many decode continuations without copying module state.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from wina_jax import families, numerics
from wina_jax import layers as L
from wina_jax import model as M
from wina_jax import sites as S
from wina_jax.config import ModelConfig
from wina_jax.convert.load import expected_shapes

Dtype = Any


@functools.cache
def _layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """expected_shapes of layer 0 (every layer has the same): {'self_attn/q_proj/kernel': shape, ...}."""
  prefix = "layers/0/"
  return {k[len(prefix) :]: v for k, v in expected_shapes(cfg).items() if k.startswith(prefix)}


def _positions(x: jax.Array, ctx: Optional[M.Context], positions: Optional[jax.Array], kv_len):
  """Defaults of a module called on its own: a dense context, positions 0..T-1, every slot valid."""
  positions = jnp.arange(x.shape[1], dtype=jnp.int32) if positions is None else positions
  return ctx or M.Context(), positions, positions[-1] + 1 if kv_len is None else kv_len


class RMSNorm(nn.Module):
  """HF RMSNorm (`layers.rms_norm`): [..., d] -> [..., d], gain `offset + scale`. Param `scale` [d],
  initialised to a unit gain (ones; zeros when offset is 1, Gemma's convention)."""

  eps: float
  param_dtype: Dtype = jnp.float32
  offset: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.constant(1.0 - self.offset)
    scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
    return L.rms_norm(x, scale + self.offset if self.offset else scale, self.eps)


class Embed(nn.Module):
  """Token embedding: tokens [B, T] -> [B, T, d]; `attend(h)` is the tied lm_head h @ embedding.T."""

  num_embeddings: int
  features: int
  init_std: float = 0.02
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
      "embedding",
      nn.initializers.normal(self.init_std),
      (self.num_embeddings, self.features),
      self.param_dtype,
    )

  def __call__(self, tokens: jax.Array) -> jax.Array:
    return self.embedding[tokens]

  def attend(self, h: jax.Array) -> jax.Array:
    return numerics.matmul(h, self.embedding.T)


class Linear(nn.Module):
  """x [..., d_in] -> [..., features] through `kernel` [d_in, features] (+ `bias`), sparsified at `site`
  by `ctx` (`model.Context.linear`); without a ctx it is the dense product."""

  features: int
  use_bias: bool = False
  init_std: float = 0.02
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, ctx: Optional[M.Context] = None, site: str = "") -> jax.Array:
    lin = {
      "kernel": self.param(
        "kernel", nn.initializers.normal(self.init_std), (x.shape[-1], self.features), self.param_dtype
      )
    }
    if self.use_bias:
      lin["bias"] = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    return (ctx or M.Context()).linear(site, x, lin)


class _Block(nn.Module):
  """Shared fields of the per-layer modules; `project` makes the named linears of one block."""

  cfg: ModelConfig
  layer: int = 0
  init_std: float = 0.02
  param_dtype: Dtype = jnp.float32

  def project(self, block: str, ctx: M.Context) -> M.Project:
    shapes = _layer_shapes(self.cfg)

    def apply(proj, x):
      lin = Linear(
        shapes[f"{block}/{proj}/kernel"][1],
        f"{block}/{proj}/bias" in shapes,
        self.init_std,
        self.param_dtype,
        name=proj,
      )
      return lin(x, ctx, S.site_name(self.layer, block, proj))

    return apply


class Attention(_Block):
  """Causal GQA self-attention with RoPE and the KV cache (`model.attention_block`).

  x: normed input [B, T, d]; positions [T]; kv: {'k', 'v': [B, S, K, hd]} or None; kv_len: valid slots
  after the write. Returns (out [B, T, d], updated kv). Params: q/k/v/o_proj (phi3: qkv_proj, o_proj);
  q_norm, k_norm (per head, [hd]) with `cfg.qk_norm`. The layer's window and rope: `cfg.layer_config`.
  """

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    ctx: Optional[M.Context] = None,
    positions: Optional[jax.Array] = None,
    kv: Optional[dict] = None,
    kv_len=None,
  ) -> tuple[jax.Array, Optional[dict]]:
    ctx, positions, kv_len = _positions(x, ctx, positions, kv_len)
    cfg = self.cfg

    def head_norm(name, y):
      return RMSNorm(cfg.rms_norm_eps, self.param_dtype, cfg.norm_offset, name=name)(y)

    project = self.project("self_attn", ctx)
    return M.attention_block(cfg, x, project, positions, kv, kv_len, layer=self.layer, head_norm=head_norm)


class MLP(_Block):
  """Gated MLP (`model.mlp_block`): normed x [B, T, d] -> [B, T, d]. Params: gate/up/down_proj (phi3:
  gate_up_proj, down_proj)."""

  @nn.compact
  def __call__(self, x: jax.Array, ctx: Optional[M.Context] = None) -> jax.Array:
    ctx = ctx or M.Context()
    return M.mlp_block(self.cfg, x, self.project("mlp", ctx), self.layer, ctx)


class DecoderLayer(_Block):
  """Decoder layer (`model.residual_layer`): residual h [B, T, d] -> (h', updated kv). Its norms are named
  by the family's `norms` table: a pre-norm per block, and a post-norm of the block's output where declared.

  Uses the optional `residual_attn` / `residual_mlp` rotations and `rotate_attn` / `rotate_mlp` input
  rotations of a transformed tree when they are in the params (never created by `init`).
  """

  @nn.compact
  def __call__(
    self,
    h: jax.Array,
    ctx: Optional[M.Context] = None,
    positions: Optional[jax.Array] = None,
    kv: Optional[dict] = None,
    kv_len=None,
  ) -> tuple[jax.Array, Optional[dict]]:
    ctx, positions, kv_len = _positions(h, ctx, positions, kv_len)
    cfg, kw = self.cfg, dict(layer=self.layer, init_std=self.init_std, param_dtype=self.param_dtype)
    norms = families.get(cfg.model_type).norms
    norm = lambda name: RMSNorm(cfg.rms_norm_eps, self.param_dtype, cfg.norm_offset, name=name)

    def rotate(key, h):
      return (
        numerics.matmul(h, self.variables["params"][key]["kernel"]) if self.has_variable("params", key) else h
      )

    def normed(block, rot, h):  # the block's pre-norm, then its input rotation if the tree has one
      return rotate(rot, norm(norms[block][0])(h))

    def post(block, y):  # the block's post-norm, if the family declares one
      return y if norms[block][1] is None else norm(norms[block][1])(y)

    def attn(h, skip):
      o, new_kv = Attention(cfg, **kw, name="self_attn")(
        normed("self_attn", "rotate_attn", h), ctx, positions, kv, kv_len
      )
      return skip + post("self_attn", o), new_kv

    def mlp(h, skip):
      return skip + post("mlp", MLP(cfg, **kw, name="mlp")(normed("mlp", "rotate_mlp", h), ctx))

    return M.residual_layer(h, self.layer, ctx, attn, mlp, rotate)


class _Layers(nn.Module):
  """The `layers` scope: layer i is its child named str(i), as in the params dict."""

  cfg: ModelConfig
  init_std: float = 0.02
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, i, h, ctx, positions, kv, kv_len):
    layer = DecoderLayer(self.cfg, i, self.init_std, self.param_dtype, name=str(i))
    return layer(h, ctx, positions, kv, kv_len)


class CausalLM(nn.Module):
  """The decoder-only LM of every supported family (llama, mistral, qwen2, phi3, gemma3_text) as a Flax
  module.

  `__call__(tokens [B, T], sparsifier, cache=, dense_prefix=, collect=)` -> `model.Output` (logits
  [B, T, vocab] float32, cache, aux), arguments and results exactly as `model.forward`'s.
  init_std: std of the normal init of kernels and the embedding; param_dtype: dtype of created params.
  """

  cfg: ModelConfig
  init_std: float = 0.02
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    tokens: jax.Array,
    sparsifier: Any = S.dense,
    *,
    cache: Optional[dict] = None,
    dense_prefix: Optional[jax.Array] = None,
    collect: Sequence[str] = (),
  ) -> M.Output:
    cfg, kw = self.cfg, dict(init_std=self.init_std, param_dtype=self.param_dtype)
    embed = Embed(cfg.vocab_size, cfg.hidden_size, **kw, name="embed_tokens")
    layers = _Layers(cfg, **kw, name="layers")
    norm = RMSNorm(cfg.rms_norm_eps, self.param_dtype, cfg.norm_offset, name="norm")
    lm_head = embed.attend if cfg.tie_word_embeddings else Linear(cfg.vocab_size, **kw, name="lm_head")
    return M.run_decoder(
      cfg,
      tokens,
      embed,
      layers,
      lambda h: lm_head(norm(h)),
      sparsifier,
      cache=cache,
      dense_prefix=dense_prefix,
      collect=collect,
    )

  def init_cache(self, batch: int, max_len: int, dtype: Optional[Dtype] = None) -> dict:
    """An empty KV cache for `__call__(..., cache=)` (`model.init_cache`); dtype defaults to param_dtype."""
    return M.init_cache(self.cfg, batch, max_len, dtype or self.param_dtype)

"""Model configuration: one frozen, hashable dataclass for every supported architecture.

`ModelConfig` is static under `jit` (hashable), so shapes and branches depend on it and nothing else.
Build it from a Hugging Face config with `wina_jax.convert.hf_config.from_hf_config`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from wina_jax import families

# hidden_act values the MLP implements: gate activation of the gated MLP (SwiGLU, GeGLU with tanh GELU).
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling. `kind` is 'linear' or 'llama3' ('default' is `None` on the config)."""

  kind: str
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only transformer: the Llama layout plus generic features a family switches on.

  Attributes mirror HF names. `model_type` names a `wina_jax.families` module; `fused_qkv` /
  `fused_gate_up` select the fused projections (Phi-3's layout, and `decode.fuse_projections`').
  Features (defaults = Llama): `hidden_act` the gated MLP's activation (ACTIVATIONS); `norm_offset` the
  RMSNorm gain convention, gain = norm_offset + scale (Gemma: 1); `qk_norm` per-head RMSNorms of q and k
  (params `self_attn/{q,k}_norm/scale` [hd]); `embed_scale` multiplies the embedding output (not the tied
  lm_head); `query_pre_attn_scalar` sets the attention scale to its -1/2 power (default head_dim); norms
  after each block's output come from the family's `norms` table. `layer_types` (one of LAYER_TYPES per
  layer; None: every layer uses `sliding_window`) makes layers local or global; `rope_local_theta` is the
  rope base of the sliding layers (no scaling). `layer_config(i)` resolves layer i's window and rope.
  """

  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int
  head_dim: int
  max_position_embeddings: int
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None
  partial_rotary_factor: float = 1.0
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # biases on q/k/v (qwen2; llama's attention_bias also covers o_proj)
  o_bias: bool = False
  mlp_bias: bool = False
  sliding_window: Optional[int] = None
  fused_qkv: bool = False
  fused_gate_up: bool = False
  hidden_act: str = "silu"
  norm_offset: float = 0.0
  qk_norm: bool = False
  embed_scale: float = 1.0
  query_pre_attn_scalar: Optional[float] = None
  layer_types: Optional[tuple[str, ...]] = None
  rope_local_theta: Optional[float] = None

  def __post_init__(self):
    families.get(self.model_type)  # raises for an unsupported model_type
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; expected one of {ACTIVATIONS}")
    if self.layer_types is not None:
      object.__setattr__(self, "layer_types", tuple(self.layer_types))  # hashable (JSON gives a list)
      bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
      if bad or len(self.layer_types) != self.num_hidden_layers:
        raise ValueError(
          f"layer_types must name one of {LAYER_TYPES} for each of the {self.num_hidden_layers} layers; "
          f"got {len(self.layer_types)} entries{f', unknown {bad}' if bad else ''}"
        )
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(
        f"num_attention_heads={self.num_attention_heads} is not a multiple of "
        f"num_key_value_heads={self.num_key_value_heads}"
      )

  @property
  def q_dim(self) -> int:
    return self.num_attention_heads * self.head_dim

  @property
  def kv_dim(self) -> int:
    return self.num_key_value_heads * self.head_dim

  @property
  def rotary_dim(self) -> int:
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def attn_scale(self) -> float:
    """The factor of q.k scores: query_pre_attn_scalar ** -1/2, else head_dim ** -1/2."""
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  def layer_config(self, layer: int) -> ModelConfig:
    """This config as layer `layer` attends: a full layer has no window; a sliding layer uses
    `rope_local_theta` (unscaled) when set. Without `layer_types` every layer is `self`."""
    if self.layer_types is None:
      return self
    if self.layer_types[layer] == "full_attention":
      return self.replace(sliding_window=None, layer_types=None, rope_local_theta=None)
    if self.rope_local_theta is None:
      return self.replace(layer_types=None)
    return self.replace(
      layer_types=None, rope_theta=self.rope_local_theta, rope_scaling=None, rope_local_theta=None
    )

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)

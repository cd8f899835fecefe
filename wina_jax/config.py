"""Model configuration: one frozen, hashable dataclass for every supported architecture.

`ModelConfig` is static under `jit` (hashable), so shapes and branches depend on it and nothing else.
Build it from a Hugging Face config with `wina_jax.convert.hf_config.from_hf_config`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from wina_jax import families


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
  """Decoder-only transformer of the Llama family.

  Attributes mirror HF names. `model_type` names a `wina_jax.families` module; `fused_qkv` /
  `fused_gate_up` select the fused projections (Phi-3's layout, and `decode.fuse_projections`').
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

  def __post_init__(self):
    families.get(self.model_type)  # raises for an unsupported model_type
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

  def replace(self, **kw) -> ModelConfig:
    return dataclasses.replace(self, **kw)

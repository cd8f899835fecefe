"""Weights in: HF config -> `ModelConfig`, and HF / safetensors / GGUF tensors -> params."""

from wina_jax.convert.hf_config import from_hf_config
from wina_jax.convert.load import (
  from_gguf,
  from_hf_checkpoint,
  from_state_dict,
  from_transformers,
  load,
  load_default,
)

__all__ = [
  "from_hf_config",
  "from_gguf",
  "from_hf_checkpoint",
  "from_state_dict",
  "from_transformers",
  "load",
  "load_default",
]

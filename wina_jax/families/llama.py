"""Llama (Llama-2, Llama-3 incl. its 'llama3' rope scaling, SmolLM2): the reference layout.

`attention_bias` adds biases to q/k/v and o_proj, `mlp_bias` to the MLP; llama.cpp's converter
interleaves q/k rows (undone on GGUF load). Mistral GGUF files also declare this architecture.
"""

from __future__ import annotations

from wina_jax.families.base import ROPE_KEYS, Family, register, window

# Llama-3's piecewise frequency scaling (computed in `wina_jax.layers.rope_inv_freq`).
LLAMA3_ROPE_KEYS = frozenset(
  {
    "rope_type",
    "rope_theta",
    "partial_rotary_factor",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
  }
)


def config_kwargs(d) -> dict:
  bias = bool(d.get("attention_bias", False))
  return dict(
    attention_bias=bias, o_bias=bias, mlp_bias=bool(d.get("mlp_bias", False)), sliding_window=window(d)
  )


LLAMA = register(
  Family(
    name="llama",
    config_kwargs=config_kwargs,
    hf_fields=frozenset({"attention_bias", "mlp_bias", "pretraining_tp"}),
    rope_types={**ROPE_KEYS, "llama3": LLAMA3_ROPE_KEYS},
    gguf_arch="llama",
    gguf_permuted_qk=True,
  )
)

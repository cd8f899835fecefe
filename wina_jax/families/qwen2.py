"""Qwen2 / Qwen2.5: the Llama layout with biases on q/k/v (not o_proj), full attention in every layer.

GGUF architecture 'qwen2': llama.cpp's converter does not interleave q/k rows for it (the real-model
parity test of issue 15 agrees with transformers' own GGUF load only without un-permuting).
"""

from __future__ import annotations

from wina_jax.families.base import Family, register


def config_kwargs(d) -> dict:
  if d.get("use_sliding_window") or set(d.get("layer_types") or ["full_attention"]) != {"full_attention"}:
    raise ValueError("qwen2 with use_sliding_window=True (per-layer sliding windows) is not supported")
  return dict(attention_bias=True)


QWEN2 = register(
  Family(
    name="qwen2",
    config_kwargs=config_kwargs,
    hf_fields=frozenset({"sliding_window", "use_sliding_window", "max_window_layers"}),
    gguf_arch="qwen2",
    gguf_permuted_qk=False,
  )
)

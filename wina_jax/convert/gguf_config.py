"""GGUF metadata -> an HF-style config dict (then validated by `hf_config.from_hf_config`).

Strict like the HF path: a metadata key under the architecture's prefix that is not mapped here
raises, naming it, instead of being silently ignored (e.g. rope scaling keys we do not implement).
"""

from __future__ import annotations

from wina_jax import families

# '<arch>.<suffix>' -> HF field.
_ARCH_FIELDS = {
  "context_length": "max_position_embeddings",
  "embedding_length": "hidden_size",
  "block_count": "num_hidden_layers",
  "feed_forward_length": "intermediate_size",
  "attention.head_count": "num_attention_heads",
  "attention.head_count_kv": "num_key_value_heads",
  "rope.freq_base": "rope_theta",
  "attention.layer_norm_rms_epsilon": "rms_norm_eps",
  "vocab_size": "vocab_size",
  "rope.dimension_count": "head_dim",
  "attention.key_length": "head_dim",
  "attention.value_length": "head_dim",
  "attention.sliding_window": "sliding_window",
}


def architecture(reader) -> str:
  """`general.architecture` of a `gguf.GGUFReader`."""
  return _value(reader.fields["general.architecture"])


def _value(field):
  return field.contents()


def gguf_hf_config(reader) -> dict:
  """HF config dict for a `gguf.GGUFReader`; raises on unsupported architectures or metadata."""
  fields = reader.fields
  arch = architecture(reader)
  cfg = {"model_type": families.for_gguf_arch(arch).name}
  unknown = []
  for key, field in fields.items():
    if not key.startswith(arch + "."):
      continue
    suffix = key[len(arch) + 1 :]
    if suffix not in _ARCH_FIELDS:
      unknown.append(key)
      continue
    value = _value(field)
    value = float(value) if isinstance(value, float) else value
    hf = _ARCH_FIELDS[suffix]
    if hf in cfg and cfg[hf] != value:
      raise ValueError(f"GGUF metadata {key}={value} disagrees with {hf}={cfg[hf]} (key and value lengths?)")
    cfg[hf] = value
  if unknown:
    raise ValueError(
      f"GGUF metadata {unknown} is not handled by wina_jax; refusing to load a model "
      "that might not be reproduced exactly"
    )
  if "vocab_size" not in cfg:
    cfg["vocab_size"] = len(fields["tokenizer.ggml.tokens"].data)
  if "head_dim" not in cfg:
    cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
  cfg["tie_word_embeddings"] = not any(t.name == "output.weight" for t in reader.tensors)
  for hf_key, gguf_key in (
    ("bos_token_id", "bos_token_id"),
    ("eos_token_id", "eos_token_id"),
    ("pad_token_id", "padding_token_id"),
  ):
    if f"tokenizer.ggml.{gguf_key}" in fields:
      cfg[hf_key] = int(_value(fields[f"tokenizer.ggml.{gguf_key}"]))
  return cfg

"""HF config -> `ModelConfig`, with a strict whitelist.

Every field of the HF config is either mapped, known to be irrelevant at inference (shared fields here, family
fields in `wina_jax.families.<model_type>`), or equal to the HF class default; anything else raises a
ValueError that names it, so a model we would not reproduce exactly is never loaded silently (Penzai's
`llama_from_huggingface_model` does the same).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Union

from wina_jax import families
from wina_jax.config import LAYER_TYPES, ModelConfig, RopeScaling

# Fields (of every family) that do not change the forward pass at inference.
IGNORED = frozenset(
  {
    "_name_or_path",
    "architectures",
    "chunk_size_feed_forward",
    "dtype",
    "torch_dtype",
    "id2label",
    "label2id",
    "is_encoder_decoder",
    "model_type",
    "output_attentions",
    "output_hidden_states",
    "problem_type",
    "return_dict",
    "transformers_version",
    "initializer_range",
    "use_cache",
    "attention_dropout",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "tokenizer_class",
    "_model_name_or_path",
    "unk_token_id",
  }
)
MAPPED = frozenset(
  {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "layer_types",
    "partial_rotary_factor",
    "quantization_config",
  }
)


def _hf_dicts(config: Union[Mapping[str, Any], Any]) -> tuple[dict, dict]:
  """(the config's to_dict(), its class defaults' to_dict()) via transformers."""
  import transformers

  if isinstance(config, Mapping):
    config = dict(config)
    model_type = config.pop("model_type", None)
    families.get(model_type)  # raises for an unsupported model_type
    config = transformers.AutoConfig.for_model(model_type, **config)
  families.get(getattr(config, "model_type", None))
  return config.to_dict(), type(config)().to_dict()


def _rope_one(d: dict, rp: dict, rope_keys: dict) -> tuple[float, RopeScaling | None, float]:
  """(theta, scaling, partial rotary factor) of one rope_parameters dict `rp` (keys checked)."""
  kind = rp.get("rope_type", "default")
  if kind not in rope_keys:
    raise ValueError(
      f"rope_type {kind!r} is not supported for model_type {d['model_type']!r}; "
      f"supported: {sorted(rope_keys)}"
    )
  extra = set(rp) - rope_keys[kind]
  if extra:
    raise ValueError(f"rope_parameters fields {sorted(extra)} are not handled for rope_type {kind!r}")
  theta = float(rp.get("rope_theta", d.get("rope_theta", 10000.0)))
  partial = float(rp.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) or 1.0)
  if kind == "default":
    return theta, None, partial
  kw = {k: rp[k] for k in rope_keys[kind] - {"rope_type", "rope_theta", "partial_rotary_factor"} if k in rp}
  return theta, RopeScaling(kind=kind, **kw), partial


def _rope(d: dict, rope_keys: dict) -> dict:
  """The rope fields of `ModelConfig` from `rope_parameters`: one dict for every layer, or (transformers'
  per-layer-type form) {'full_attention': {...}, 'sliding_attention': {...}}, the sliding one unscaled and
  giving `rope_local_theta`."""
  rp = dict(d.get("rope_parameters") or {})
  if set(rp) & set(LAYER_TYPES):
    if set(rp) - set(LAYER_TYPES):
      raise ValueError(f"rope_parameters mixes layer types and fields: {sorted(rp)}")
    theta, scaling, partial = _rope_one(d, dict(rp.get("full_attention") or {}), rope_keys)
    local = rp.get("sliding_attention")
    local_theta = None
    if local is not None and "sliding_attention" in (d.get("layer_types") or ()):
      local_theta, local_scaling, local_partial = _rope_one(d, dict(local), rope_keys)
      if local_scaling is not None or local_partial != partial:
        raise ValueError(
          f"rope_parameters['sliding_attention'] {local} is not handled: sliding layers take an "
          "unscaled rope with the full layers' rotary fraction"
        )
    return dict(
      rope_theta=theta, rope_scaling=scaling, partial_rotary_factor=partial, rope_local_theta=local_theta
    )
  theta, scaling, partial = _rope_one(d, rp, rope_keys)
  return dict(rope_theta=theta, rope_scaling=scaling, partial_rotary_factor=partial)


def _check_quantization(d: dict) -> None:
  """A GGUF-loaded transformers model holds dequantised float weights: accepted. Any other quantisation
  (bitsandbytes, GPTQ, AWQ, ...) changes the weights or the matmuls and raises."""
  q = d.get("quantization_config")
  method = (q or {}).get("quant_method")
  if q is not None and method != "gguf":
    raise ValueError(
      f"HF config field quantization_config (quant_method {method!r}) is not handled: the "
      "model holds quantised weights wina_jax would not reproduce; load it unquantised "
      "(without quantization_config) or from its GGUF file with `wina_jax.convert.from_gguf`"
    )


def from_hf_config(config: Union[Mapping[str, Any], Any]) -> ModelConfig:
  """`ModelConfig` from a transformers config object or a config.json dict. Raises on unknown fields."""
  d, defaults = _hf_dicts(config)
  model_type = d["model_type"]
  family = families.get(model_type)
  known = MAPPED | IGNORED | family.hf_fields
  unknown = sorted(k for k, v in d.items() if k not in known and (k not in defaults or defaults[k] != v))
  if unknown:
    raise ValueError(
      f"HF config fields {unknown} (values {[d[k] for k in unknown]}) are not handled by "
      f"wina_jax for model_type {model_type!r}; remove them or add support in {family.source}"
    )
  _check_quantization(d)
  head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
  fields = dict(
    model_type=model_type,
    vocab_size=d["vocab_size"],
    hidden_size=d["hidden_size"],
    intermediate_size=d["intermediate_size"],
    num_hidden_layers=d["num_hidden_layers"],
    num_attention_heads=d["num_attention_heads"],
    num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
    head_dim=head_dim,
    max_position_embeddings=d["max_position_embeddings"],
    rms_norm_eps=float(d["rms_norm_eps"]),
    tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
    hidden_act=d.get("hidden_act", "silu"),
    **_rope(d, family.rope_types),
  )
  return ModelConfig(**{**fields, **family.config_kwargs(d)})

"""Declarative name maps: HF / GGUF tensor names -> params paths, with a per-tensor hook.

Each rule is (regex on the source name, target path template, hook). Hooks: 'linear' transposes a
torch [out, in] weight into a Flax [in, out] kernel; 'copy' keeps the array as it is.
"""
from __future__ import annotations

import re

import numpy as np

HF_RULES = (
    (r"model\.embed_tokens\.weight", "embed_tokens/embedding", "copy"),
    (r"model\.norm\.weight", "norm/scale", "copy"),
    (r"lm_head\.weight", "lm_head/kernel", "linear"),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", "layers/{0}/{1}/scale", "copy"),
    (r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.weight", "layers/{0}/{1}/{2}/kernel", "linear"),
    (r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.bias", "layers/{0}/{1}/{2}/bias", "copy"),
)

# GGUF (llama.cpp) names -> HF names; q/k rows are un-permuted separately (see load.unpermute_qk).
GGUF_TO_HF = (
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", "model.layers.{0}.self_attn.q_proj.{1}"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", "model.layers.{0}.self_attn.k_proj.{1}"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", "model.layers.{0}.self_attn.v_proj.{1}"),
    (r"blk\.(\d+)\.attn_output\.weight", "model.layers.{0}.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", "model.layers.{0}.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{0}.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", "model.layers.{0}.mlp.down_proj.weight"),
)

HOOKS = {"copy": lambda a: a, "linear": lambda a: np.ascontiguousarray(a.T)}


def _match(rules, name: str):
  for rule in rules:
    m = re.fullmatch(rule[0], name)
    if m:
      return m, rule
  return None, None


def hf_target(name: str) -> tuple[str, str] | None:
  """('layers/3/mlp/down_proj/kernel', 'linear') for an HF tensor name, None for ignorable buffers."""
  m, rule = _match(HF_RULES, name)
  if m is None:
    if name.endswith("rotary_emb.inv_freq"):
      return None
    raise KeyError(f"tensor {name!r} has no mapping into wina_jax params; is this a supported "
                   "Llama-family checkpoint?")
  return rule[1].format(*m.groups()), rule[2]


def gguf_to_hf(name: str) -> str | None:
  """HF name of a GGUF tensor; None for tensors with no HF counterpart (e.g. rope_freqs)."""
  m, rule = _match(GGUF_TO_HF, name)
  if m is None:
    if name in ("rope_freqs.weight",):
      return None
    raise KeyError(f"GGUF tensor {name!r} has no mapping; only llama and qwen2 GGUF files are supported")
  return rule[1].format(*m.groups())

"""Gemma 3 (text; HF `model_type` 'gemma3_text', GGUF architecture 'gemma3'): the Llama projections with
the features Gemma switches on, each a generic `ModelConfig` field or `Family` declaration:

- sandwich norms: every block's output is RMS-normed before the residual add (`norms`: the attention's
  pre / post norms are input_layernorm / post_attention_layernorm, the MLP's pre_feedforward_layernorm /
  post_feedforward_layernorm);
- per-head RMSNorms of q and k (`qk_norm`), every gain 1 + w (`norm_offset=1`);
- the embedding times sqrt(d) (`embed_scale`; the tied lm_head reads the unscaled embedding);
- a GeGLU MLP (`hidden_act='gelu_pytorch_tanh'`), scores scaled by `query_pre_attn_scalar` ** -1/2;
- local attention (sliding window, rope base `rope_local_theta`, HF's rope_local_base_freq) on the layers
  `layer_types` marks 'sliding_attention' (five of six), global attention with `rope_theta` on the rest.

llama.cpp stores every norm weight as 1 + w (`gguf_norm_shift`) and does not interleave q/k rows.
Soft-capping, bidirectional attention and biases are refused.
"""

from __future__ import annotations

from wina_jax.families.base import GGUF_RULES, HF_RULES, Family, register

NORMS = {
  "self_attn": ("input_layernorm", "post_attention_layernorm"),
  "mlp": ("pre_feedforward_layernorm", "post_feedforward_layernorm"),
}
_NORM_NAMES = "input_layernorm|post_attention_layernorm|pre_feedforward_layernorm|post_feedforward_layernorm"

HF_GEMMA_RULES = (
  *(rule for rule in HF_RULES if "layernorm" not in rule[0]),
  (rf"model\.layers\.(\d+)\.({_NORM_NAMES})\.weight", "layers/{0}/{1}/scale", "copy"),
  (r"model\.layers\.(\d+)\.self_attn\.(q_norm|k_norm)\.weight", "layers/{0}/self_attn/{1}/scale", "copy"),
)

GGUF_GEMMA_RULES = (
  *(rule for rule in GGUF_RULES if "norm" not in rule[0] or "output_norm" in rule[0]),
  (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
  (r"blk\.(\d+)\.post_attention_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
  (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.pre_feedforward_layernorm.weight"),
  (r"blk\.(\d+)\.post_ffw_norm\.weight", "model.layers.{0}.post_feedforward_layernorm.weight"),
  (r"blk\.(\d+)\.attn_(q|k)_norm\.weight", "model.layers.{0}.self_attn.{1}_norm.weight"),
)

# Fields that change the forward pass unless unset / False (soft-capping, bidirectional attention, biases).
_REFUSED = (
  "final_logit_softcapping",
  "attn_logit_softcapping",
  "use_bidirectional_attention",
  "attention_bias",
)


def config_kwargs(d) -> dict:
  for field in _REFUSED:
    if d.get(field) not in (None, False):
      raise ValueError(f"gemma3_text with {field}={d[field]!r} is not supported (only unset / False)")
  act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
  if act != "gelu_pytorch_tanh":
    raise ValueError(f"gemma3_text hidden_activation {act!r} is not supported; only 'gelu_pytorch_tanh'")
  return dict(
    hidden_act=act,
    norm_offset=1.0,
    qk_norm=True,
    embed_scale=float(d["hidden_size"] ** 0.5),
    query_pre_attn_scalar=float(d["query_pre_attn_scalar"]),
    layer_types=tuple(d["layer_types"]),
    sliding_window=d.get("sliding_window"),
  )


GEMMA3 = register(
  Family(
    name="gemma3_text",
    config_kwargs=config_kwargs,
    hf_fields=frozenset(
      {
        "hidden_activation",
        "query_pre_attn_scalar",
        "sliding_window",
        *_REFUSED,
        "sliding_window_pattern",
        "_sliding_window_pattern",
      }
    ),
    hf_rules=HF_GEMMA_RULES,
    gguf_rules=GGUF_GEMMA_RULES,
    gguf_arch="gemma3",
    gguf_permuted_qk=False,
    norms=NORMS,
    gguf_norm_shift=1.0,
  )
)

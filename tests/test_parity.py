"""Logit parity with transformers on tiny random configs, float32."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY_CONFIGS, make_hf_model

from wina_jax.convert import from_transformers
from wina_jax.model import forward


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_logits_match_transformers(name, rng):
  model = make_hf_model(name)
  params, cfg = from_transformers(model)
  tokens = rng.randint(0, cfg.vocab_size, (2, 19))
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
  ours = np.asarray(forward(params, jnp.asarray(tokens), cfg).logits)
  assert ours.shape == ref.shape
  assert np.abs(ours - ref).max() <= 1e-4, np.abs(ours - ref).max()
  assert np.abs(ref).max() > 0.1  # the comparison is not between near-zero logits


def test_architecture_features_are_mapped():
  cfgs = {n: from_transformers(make_hf_model(n))[1] for n in TINY_CONFIGS}
  assert cfgs["llama_gqa_tied"].tie_word_embeddings and cfgs["llama_gqa_tied"].num_key_value_heads == 2
  assert cfgs["llama3_rope"].rope_scaling.kind == "llama3"
  assert cfgs["qwen2_bias"].attention_bias and not cfgs["qwen2_bias"].o_bias
  assert cfgs["mistral"].sliding_window == 8
  assert cfgs["phi3_fused"].fused_qkv and cfgs["phi3_fused"].fused_gate_up


def test_bfloat16_forward_close_to_float32(rng):
  model = make_hf_model("llama_gqa_tied")
  params, cfg = from_transformers(model)
  params16, _ = from_transformers(model, dtype=jnp.bfloat16)
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (1, 12)))
  a = np.asarray(forward(params, tokens, cfg).logits)
  b = np.asarray(forward(params16, tokens, cfg).logits)
  assert params16["layers"]["0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
  assert np.abs(a - b).max() < 0.05 * np.abs(a).max()

"""Real weights: SmolLM2-135M-Instruct from the bundled GGUF vs transformers' own GGUF load."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from wina_jax import assets
from wina_jax.convert import from_transformers
from wina_jax.generate import greedy_decode
from wina_jax.model import forward

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def hf_smollm2():
  import transformers

  folder, name = os.path.split(assets.default_gguf())
  return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()


def test_config_is_smollm2(smollm2):
  _, cfg = smollm2
  assert (
    cfg.hidden_size,
    cfg.num_hidden_layers,
    cfg.num_attention_heads,
    cfg.num_key_value_heads,
    cfg.intermediate_size,
    cfg.vocab_size,
  ) == (576, 30, 9, 3, 1536, 49152)
  assert cfg.tie_word_embeddings and cfg.rope_theta == 1e5


def test_logits_and_greedy_match_transformers(smollm2, smollm2_tokenizer, hf_smollm2):
  params, cfg = smollm2
  ids = smollm2_tokenizer(PROMPT, return_tensors="np")["input_ids"]
  with torch.no_grad():
    ref = hf_smollm2(torch.tensor(ids)).logits.numpy()
  ours = np.asarray(forward(params, jnp.asarray(ids), cfg).logits)
  assert np.abs(ours - ref).max() <= 1e-3, np.abs(ours - ref).max()
  ref_gen = hf_smollm2.generate(torch.tensor(ids), max_new_tokens=20, do_sample=False)[0, ids.shape[1] :]
  ours_gen = greedy_decode(params, cfg, ids, 20)[0]
  np.testing.assert_array_equal(ours_gen, ref_gen.numpy())
  assert smollm2_tokenizer.decode(ours_gen).startswith(" Paris")


def test_from_transformers_of_the_gguf_load_equals_from_gguf(smollm2, hf_smollm2):
  """transformers' GGUF load carries `_model_name_or_path`, `unk_token_id` and a GGUF quantization_config
  (its weights are already dequantised): accepted, and the params are ours."""
  params, cfg = smollm2
  assert hf_smollm2.config.quantization_config.quant_method == "gguf"
  ref_params, ref_cfg = from_transformers(hf_smollm2)
  assert ref_cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, ref_params, params)

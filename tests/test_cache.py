"""KV-cache decode equals full recompute; the jitted decode step compiles once."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model

from wina_jax.convert import from_transformers
from wina_jax.model import forward, init_cache, jit_forward


@pytest.mark.parametrize("name", ["llama_gqa_tied", "mistral", "phi3_fused", "qwen2_bias", "gemma3"])
def test_prefill_then_decode_equals_recompute(name, rng):
  params, cfg = from_transformers(make_hf_model(name))
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (2, 14)))
  full = forward(params, tokens, cfg).logits
  cache = init_cache(cfg, 2, 16)
  out = forward(params, tokens[:, :9], cfg, cache=cache)
  steps = [out.logits]
  cache = out.cache
  for t in range(9, 14):
    out = forward(params, tokens[:, t : t + 1], cfg, cache=cache)
    steps.append(out.logits)
    cache = out.cache
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)
  assert int(cache["length"]) == 14


def test_gemma3_decode_attention_kernel_matches_xla(rng):
  """The Pallas decode attention (interpret mode) takes gemma3's q/k norms, score scale and per-layer
  window and rope base: cached steps past the local window equal the XLA attention's."""
  params, cfg = from_transformers(make_hf_model("gemma3"))
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (1, 10)))
  prefix = forward(params, tokens[:, :7], cfg, cache=init_cache(cfg, 1, 16)).cache
  for backend in ("xla", "interpret"):
    cache, steps = prefix, []
    for t in range(7, 10):
      out = forward(params, tokens[:, t : t + 1], cfg, cache=cache, attention=backend)
      steps.append(out.logits)
      cache = out.cache
    if backend == "xla":
      ref = np.concatenate(steps, axis=1)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), ref, atol=2e-5, rtol=0)
  np.testing.assert_allclose(ref, forward(params, tokens, cfg).logits[:, 7:], atol=1e-5, rtol=0)


def test_jitted_decode_step_does_not_retrace(rng):
  params, cfg = from_transformers(make_hf_model("llama_mha"))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, cache, token):
    return forward(params, token, cfg, cache=cache)

  cache = init_cache(cfg, 1, 8)
  token = jnp.zeros((1, 1), jnp.int32)
  for _ in range(6):
    out = step(params, cache, token)
    cache, token = out.cache, jnp.argmax(out.logits[:, -1:], axis=-1).astype(jnp.int32)
  assert int(cache["length"]) == 6


def test_jit_forward_matches_forward(rng):
  params, cfg = from_transformers(make_hf_model("qwen2_bias"))
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (1, 7)))
  np.testing.assert_allclose(
    jit_forward(params, tokens, cfg).logits, forward(params, tokens, cfg).logits, atol=1e-6
  )

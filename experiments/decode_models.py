"""Random-weight models of real shapes for the decode benchmark (and tiny ones for CI)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from wina_jax import families
from wina_jax.config import ModelConfig
from wina_jax.eval.flops import paper_config

# The paper's shapes come from their HF configs (wina_jax.eval.flops.PAPER_CONFIGS).
SHAPES = {
    "llama3_8b": paper_config("Llama-3-8B"),
    "qwen25_7b": paper_config("Qwen-2.5-7B"),
    "phi4_14b": paper_config("Phi-4-14B"),
    "tiny": ModelConfig(model_type="qwen2", vocab_size=97, hidden_size=128, intermediate_size=256,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                        max_position_embeddings=128, attention_bias=True),
}


def _jax_normal(key, shape, dtype, std):
  return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


def random_params(cfg: ModelConfig, key, dtype=jnp.bfloat16) -> dict:
  """Unfused params (`wina_jax.model` layout) with N(0, 1/d_in) kernels and unit norm scales.

  key: a jax PRNG key (generated on the device), or an int seed for numpy (quick for tiny CPU models).
  """
  d = cfg.hidden_size
  layout = families.get(cfg.model_type).layout(cfg)
  if isinstance(key, int):
    rng = np.random.default_rng(key)
    keys = iter([None] * (10 * cfg.num_hidden_layers + 2))
    _normal = lambda _, shape, dtype, std: jnp.asarray(rng.standard_normal(shape, np.float32) * std, dtype)
  else:
    keys = iter(jax.random.split(key, 10 * cfg.num_hidden_layers + 2))
    _normal = _jax_normal
  lin = lambda din, dout: {"kernel": _normal(next(keys), (din, dout), dtype, din ** -0.5)}
  layers = {}
  for l in range(cfg.num_hidden_layers):
    attn = {p: lin(*s) for p, s in layout["self_attn"].items()}
    if cfg.attention_bias:
      for p in ("q_proj", "k_proj", "v_proj"):
        attn[p]["bias"] = _normal(next(keys), (layout["self_attn"][p][1],), dtype, 0.02)
    layers[str(l)] = {"input_layernorm": {"scale": jnp.ones((d,), dtype)}, "self_attn": attn,
                      "post_attention_layernorm": {"scale": jnp.ones((d,), dtype)},
                      "mlp": {p: lin(*s) for p, s in layout["mlp"].items()}}
  return {"embed_tokens": {"embedding": _normal(next(keys), (cfg.vocab_size, d), dtype, 1.0)},
          "layers": layers, "norm": {"scale": jnp.ones((d,), dtype)},
          "lm_head": {"kernel": _normal(next(keys), (d, cfg.vocab_size), dtype, d ** -0.5)}}


def add_shortcuts(params: dict, seed: int) -> dict:
  """Adds random orthogonal residual rotations `residual_attn` / `residual_mlp` [d, d] to every layer
  (the WINA transform's shortcuts); each layer gets its own buffer (row permutation and signs of one Q)."""
  d = params["norm"]["scale"].shape[0]
  dtype = params["norm"]["scale"].dtype
  rng = np.random.default_rng(seed)
  q = np.linalg.qr(rng.standard_normal((d, d)).astype(np.float32))[0]
  rot = lambda: jnp.asarray(q[rng.permutation(d)] * rng.choice([-1.0, 1.0], (1, d)).astype(np.float32), dtype)
  return {**params, "layers": {i: {**lp, "residual_attn": {"kernel": rot()}, "residual_mlp": {"kernel": rot()}}
                               for i, lp in params["layers"].items()}}

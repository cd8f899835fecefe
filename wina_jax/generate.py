"""Greedy generation with the KV cache: one dense-or-sparse prefill, then a jitted one-token step."""
from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from wina_jax import sites as S
from wina_jax.config import ModelConfig
from wina_jax.model import init_cache, jit_forward


def greedy(params: dict, cfg: ModelConfig, prompt: np.ndarray, max_new_tokens: int,
           sparsifier: Any = S.dense, *, dense_prefill: bool = True, eos_id: Optional[int] = None,
           cache_dtype=None) -> np.ndarray:
  """Greedy continuation of `prompt` [B, T] -> [B, max_new_tokens] token ids.

  dense_prefill: the prompt runs dense (TEAL/WINA's setting) and only decode steps are sparsified.
  Stops early once every row has produced `eos_id`.
  """
  prompt = np.asarray(prompt)
  b, t = prompt.shape
  dtype = cache_dtype or params["embed_tokens"]["embedding"].dtype
  cache = init_cache(cfg, b, t + max_new_tokens, dtype)
  out = jit_forward(params, jnp.asarray(prompt), cfg, sparsifier, cache=cache,
                    dense_prefix=t if dense_prefill else None)
  token = jnp.argmax(out.logits[:, -1], axis=-1)
  cache, new = out.cache, [np.asarray(token)]
  for _ in range(max_new_tokens - 1):
    if eos_id is not None and np.all(np.any(np.stack(new, 1) == eos_id, axis=1)):
      break
    out = jit_forward(params, token[:, None], cfg, sparsifier, cache=cache,
                      dense_prefix=t if dense_prefill else None)
    token = jnp.argmax(out.logits[:, -1], axis=-1)
    cache = out.cache
    new.append(np.asarray(token))
  return np.stack(new, axis=1)

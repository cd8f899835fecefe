"""Greedy generation with the KV cache: one dense-or-sparse prefill, then every decode step in one
on-device loop (no host dispatch per token: on a GPU that dispatch costs more than a small step)."""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from wina_jax import sites as S
from wina_jax.config import ModelConfig
from wina_jax.decode import greedy_step
from wina_jax.model import init_cache, jit_forward, split_sparsifier


@functools.partial(jax.jit, static_argnames=("cfg", "static_sparsifier", "steps", "eos_id"))
def _decode(params, token, cache, dynamic_sparsifier, static_sparsifier, dense_prefix, *, cfg, steps, eos_id):
  """Up to `steps` tokens [B, steps] starting with `token` [B], and how many were made (fewer once every
  row has produced `eos_id`)."""
  sp = static_sparsifier if dynamic_sparsifier is None else dynamic_sparsifier
  eos = -1 if eos_id is None else eos_id

  def cond(carry):
    i, _, _, _, done = carry
    return (i < steps) & ~jnp.all(done)

  def body(carry):
    i, tok, cache, out, done = carry
    nxt, _, cache = greedy_step(params, tok, cache, sp, cfg, dense_prefix)
    return i + 1, nxt, cache, out.at[:, i].set(nxt), done | (nxt == eos)

  out = jnp.zeros((token.shape[0], steps), jnp.int32).at[:, 0].set(token)
  i, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), token, cache, out, token == eos))
  return out, i


def greedy_decode(
  params: dict,
  cfg: ModelConfig,
  prompt: np.ndarray,
  max_new_tokens: int,
  sparsifier: Any = S.dense,
  *,
  dense_prefill: bool = True,
  eos_id: Optional[int] = None,
  cache_dtype=None,
) -> np.ndarray:
  """Greedy continuation of `prompt` [B, T] -> [B, max_new_tokens] token ids.

  dense_prefill: the prompt runs dense (TEAL/WINA's setting) and only decode steps are sparsified.
  Stops early once every row has produced `eos_id`. The sparsifier is traced or static as
  `wina_jax.model.split_sparsifier` says; one with a `check_waits` method (the persistent layer kernel's) is
  checked after the loop, so a launch whose grid-wide wait gave up raises instead of returning its tokens.
  """
  prompt = np.asarray(prompt)
  b, t = prompt.shape
  dtype = cache_dtype or params["embed_tokens"]["embedding"].dtype
  cache = init_cache(cfg, b, t + max_new_tokens, dtype)
  prefix = t if dense_prefill else None
  out = jit_forward(params, jnp.asarray(prompt), cfg, sparsifier, cache=cache, dense_prefix=prefix)
  token = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
  tokens, n = _decode(
    params,
    token,
    out.cache,
    *split_sparsifier(sparsifier),
    None if prefix is None else jnp.int32(prefix),
    cfg=cfg,
    steps=max_new_tokens,
    eos_id=eos_id,
  )
  tokens = np.asarray(tokens)[:, : int(n)]
  check = getattr(sparsifier, "check_waits", None)
  if check is not None:  # the persistent layer kernel: raises if its watchdog gave up a wait (wrong tokens)
    check()
  return tokens

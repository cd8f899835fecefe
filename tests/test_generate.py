"""Greedy generation's on-device loop equals a host loop of one-token forwards (dense, sparse, eos)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wina_jax import sites as S
from wina_jax.bench.shapes import SHAPES
from wina_jax.generate import greedy_decode
from wina_jax.kernels import FusedThresholdSparsifier
from wina_jax.model import init_cache, jit_forward
from wina_jax.testing import random_params

CFG = SHAPES["tiny"]


def host_greedy(params, prompt, n, sp, eos_id=None):
  """The reference: prefill, then one jitted forward per token, stopping once every row has made eos."""
  t = prompt.shape[1]
  out = jit_forward(
    params, jnp.asarray(prompt), CFG, sp, cache=init_cache(CFG, prompt.shape[0], t + n), dense_prefix=t
  )
  new = [np.asarray(jnp.argmax(out.logits[:, -1], axis=-1))]
  for _ in range(n - 1):
    if eos_id is not None and np.all(np.any(np.stack(new, 1) == eos_id, axis=1)):
      break
    out = jit_forward(params, jnp.asarray(new[-1])[:, None], CFG, sp, cache=out.cache, dense_prefix=t)
    new.append(np.asarray(jnp.argmax(out.logits[:, -1], axis=-1)))
  return np.stack(new, axis=1)


@pytest.mark.parametrize("kind", ["dense", "pytree", "function"])
def test_device_loop_equals_host_loop(kind):
  params = random_params(CFG, 0, jnp.float32)
  prompt = np.asarray(jax.random.randint(jax.random.PRNGKey(2), (2, 5), 0, CFG.vocab_size))
  sp = {
    "dense": S.dense,
    "pytree": FusedThresholdSparsifier.create({s: 0.5 for s in S.linear_sites(CFG)}, backend="xla"),
    "function": lambda site, x, kernel: jnp.where(jnp.abs(x) > 0.5, x, 0.0),
  }[kind]
  ref = host_greedy(params, prompt, 8, sp)
  np.testing.assert_array_equal(greedy_decode(params, CFG, prompt, 8, sp), ref)
  eos = int(ref[0, 2])  # row 0 stops at its third token; row 1 may run on
  got = greedy_decode(params, CFG, prompt, 8, sp, eos_id=eos)
  np.testing.assert_array_equal(got, host_greedy(params, prompt, 8, sp, eos_id=eos))
  both = greedy_decode(params, CFG, prompt[:1], 8, sp, eos_id=eos)
  assert both.shape[1] == 3  # one row: stops right after its eos

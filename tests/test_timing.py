"""wina_jax.bench.timing: the chained timing keeps every call, in order, each on the same input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from wina_jax.bench.timing import chain_of, chain_times, chained, timed_chain


def test_chain_keeps_every_call_and_its_input():
  """5 chained calls compile to 5 matmuls (none merged or dropped, which a plain loop of identical calls, or
  one whose outputs go unused, would allow), and the input each call sees is the original x."""
  calls = []

  def f(x, w):
    jax.debug.callback(lambda v: calls.append(np.asarray(v)), x)
    return jnp.tanh(x @ w)

  x, w = jnp.arange(8.0).reshape(1, 8) / 8, jnp.ones((8, 8))
  plain = jax.jit(functools.partial(chained, lambda x, w: jnp.tanh(x @ w), n=5))
  assert plain.lower(x, w).compile().as_text().count(" dot(") == 5
  chain = jax.jit(functools.partial(chained, f, n=5))
  np.testing.assert_array_equal(chain(x, w), x)
  assert len(calls) == 5 and all(np.array_equal(c, x) for c in calls)
  assert 0 < timed_chain(jnp.tanh, x, n=3, reps=2) < 1.0
  ts = chain_times(jnp.tanh, x, n=3, reps=4)
  assert len(ts) == 4 and all(0 < t < 1.0 for t in ts)
  # a chain made once (`chain_of`) is what chain_times runs when given it: no second trace
  traces = []
  made = chain_of(lambda x: traces.append(1) or jnp.tanh(x), 3)
  ts = chain_times(None, x, n=3, reps=2, chain=made)
  made(x)
  assert len(ts) == 2 and all(0 < t < 1.0 for t in ts) and len(traces) == 1  # traced (and compiled) once

"""`wina_jax.bench.glue.glue_ops`: a step's ops outside its kernels, counted per call site."""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from wina_jax.bench.glue import glue_ops


def test_counts_ops_outside_kernels_per_call_site():
  """Free ops are left out, a nested jit's ops count once per call, a kernel counts as one and is not entered."""

  def double(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2 + 1  # inside the kernel: not glue

  kernel = pl.pallas_call(double, out_shape=jax.ShapeDtypeStruct((8,), jnp.float32), interpret=True)
  inner = jax.jit(lambda x: jnp.sin(x) * x)

  def step(x):
    y = inner(x.reshape(8).astype(jnp.float32)) + inner(x.reshape(8))
    return kernel(y).sum()

  got = glue_ops(step, jnp.ones((2, 4), jnp.float32))
  assert got == {"sin": 2, "mul": 2, "add": 1, "KERNEL": 1, "reduce_sum": 1}

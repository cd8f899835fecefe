"""Random-weight models of real shapes, for tests, notebooks and the decode benchmarks."""

from __future__ import annotations

import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from wina_jax.config import ModelConfig
from wina_jax.convert.load import expected_shapes


def _normal(path: str, shape: tuple, scale_noise: float, unit: float = 1.0) -> tuple[float, float]:
  """(mean, std) of a parameter: N(0, 1/d_in) kernels, N(0, 1) embedding, N(0, 0.02^2) biases,
  norm scales N(unit, scale_noise^2) (unit: the scale of a unit gain, 1 - `cfg.norm_offset`)."""
  if path.endswith("scale"):
    return unit, scale_noise
  return 0.0, 1.0 if path.startswith("embed") else 0.02 if path.endswith("bias") else shape[0] ** -0.5


@functools.cache
def _initializer(shape: tuple, sharding, mean: float, std: float, dtype):
  """One jitted initializer per (shape, sharding, distribution): key -> N(mean, std^2), made in place."""
  return jax.jit(
    lambda key: (mean + jax.random.normal(key, shape, jnp.float32) * std).astype(dtype),
    out_shardings=sharding,
  )


def random_params(
  cfg: ModelConfig,
  key: Union[int, jax.Array] = 0,
  dtype=jnp.bfloat16,
  *,
  scale_noise: float = 0.0,
  shardings: Optional[dict] = None,
) -> dict:
  """Params of every shape `cfg` implies (`convert.load.expected_shapes`, `wina_jax.model` layout):
  N(0, 1/d_in) kernels [in, out], N(0, 1) embedding, N(0, 0.02^2) biases, norm
  gains N(1, scale_noise^2) (scales 1 - `norm_offset` + noise).

  key: an int seed (numpy on the host: quick for small CPU models) or a jax PRNG key (made on the
    device, one array at a time: for models of real size).
  shardings: {flat 'a/b/kernel' path: jax Sharding} to create arrays sharded (jax key only; others: default).
  """
  shapes = expected_shapes(cfg)
  if isinstance(key, int):
    if shardings:
      raise ValueError("shardings need a jax PRNG key (key=jax.random.key(seed)), not an int seed")
    rng = np.random.default_rng(key)
    draw = lambda path, shape, mean, std: mean + rng.standard_normal(shape, np.float32) * std
  else:
    keys = iter(jax.random.split(key, len(shapes)))
    draw = lambda path, shape, mean, std: _initializer(shape, (shardings or {}).get(path), mean, std, dtype)(
      next(keys)
    )
  flat = {
    p: jnp.asarray(draw(p, s, *_normal(p, s, scale_noise, 1.0 - cfg.norm_offset)), dtype)
    for p, s in shapes.items()
  }
  return traverse_util.unflatten_dict(flat, sep="/")


def add_shortcuts(params: dict, seed: int) -> dict:
  """Adds random orthogonal residual rotations `residual_attn` / `residual_mlp` [d, d] to every layer
  (the WINA transform's shortcuts); each layer gets its own buffer (row permutation and signs of one Q)."""
  d = params["norm"]["scale"].shape[0]
  dtype = params["norm"]["scale"].dtype
  rng = np.random.default_rng(seed)
  q = np.linalg.qr(rng.standard_normal((d, d)).astype(np.float32))[0]
  rot = lambda: jnp.asarray(q[rng.permutation(d)] * rng.choice([-1.0, 1.0], (1, d)).astype(np.float32), dtype)
  return {
    **params,
    "layers": {
      i: {**lp, "residual_attn": {"kernel": rot()}, "residual_mlp": {"kernel": rot()}}
      for i, lp in params["layers"].items()
    },
  }

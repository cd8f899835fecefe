"""Declared numerics (`wina_jax.numerics`): 16-bit operand pairs take JAX's default precision in every model
dot, float32 operands the declared setting; both compute the same numbers as the setting asks."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from wina_jax import model as M
from wina_jax import numerics
from wina_jax.bench.shapes import SHAPES
from wina_jax.testing import random_params


def test_dot_precision_rule():
  bf, f32, f16 = jnp.ones(2, jnp.bfloat16), jnp.ones(2, jnp.float32), jnp.ones(2, jnp.float16)
  assert numerics.dot_precision(bf, bf) == jax.lax.Precision.DEFAULT
  assert numerics.dot_precision(f16, f16) == jax.lax.Precision.DEFAULT
  assert numerics.dot_precision(f32, f32) is None  # the setting in force
  assert numerics.dot_precision(bf, f32) is None  # mixed: promoted to float32, so the setting applies


def _dot_precisions(dtype):
  """The precision of every dot in the lowered forward of the tiny model with `dtype` params, at 'float32'."""
  cfg = SHAPES["tiny"]
  params = random_params(cfg, 0, dtype)
  tokens = jnp.zeros((1, 8), jnp.int32)
  with numerics.precision("float32"):
    text = jax.jit(lambda p, t: M.forward(p, t, cfg).logits).lower(params, tokens).as_text()
  dots = [line for line in text.splitlines() if "dot_general" in line]
  assert dots, "no dot in the lowered forward"
  return {m for line in dots for m in re.findall(r"precision = \[(\w+), \w+\]", line) or ["none"]}


def test_forward_dots_bfloat16_default_float32_highest():
  """A bfloat16 model's dots run at DEFAULT (exact products, float32 sums: what 'float32' asks, without XLA's
  float32 copy of the weights); a float32 model's at HIGHEST (true float32, not TF32)."""
  assert _dot_precisions(jnp.bfloat16) == {"DEFAULT"}
  assert _dot_precisions(jnp.float32) == {"HIGHEST"}


def test_bfloat16_forward_equals_the_highest_precision_forward(monkeypatch):
  """bfloat16 params: the logits with DEFAULT dots equal those with every dot at HIGHEST (what the model ran
  before the rule) within a bfloat16 ulp of the logits: the products are exact either way and only the
  order of the float32 sums may differ."""
  cfg = SHAPES["tiny"]
  params = random_params(cfg, 1, jnp.bfloat16)
  tokens = jnp.arange(16, dtype=jnp.int32)[None] % cfg.vocab_size
  run = lambda: np.asarray(jax.jit(lambda p, t: M.forward(p, t, cfg).logits)(params, tokens), np.float32)
  with numerics.precision("float32"):
    got = run()
    monkeypatch.setattr(numerics, "dot_precision", lambda *a: None)  # every dot at the setting: HIGHEST
    want = run()
  if jax.default_backend() == "cpu":  # XLA's CPU dot sums in the same order: bit for bit
    np.testing.assert_array_equal(got, want)
  assert np.max(np.abs(got - want)) <= 2.0**-7 * np.max(np.abs(want)), np.max(np.abs(got - want))

"""Flags every script shares, and `setup()`, the first call of every script's `main`.

  --precision  matmul precision (`wina_jax.numerics`): float32 (default: true float32, also on a GPU), tf32,
               bfloat16. Every result a script writes records it (`numerics.describe`).
  --topk_impl  top-k selection (`wina_jax.sparsity.select`); masks are identical, speed differs.

A flag defined here exists once per process, however many scripts a test imports.
"""

from __future__ import annotations

from absl import flags

from wina_jax import numerics
from wina_jax.sparsity import select

PRECISION = flags.DEFINE_enum(
  "precision",
  numerics.DEFAULT,
  sorted(numerics.PRECISIONS),
  "Matmul precision: float32 = true float32 (on a GPU too, where JAX's default is TF32), tf32, bfloat16.",
)

TOPK_IMPL = flags.DEFINE_string(
  "topk_impl",
  "",
  "Top-k selection (wina_jax.sparsity.select): radix[:fanout] | sort | '' = by backend. Masks are "
  "identical; only speed differs.",
)


def setup() -> dict:
  """Apply the shared flags (precision and top-k impl for every later trace) -> `numerics.describe()`."""
  numerics.set_precision(PRECISION.value)
  select.set_default_impl(TOPK_IMPL.value or None)
  return {**numerics.describe(), "topk_impl": select.default_impl()}

"""Flags every script shares, and `setup()`, the first call of every script's `main`.

  --precision  matmul precision (`wina_jax.numerics`): float32 (default: true float32, also on a GPU), tf32,
               bfloat16. Every result a script writes records it (`numerics.describe`).

A flag defined here exists once per process, however many scripts a test imports.
"""

from __future__ import annotations

from absl import flags

from wina_jax import numerics

PRECISION = flags.DEFINE_enum(
  "precision",
  numerics.DEFAULT,
  sorted(numerics.PRECISIONS),
  "Matmul precision: float32 = true float32 (on a GPU too, where JAX's default is TF32), tf32, bfloat16.",
)


def setup() -> dict:
  """Apply the shared flags (the precision for every later trace) -> `numerics.describe()` to record."""
  numerics.set_precision(PRECISION.value)
  return numerics.describe()

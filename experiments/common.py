"""Flags every script shares, and `setup()`, the first call of every script's `main`.

  --precision  matmul precision (`wina_jax.numerics`): float32 (default: true float32, also on a GPU), tf32,
               bfloat16. Every result a script writes records it (`numerics.describe`).
  --methods_module  a module that registers sparsification methods (`@wina_jax.sparsity.register`),
               imported before any method name is resolved; repeat for several, e.g.
               `PYTHONPATH=.:path/to/mine python -m experiments.quality.sweep --methods_module=my_pkg.mine
               --methods=dense,mine` (installed packages' entry points need no flag: `sparsity.plugins`).

A flag defined here exists once per process, however many scripts a test imports.
"""

from __future__ import annotations

from absl import flags

from wina_jax import numerics
from wina_jax.sparsity.registry import load_modules

PRECISION = flags.DEFINE_enum(
  "precision",
  numerics.DEFAULT,
  sorted(numerics.PRECISIONS),
  "Matmul precision: float32 = true float32 (on a GPU too, where JAX's default is TF32), tf32, bfloat16.",
)

METHODS_MODULE = flags.DEFINE_multi_string(
  "methods_module",
  [],
  "Module registering sparsification methods (@wina_jax.sparsity.register), imported before method names "
  "are resolved; repeatable. It must be importable: on PYTHONPATH or installed.",
)


def setup() -> dict:
  """Apply the shared flags (the precision for every later trace; import every --methods_module, printing
  the methods each registered) -> `numerics.describe()` to record."""
  numerics.set_precision(PRECISION.value)
  for module, names in load_modules(METHODS_MODULE.value).items():
    print(f"--methods_module={module}: registered {names or 'nothing new (already imported)'}")
  return numerics.describe()

"""Flags every script shares, and `setup()`, the first call of every script's `main`.

  --precision  matmul precision (`wina_jax.numerics`): float32 (default: true float32, also on a GPU), tf32,
               bfloat16. Every result a script writes records it (`numerics.describe`).
  --topk_impl  top-k selection (`wina_jax.sparsity.select`); masks are identical, speed differs.
  --methods_module  a module that registers sparsification methods (`@wina_jax.sparsity.register`),
               imported before any method name is resolved; repeat for several, e.g.
               `PYTHONPATH=.:path/to/mine python -m experiments.quality.sweep --methods_module=my_pkg.mine
               --methods=dense,mine` (installed packages' entry points need no flag: `sparsity.plugins`).

A flag defined here exists once per process, however many scripts a test imports.
"""

from __future__ import annotations

from absl import flags

from wina_jax import numerics
from wina_jax.sparsity import select
from wina_jax.sparsity.registry import load_modules

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

METHODS_MODULE = flags.DEFINE_multi_string(
  "methods_module",
  [],
  "Module registering sparsification methods (@wina_jax.sparsity.register), imported before method names "
  "are resolved; repeatable. It must be importable: on PYTHONPATH or installed.",
)


def setup() -> dict:
  """Apply the shared flags (precision and top-k impl for every later trace; import every --methods_module,
  printing the methods each registered) -> what to record: `numerics.describe()` and the top-k impl."""
  numerics.set_precision(PRECISION.value)
  select.set_default_impl(TOPK_IMPL.value or None)
  for module, names in load_modules(METHODS_MODULE.value).items():
    print(f"--methods_module={module}: registered {names or 'nothing new (already imported)'}")
  return {**numerics.describe(), "topk_impl": select.default_impl()}

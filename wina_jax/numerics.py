"""Declared numerics: the matmul precision every result runs and records.

On a GPU, JAX runs float32 matmuls as TF32 unless told otherwise (~1e-3 relative rounding, four orders above
a float32 ulp). The library therefore never leaves the precision implied: every model entry point traces its
matmuls inside `scope()`, which applies JAX's `jax_default_matmul_precision` when the user set one
(`set_precision`, `precision(...)`, or JAX's own config) and true float32 ('highest') when nobody did.
Because the setting is JAX's config, it is part of every jit cache key: changing it retraces.

Named settings (`PRECISIONS`):
  float32   every product and sum in float32 (JAX 'highest'); the default.
  tf32      TF32 products (10-bit mantissa inputs), float32 sums (JAX 'tensorfloat32'); the GPU's default.
  bfloat16  inputs rounded to bfloat16, float32 sums (JAX's dot algorithm 'BF16_BF16_F32').
On a CPU every setting computes float32 products (measured: XLA's CPU dot ignores the TF32 / bf16 requests
for float32 inputs): `describe` says so in the record. Operands that are both bfloat16 (or both float16)
compute the same numbers at every setting (their products are exact in float32, and XLA sums them in
float32), so the model's dots (`matmul`, `einsum`) give them JAX's default precision: 'highest' would make
XLA convert the weights to float32 first (measured on the H200, XLA dense decode of the Llama-3-8B shape in
bfloat16: 5.79 ms a step at 'highest', 4.17 ms with bfloat16 products). JAX's 'default' / 'bfloat16' precision is not
offered: on a GPU it means TF32 for float32 inputs, which is what 'tf32' names.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

# operand dtypes whose products are exact in float32
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
PRECISIONS = {"float32": "highest", "tf32": "tensorfloat32", "bfloat16": "BF16_BF16_F32"}
DEFAULT = "float32"
_JAX_NAMES = {
  "highest": "float32",
  "float32": "float32",
  "tensorfloat32": "tf32",
  "high": "tf32",
  "bf16_bf16_f32": "bfloat16",
  "f32_f32_f32": "float32",
}


def check(name: str) -> str:
  """A named precision, or a ValueError that lists the names."""
  if name not in PRECISIONS:
    raise ValueError(f"unknown matmul precision {name!r}; choose from {sorted(PRECISIONS)}")
  return name


def current() -> str:
  """The precision in force: JAX's `jax_default_matmul_precision` by name, else the library default."""
  jax_name = jax.config.jax_default_matmul_precision
  if jax_name is None:
    return DEFAULT
  name = _JAX_NAMES.get(str(jax_name).lower())
  if name is None:
    raise ValueError(
      f"jax_default_matmul_precision={jax_name!r} has no name here; use one of {sorted(PRECISIONS)} "
      "through wina_jax.numerics.set_precision"
    )
  return name


def set_precision(name: str) -> None:
  """Set the process-wide precision (JAX's config, so jitted functions retrace)."""
  jax.config.update("jax_default_matmul_precision", PRECISIONS[check(name)])


@contextlib.contextmanager
def precision(name: str):
  """Run a block at precision `name` (traces inside it use it; the jit cache keys on it)."""
  with jax.default_matmul_precision(PRECISIONS[check(name)]):
    yield


def scope():
  """The context every model entry point traces its matmuls in: `current()`'s JAX precision."""
  return jax.default_matmul_precision(PRECISIONS[current()])


def describe(dtype=None) -> dict:
  """What a result records: {'precision', 'matmul' (JAX's name), 'backend', 'dtype'?, 'note'?}."""
  name = current()
  out = {"precision": name, "matmul": PRECISIONS[name], "backend": jax.default_backend()}
  if dtype is not None:
    out["dtype"] = jax.numpy.dtype(dtype).name
  if jax.default_backend() == "cpu" and name != "float32":
    out["note"] = f"{name} requested; the CPU computes float32 products"
  if dtype is not None and jnp.dtype(dtype) in _HALF:
    half = f"{jnp.dtype(dtype).name} operands: exact products, float32 sums (JAX's default precision)"
    out["note"] = f"{out['note']}; {half}" if "note" in out else half
  return out


def dot_precision(*operands) -> jax.lax.Precision | None:
  """The precision of a dot of `operands`: JAX's DEFAULT when all are the same 16-bit float (every named
  setting computes exact products and float32 sums for them), else None (the setting in force)."""
  dtypes = {jnp.dtype(x.dtype) for x in operands}
  return jax.lax.Precision.DEFAULT if len(dtypes) == 1 and dtypes <= set(_HALF) else None


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  """a @ b at the declared precision (`dot_precision`)."""
  return jnp.matmul(a, b, precision=dot_precision(a, b))


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """jnp.einsum(spec, a, b) at the declared precision (`dot_precision`)."""
  return jnp.einsum(spec, a, b, precision=dot_precision(a, b))

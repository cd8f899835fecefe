"""What a lowered Pallas Mosaic GPU call holds, read from its StableHLO text (for CPU tests of GPU kernels)."""

import re


def scratch_operand(hlo: str) -> str:
  """The type of the last operand of the one Mosaic GPU custom call in hlo: the zero-initialised global scratch
  Pallas appends (its grid-wide semaphores), e.g. 'tensor<1xi32>' for one semaphore shared by the grid."""
  (types,) = re.findall(r"custom_call @mosaic_gpu_v2\(.*?\) \{.*\} : \(([^)]*)\) ->", hlo)
  return types.split(", ")[-1]


def mosaic_modules(fn, *args) -> list:
  """The Mosaic GPU modules (MLIR text, as Mosaic serializes them) of jitted fn(*args) lowered for CUDA."""
  import jax
  from jax.experimental.mosaic.gpu import core

  found, serde = [], core._run_serde_pass

  def grab(module, *a, **k):
    found.append(str(module))
    return serde(module, *a, **k)

  core._run_serde_pass = grab
  jax.clear_caches()  # a kernel lowered before (its jit's cache) would not pass through the pass again
  try:
    fn.trace(*args).lower(lowering_platforms=("cuda",))
  finally:
    core._run_serde_pass = serde
  return found

"""What a lowered Pallas Mosaic GPU call holds, read from its StableHLO text (for CPU tests of GPU kernels)."""

import re


def scratch_operand(hlo: str) -> str:
  """The type of the last operand of the one Mosaic GPU custom call in hlo: the zero-initialised global scratch
  Pallas appends (its grid-wide semaphores), e.g. 'tensor<1xi32>' for one semaphore shared by the grid."""
  (types,) = re.findall(r"custom_call @mosaic_gpu_v2\(.*?\) \{.*\} : \(([^)]*)\) ->", hlo)
  return types.split(", ")[-1]

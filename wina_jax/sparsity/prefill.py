"""Prefill policy: which prompt positions run dense. Decode tokens are always sparse.

Policies: 'all' (every token sparse), 'last_fraction:F' (only the last F of the sequence sparse; TEAL
and WINA evaluate with 'last_fraction:0.99'), 'dense_prefix:N' (the first N positions dense).
"""

from __future__ import annotations

import math
from typing import Optional

POLICIES = ("all", "last_fraction:F", "dense_prefix:N")


def resolve_prefill(policy: str, seq_len: int) -> Optional[int]:
  """`forward(..., dense_prefix=...)` for a policy over sequences of `seq_len` tokens (None = all sparse)."""
  kind, _, arg = policy.partition(":")
  try:
    if kind == "all" and not arg:
      return None
    if kind == "last_fraction":
      f = float(arg)
      if not 0.0 < f <= 1.0:
        raise ValueError
      return int(seq_len - math.floor(f * seq_len))
    if kind == "dense_prefix":
      n = int(arg)
      if n < 0:
        raise ValueError
      return n
  except ValueError:
    pass
  raise ValueError(
    f"prefill policy {policy!r} is not understood; use one of {POLICIES} "
    "with 0 < F <= 1 and N >= 0, e.g. 'last_fraction:0.99'"
  )

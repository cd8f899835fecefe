"""What the kernels in a PTX text do at their grid dependency: whether each waits on the kernels ahead of it
(griddepcontrol.wait, which a kernel launched with programmatic dependent launch must run before it reads their
outputs) and whether it lets the kernel after it launch early (griddepcontrol.launch_dependents). XLA inserts
the wait at the entry of the kernels it launches with PDL (`--xla_gpu_enable_pdl`, Hopper and later), so the
PTX of a dumped module says which kernels of a step take part (issue 25)."""

from __future__ import annotations

import re

_ENTRY = re.compile(r"^\s*(?:\.visible\s+)?\.entry\s+([\w$.]+)\s*\(", re.MULTILINE)


def grid_dependency(ptx: str) -> dict:
  """{kernel name: {'wait': bool, 'launch_dependents': bool}} for every `.entry` in ptx (a kernel's body runs to
  the next entry)."""
  entries = list(_ENTRY.finditer(ptx))
  out = {}
  for i, e in enumerate(entries):
    body = ptx[e.end() : entries[i + 1].start() if i + 1 < len(entries) else len(ptx)]
    out[e.group(1)] = {
      "wait": "griddepcontrol.wait" in body,
      "launch_dependents": "griddepcontrol.launch_dependents" in body,
    }
  return out

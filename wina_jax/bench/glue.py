"""What a traced step runs outside its kernels: the jaxpr's primitives, kernel calls counted as kernels and not
entered, free ops (reshapes, broadcasts, converts, call wrappers) left out. A CPU-side proxy for the XLA glue
(fusions) a GPU profile shows between the kernels (`trace.summarize`): each op here is fused into some XLA
kernel, and ops that depend only on the config (RoPE's frequencies) fold to constants. Compare step variants
by these counts, not by XLA's kernels, which only a GPU compile gives.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import jax
from jax.extend import core as jcore

KERNELS = ("pallas_call", "mpmd_map")  # Pallas' Triton calls and its Mosaic GPU kernels
FREE = (
  "reshape",
  "broadcast_in_dim",
  "squeeze",
  "expand_dims",
  "iota",
  "convert_element_type",
  "jit",
  "pjit",
  "closed_call",
  "custom_vmap_call",
  "custom_jvp_call",
)


def glue_ops(fn: Callable, *args) -> collections.Counter:
  """Primitive name -> equations of jax.make_jaxpr(fn)(*args) outside kernels (nested calls entered once per
  call site, kernels not entered), free ops left out; 'KERNEL': the kernel calls."""
  out = collections.Counter()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name in KERNELS:
        out["KERNEL"] += 1
        continue
      if name not in FREE:
        out[name] += 1
      for v in eqn.params.values():
        if isinstance(v, jcore.ClosedJaxpr):
          walk(v.jaxpr)
        elif isinstance(v, jcore.Jaxpr):
          walk(v)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return out

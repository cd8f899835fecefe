"""Device kernels of a traced run, read back from a JAX profiler trace (`jax.profiler.ProfileData`), and
their per-step summary: kernels launched, busy time, span, and time by kernel category. No flags.

Used by `profile_decode` and `decode_overhead`; it needs no Nsight tools (Nsight Compute hung on XLA
programs on the H200: benchmarks/results/decode_h200.md).
"""

from __future__ import annotations

import collections
import glob
import os
import tempfile
from collections.abc import Callable

import jax

CATEGORIES = (
  ("persistent", ("persistent_",)),  # the persistent layer kernel (persistent_<phase> when split)
  ("sparse_gemv", ("sparse_gemv",)),
  ("mosaic_gemv", ("mosaic_",)),  # wina_jax.kernels.mosaic_gemv (mosaic_<kernel>_partials)
  ("attention", ("decode_attention",)),
  ("matmul", ("gemm", "gemv", "cublas", "cutlass", "xmma", "dot")),
  ("copy", ("memcpy", "memset", "copy")),
  ("fusion", ("fusion", "loop_", "input_", "wrapped_")),
)


def category(name: str) -> str:
  low = name.lower()
  return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")


def kernel_events(xspace_path: str) -> list[tuple[str, float, float]]:
  """(name, start_ns, duration_ns) of every device kernel in a trace; on a host without a device
  plane, the XLA ops of the host's XLA threads instead (CPU smoke runs)."""
  pd = jax.profiler.ProfileData.from_file(xspace_path)
  device = [p for p in pd.planes if p.name.startswith("/device:")]
  out = []
  for plane in device:
    for line in plane.lines:
      if "stream" in line.name.lower():
        out += [(e.name, e.start_ns, e.duration_ns) for e in line.events]
  if device:
    return out
  for plane in pd.planes:
    if plane.name == "/host:CPU":
      for line in plane.lines:
        if line.name.startswith("tf_XLA"):
          out += [
            (e.name, e.start_ns, e.duration_ns)
            for e in line.events
            if not e.name.startswith("ThreadpoolListener")
          ]
  return out


def summarize(events, steps: int, top: int) -> dict:
  """Per-step figures (ms, counts) of kernel events from one run of `steps` decode steps."""
  if not events:
    return {"kernels_per_step": 0}
  spans = sorted((s, s + d) for _, s, d in events)
  busy, cur_s, cur_e = 0.0, *spans[0]
  for s, e in spans[1:]:
    if s > cur_e:
      busy, cur_s, cur_e = busy + cur_e - cur_s, s, e
    else:
      cur_e = max(cur_e, e)
  busy += cur_e - cur_s
  span = max(e for _, e in spans) - spans[0][0]
  per_cat, per_name = collections.defaultdict(lambda: [0, 0.0]), collections.defaultdict(lambda: [0, 0.0])
  for name, _, d in events:
    for table, key in ((per_cat, category(name)), (per_name, name)):
      table[key][0] += 1
      table[key][1] += d
  ms = lambda ns: ns / steps / 1e6
  return {
    "kernels_per_step": len(events) / steps,
    "busy_ms": ms(busy),
    "span_ms": ms(span),
    "gap_ms": ms(span - busy),
    "categories": {
      c: {"per_step": n / steps, "ms": ms(t)}
      for c, (n, t) in sorted(per_cat.items(), key=lambda kv: -kv[1][1])
    },
    "top_kernels": [
      {"name": k[:120], "per_step": n / steps, "ms": ms(t), "us_each": t / n / 1e3}
      for k, (n, t) in sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]
    ],
  }


def trace_events(fn: Callable[[], object]) -> list[tuple[str, float, float]]:
  """Runs fn() under the JAX profiler (call it once before, to compile) -> its `kernel_events`."""
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      jax.block_until_ready(fn())
    return kernel_events(glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0])

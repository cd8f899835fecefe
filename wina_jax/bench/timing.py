"""Timing on an accelerator: seconds per call with dispatch hidden, and the fixed + per-byte fit of a kernel."""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np


def timed(fn, *args, n=40, reps=5) -> float:
  """Seconds per call: n calls dispatched back to back (host overhead hidden), median of `reps`, after
  n untimed calls (the GPU's clocks settle under sustained load)."""
  jax.block_until_ready([fn(*args) for _ in range(n)])
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(n)]
    jax.block_until_ready(outs)
    ts.append((time.perf_counter() - t0) / n)
  return statistics.median(ts)


def fixed_cost_fit(points, nbytes) -> dict:
  """Least-squares us = fixed + kept_bytes / bandwidth over (sparsity, us) points (kept = 1 - sparsity)."""
  kept = np.array([(1 - s) * nbytes for s, _ in points])
  us = np.array([u for _, u in points])
  slope, fixed = np.polyfit(kept, us, 1)
  return {
    "fixed_us": float(fixed),
    "marginal_gb_per_s": float(1e-3 / slope) if slope > 0 else None,
    "points": points,
  }


def run_record(declared: dict) -> dict:
  """The head of a benchmark's JSON: when, which jax and device, and the declared numerics."""
  return {
    "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    "jax": jax.__version__,
    "device": str(jax.devices()[0].device_kind),
    "declared_numerics": declared,
  }

"""Timing on an accelerator: seconds per call with dispatch hidden, and the fixed + per-byte fit of a kernel."""

from __future__ import annotations

import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from wina_jax.kernels.mosaic_sync import pdl_launches


def timed(fn, *args, n=40, reps=5) -> float:
  """Seconds per call: n calls dispatched back to back, median of `reps`, after n untimed calls (the GPU's
  clocks settle under sustained load). Host overhead is hidden only while a call's GPU work outlasts its
  dispatch (~50-60 us a jitted call on the H200 machine): below that this times the host; `timed_chain`
  does not."""
  jax.block_until_ready([fn(*args) for _ in range(n)])
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(n)]
    jax.block_until_ready(outs)
    ts.append((time.perf_counter() - t0) / n)
  return statistics.median(ts)


def timed_chain(fn, x, *rest, n=16, reps=5) -> float:
  """Seconds per call of fn(x, *rest) run n times in a row inside one jitted, unrolled scan (one dispatch per
  n calls, as a decode step runs its kernels; `chained`: each call depends on the previous one's output, so
  none is merged, dropped or reordered, and every call sees the same x). Median of `chain_times`."""
  return statistics.median(chain_times(fn, x, *rest, n=n, reps=reps))


def chain_of(fn, n: int):
  """The jitted chain of n calls of fn (`chained`) that `chain_times` runs; pass it there to also run the same
  compiled chain elsewhere (a profile of it) without compiling it again."""
  return jax.jit(functools.partial(chained, fn, n=n))


def chain_times(fn, x, *rest, n=16, reps=5, chain=None) -> list:
  """`timed_chain`'s `reps` runs, each in seconds per call, after one untimed run (the compile). Their spread
  is the band of one measurement: on the H200 machine the median of 5 runs of 16 calls moved 2x between device
  calls (session 22), so report min and max beside it. chain: `chain_of(fn, n)` made by the caller."""
  chain = chain_of(fn, n) if chain is None else chain
  jax.block_until_ready(chain(x, *rest))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(chain(x, *rest))
    ts.append((time.perf_counter() - t0) / n)
  return ts


def chained(fn, x, *rest, n: int):
  """fn(x, *rest) n times in a row (`timed_chain`'s jitted body) -> x after the last call. Each call's x is
  the previous x, selected on whether the previous output's first element is NaN (never, for a finite
  output): a data dependency XLA cannot fold, so no call is merged, dropped or reordered. It costs one small
  fused select a call (`timed_chain` of an identity measures it)."""

  def body(x, _):
    first = jax.tree.leaves(fn(x, *rest))[0].ravel()[0]
    return jnp.where(jnp.isnan(first), jnp.zeros_like(x), x), None

  return jax.lax.scan(body, x, None, length=n, unroll=True)[0]


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
  """The head of a benchmark's JSON: when, which jax and device, the declared numerics, the XLA flags the run
  had (`XLA_FLAGS`: e.g. PDL or command buffers off) and whether this jax launches Mosaic kernels that ask for
  it with programmatic dependent launch (`mosaic_sync.pdl_launches`)."""
  return {
    "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    "jax": jax.__version__,
    "device": str(jax.devices()[0].device_kind),
    "declared_numerics": declared,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "mosaic_pdl_launch": pdl_launches(),
  }


PHASES = (
  "compact",
  "tiles",
  "store",
  "next",
)  # between clock marks 0-1, 1-2, 2-3, and 3 to the next item's 0


def clock_phases(marks: np.ndarray, items: np.ndarray) -> dict:
  """A kernel's own clock marks -> where its time went, in microseconds.

  marks: int32 [P, J, 4], the low 32 bits of a nanosecond clock per program and work item, at the item's
  start, after its compaction, after its last tile and after its store (`mosaic_gemv.fused_partials(marks=True)`);
  items: [P], how many of the J rows each program wrote. Differences are taken modulo 2**32, so a wrap of the
  clock between marks does not matter. Returns the span (first start to last end), per phase the median item
  and the median and largest per-program total, and the median program's busy time (its first start to its
  last end)."""
  m = marks.astype(np.int64)
  start = m[:, :1, :1]
  rel = (m - start) % (1 << 32)  # ns from each program's first mark
  signed = (start[:, 0, 0] - m[0, 0, 0] + (1 << 31)) % (1 << 32) - (1 << 31)  # programs start within 2 s
  offset = signed - signed.min()  # each program's first mark from the earliest
  valid = np.arange(m.shape[1])[None, :] < np.asarray(items)[:, None]  # [P, J]
  nxt = np.concatenate([rel[:, 1:, 0] - rel[:, :-1, 3], np.zeros((m.shape[0], 1), np.int64)], axis=1)
  per = {
    "compact": rel[..., 1] - rel[..., 0],
    "tiles": rel[..., 2] - rel[..., 1],
    "store": rel[..., 3] - rel[..., 2],
    "next": np.where(np.arange(m.shape[1])[None, :] + 1 < np.asarray(items)[:, None], nxt, 0),
  }
  last = np.array([rel[p, n - 1, 3] if n else 0 for p, n in enumerate(items)])
  out = {"span_us": float((offset + last).max() / 1e3), "program_busy_us": float(np.median(last) / 1e3)}
  for name in PHASES:
    v = np.where(valid, per[name], 0)
    totals = v.sum(axis=1)[np.asarray(items) > 0]
    out[name] = {
      "item_median_us": float(np.median(v[valid]) / 1e3) if valid.any() else 0.0,
      "program_median_us": float(np.median(totals) / 1e3) if totals.size else 0.0,
      "program_max_us": float(totals.max() / 1e3) if totals.size else 0.0,
    }
  return out


def clock_waits(marks: np.ndarray) -> dict:
  """A launch of grid-wide waits' own clock marks -> per-wait costs in microseconds.

  marks: int32 [P, W, 2], the low 32 bits of a nanosecond clock per program and wait, at its arrival and at its
  release (`mosaic_sync.exchange`). Times are taken from program 0's first arrival, modulo 2**32 and signed (a
  launch lasts well under 2 s). Returns the median over programs and waits of the time from the wait's last
  arrival to this program's release ('release_us': the wait's own latency) and, for W > 1, of the time from
  one release to the next ('per_wait_us': an empty phase)."""
  t = marks.astype(np.int64)
  t = (t - t[0, 0, 0] + (1 << 31)) % (1 << 32) - (1 << 31)
  out = {"release_us": float(np.median(t[:, :, 1] - t[:, :, 0].max(axis=0)[None]) / 1e3)}
  if t.shape[1] > 1:
    out["per_wait_us"] = float(np.median(np.diff(t[:, :, 1], axis=1)) / 1e3)
  return out

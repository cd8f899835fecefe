"""What one grid-wide wait of the persistent layer kernel costs: launches of empty phases.

A Pallas kernel of P programs runs W waits (`grid_sync.grid_wait`) and nothing else, then leaves
(`grid_leave`, which resets the counter); each launch reads the previous one's output, so N launches run in
order inside one jitted loop. Per wait: (time per launch at W waits - at 0 waits) / W. Also checks that the
counter is zero after the launches (the reset works, no wait given up) and that every program ran.

--backend=mosaic times the Mosaic GPU wait (`mosaic_sync.grid_wait`, semaphore zeroed by Pallas at each
launch) from the kernel's own clock instead: one launch of W waits (`mosaic_sync.exchange`, which also checks
that each program reads its neighbour's value of every phase); per wait, the median over programs of the
time from one wait's release to the next's (an empty phase), and of the time from the phase's last arrival to
this program's release (the wait's own latency); and the launch's wall time (dispatch included).

GPU:  PYTHONPATH=. python3 -m experiments.decode.wait_cost --out=$OUT/wait_cost.json
      PYTHONPATH=. python3 -m experiments.decode.wait_cost --backend=mosaic --waits=2,6,64 --out=$OUT/wait_mosaic.json
"""

from __future__ import annotations

import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from experiments import common
from wina_jax import checks
from wina_jax.bench.timing import clock_waits
from wina_jax.kernels import grid_sync, mosaic_sync
from wina_jax.kernels import persistent_config as PC
from wina_jax.kernels.pallas_gemv import compiler_params

common.check(
  flags.DEFINE_list(
    "waits", ["0", "1", "6", "64"], "waits per launch to time (0: the launch alone, the baseline)"
  ),
  checks.each(checks.count(0), int),
)
common.check(
  flags.DEFINE_list("grids", [], "programs per launch (empty: the SM count and half of it)"),
  checks.each(checks.count(), int),
)
flags.DEFINE_enum(
  "backend", "triton", ["triton", "mosaic"], "whose grid-wide wait: grid_sync's or mosaic_sync's"
)
common.check(flags.DEFINE_integer("launches", 200, "launches per timed loop"), checks.count())
common.check(flags.DEFINE_integer("reps", 5, "timed loops (median)"), checks.count())
common.check(flags.DEFINE_string("out", "", "write results JSON here"), checks.out_path())
FLAGS = flags.FLAGS


def _kernel(counter_ref, tick_ref, out_ref, *, waits: int, programs: int):
  spins = jnp.int32(grid_sync.SPIN_LIMIT)
  for k in range(1, waits + 1):
    _, _, spins = grid_sync.grid_wait(counter_ref, k, programs, True, spins)
  if waits:
    grid_sync.grid_leave(counter_ref, programs, True)
  pid = pl.program_id(0)
  plgpu.store(out_ref.at[pid], plgpu.load(tick_ref.at[pid]) + 1)


@functools.partial(jax.jit, static_argnames=("waits", "programs", "launches"))
def empty_phases(counter, tick, *, waits: int, programs: int, launches: int):
  """`launches` launches of `waits` empty phases on `programs` programs -> tick + launches [programs]."""
  call = pl.pallas_call(
    functools.partial(_kernel, waits=waits, programs=programs),
    out_shape=jax.ShapeDtypeStruct((programs,), jnp.int32),
    grid=(programs,),
    compiler_params=compiler_params(1, 1),
    name="empty_phases",
  )
  return jax.lax.fori_loop(0, launches, lambda i, t: call(counter, t), tick)


def time_launch(counter, waits, programs) -> float:
  """Median seconds per launch."""
  tick = jnp.zeros((programs,), jnp.int32)
  run = lambda: empty_phases(counter, tick, waits=waits, programs=programs, launches=FLAGS.launches)
  out = jax.block_until_ready(run())  # compile and warm up
  assert bool(jnp.all(out == FLAGS.launches)), "a program did not run every launch"
  ts = []
  for _ in range(FLAGS.reps):
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    ts.append((time.perf_counter() - t0) / FLAGS.launches)
  return statistics.median(ts)


def mosaic_row(programs: int, waits: int) -> dict:
  """One Mosaic launch of `waits` empty phases, repeated --reps times: the clocked per-wait figures (medians)."""
  gaps, latencies, walls = [], [], []
  for rep in range(FLAGS.reps + 1):
    t0 = time.perf_counter()
    seen, gave_up, marks = jax.block_until_ready(mosaic_sync.exchange(programs=programs, waits=waits))
    wall = time.perf_counter() - t0
    mosaic_sync.check_gave_up(gave_up)
    if not np.array_equal(np.asarray(seen), mosaic_sync.expected_seen(programs, waits)):
      raise AssertionError(f"a program read a stale value after a wait ({programs} programs, {waits} waits)")
    if rep == 0:
      continue  # compile and warm-up
    got = clock_waits(np.asarray(marks))
    latencies.append(got["release_us"])
    gaps += [got["per_wait_us"]] if waits > 1 else []
    walls.append(wall * 1e6)
  row = dict(programs=programs, waits=waits, us_per_launch_wall=statistics.median(walls))
  row["us_last_arrival_to_release"] = statistics.median(latencies)
  if gaps:
    row["us_per_wait"] = statistics.median(gaps)
  return row


def triton_rows(grids, sms) -> tuple[list[dict], list[int]]:
  """grid_sync's wait: (per grid and wait count, us per launch and per wait; the counter after all the
  launches, which must be back at zero: the reset works, no wait given up)."""
  counter = grid_sync.new_counter()
  rows = []
  for programs in grids:
    PC.check_grid(programs, sms)
    base = None
    for waits in sorted(int(w) for w in FLAGS.waits):
      secs = time_launch(counter, waits, programs)
      base = secs if waits == 0 else base
      row = dict(programs=programs, waits=waits, us_per_launch=secs * 1e6)
      if waits and base is not None:
        row["us_per_wait"] = (secs - base) * 1e6 / waits
      rows.append(row)
      print(json.dumps(row))
  after = [int(v) for v in counter + 0]
  print("counter after all launches (want [0, 0, 0]):", after)
  return rows, after


def main(argv):
  declared = common.setup(jnp.int32)  # counters only: no matmuls
  del argv
  sms = PC.sm_count()
  grids = [int(g) for g in FLAGS.grids] or [sms, sms // 2]
  rows, after = ([], None) if FLAGS.backend == "mosaic" else triton_rows(grids, sms)
  for programs in grids if FLAGS.backend == "mosaic" else []:
    for waits in sorted(int(w) for w in FLAGS.waits if int(w) > 0):
      rows.append(mosaic_row(programs, waits))
      print(json.dumps(rows[-1]))
  result = {
    "device": str(jax.devices()[0].device_kind),
    "backend": FLAGS.backend,
    "sms": sms,
    "jax": jax.__version__,
    "declared_numerics": declared,
    "rows": rows,
  }
  if after is not None:  # the Mosaic semaphore is zeroed by Pallas at each launch: no counter to check
    result["counter_after"] = after
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)

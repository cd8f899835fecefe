"""Grid-wide synchronisation and the clock inside one Pallas (Triton) launch: the persistent layer kernel's
primitives (`persistent_layer`), timed alone by `experiments.decode.wait_cost`.

The wait (`grid_wait`): every program adds 1 to a global int32 counter and spins until it reads programs x k at
the k-th wait; `grid_leave`: the last program out resets the counter, so one zeroed int32 [3] buffer
(`new_counter`) serves every launch. Programs spinning on programs that cannot become resident deadlock, hence
`persistent_config.check_grid`; should a grid pass it and still not be co-resident, the watchdog ends the hang:
a program gives up after a budget of spins per launch, counts the wait it gave up in the counter's third slot
(which no launch resets), and `check_waits` raises on it. Interpret mode runs programs one after another:
there the waits are compiled out (`active` False) and the clock reads zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# counter slots: arrivals, departures (both reset by the last program to leave), waits given up (the watchdog's)
ARRIVED, LEFT, GAVE_UP = 0, 1, 2
# spins (each one atomic read of the counter, ~0.5-1 us) a program may spend in all the waits of one launch,
# ~30-65 ms: a wait lasts as long as the slowest program's phase (< 0.1 ms measured on the H200), a deadlock
# forever; small enough that a decode step of launches that all end on the watchdog takes seconds, not hours
SPIN_LIMIT = 1 << 16


class WaitTimeout(RuntimeError):
  """A grid-wide wait gave up (`check_waits`): the launch's programs were not all resident at once."""


def _i32(v) -> jax.Array:
  return jnp.asarray(v, jnp.int32)


def new_counter() -> jax.Array:
  """int32 [3] zeros: the waits' counter (arrivals, departures, waits given up), made once and reused."""
  return jnp.zeros((3,), jnp.int32)


def check_waits(counter) -> None:
  """Raises WaitTimeout if a launch since `counter` was made gave up a wait: a grid that was not co-resident
  (its outputs are wrong). Reads the device buffer through a fresh device op (the kernels write it behind
  XLA's back, so a cached host copy would be stale)."""
  gave_up = int(jax.device_get(jnp.asarray(counter)[GAVE_UP]))
  if gave_up:
    raise WaitTimeout(
      f"{gave_up} grid-wide waits gave up after their spin budget (PersistentConfig.spin_limit): the grid's "
      "programs were not all resident at once, so the launches' outputs are wrong. Use fewer programs per SM "
      "(programs_per_sm) or a smaller grid, then a new counter (grid_sync.new_counter)"
    )


def sync_threads(interpret: bool):
  """Orders the program's own stores and loads across its threads (no-op in interpret mode)."""
  if not interpret:
    plgpu.debug_barrier()


def grid_wait(counter_ref, k: int, programs: int, active: bool, spins):
  """The k-th grid-wide wait (k >= 1): arrive, then spin until all `programs` have arrived k times, or until
  this program's spin budget is spent (then the wait is counted as given up, and later waits do not spin).

  counter_ref: int32 [3] (`new_counter`), zero in its first two slots at launch; spins: int32 scalar, the
  budget left (SPIN_LIMIT at the launch's first wait). active False (one program, interpret mode) compiles it
  out: programs then run phases back to back. -> (count at arrival, count at departure, budget left)
  (None, None, spins when compiled out): the counts exist only once the program has arrived / left, for
  `read_clock`."""
  if not active:
    return None, None, spins
  plgpu.debug_barrier()  # every thread's stores are issued before the (acq_rel) arrival
  target = jnp.int32(programs * k)
  seen = plgpu.atomic_add(counter_ref, (_i32(ARRIVED),), jnp.int32(1)) + 1

  def spin(state):
    _, budget = state
    return plgpu.atomic_add(counter_ref, (_i32(ARRIVED),), _i32(0)), budget - 1

  left, spins = jax.lax.while_loop(lambda s: (s[0] < target) & (s[1] > 0), spin, (seen, spins))

  @pl.when(left < target)
  def _():
    plgpu.atomic_add(counter_ref, (_i32(GAVE_UP),), jnp.int32(1))

  plgpu.debug_barrier()
  return seen, left, spins


def grid_leave(counter_ref, programs: int, active: bool):
  """After the last wait: the last program to leave resets arrivals and departures to zero for the next launch
  (a given-up wait stays counted). -> the departures before this one (None when compiled out), for
  `read_clock`."""
  if not active:
    return None
  left = plgpu.atomic_add(counter_ref, (_i32(LEFT),), jnp.int32(1))

  @pl.when(left == programs - 1)
  def _():
    plgpu.atomic_xchg(counter_ref, (_i32(ARRIVED),), _i32(0))
    plgpu.atomic_xchg(counter_ref, (_i32(LEFT),), _i32(0))

  return left


def read_clock(after, interpret: bool) -> jax.Array:
  """[1] int32: the GPU's global nanosecond clock, low 32 bits (PTX %globaltimer_lo), read once `after` (an
  int32 scalar) exists: the dependence keeps the read from moving earlier. Zero in interpret mode."""
  if interpret:
    return jnp.zeros((1,), jnp.int32)
  (t,) = plgpu.elementwise_inline_asm(
    "mov.u32 $0, %globaltimer_lo;",
    args=[jnp.full((1,), after, jnp.int32)],
    constraints="=r,r",
    pack=1,
    result_shape_dtypes=[jax.ShapeDtypeStruct((1,), jnp.int32)],
  )
  return t

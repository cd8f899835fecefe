"""Grid-wide synchronisation and the clock inside one Pallas (Triton) launch: the persistent layer kernel's
primitives (`persistent_layer`), timed alone by `experiments.decode.wait_cost`.

The wait (`grid_wait`): every program adds 1 to a global int32 counter and spins until it reads programs x k at
the k-th wait; `grid_leave`: the last program out resets the counter, so one zeroed int32 [2] buffer serves
every launch. Programs spinning on programs that cannot become resident deadlock, hence
`persistent_config.check_grid`. Interpret mode runs programs one after another: there the waits are compiled
out (`active` False) and the clock reads zero.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _i32(v) -> jax.Array:
  return jnp.asarray(v, jnp.int32)


def sync_threads(interpret: bool):
  """Orders the program's own stores and loads across its threads (no-op in interpret mode)."""
  if not interpret:
    plgpu.debug_barrier()


def grid_wait(counter_ref, k: int, programs: int, active: bool):
  """The k-th grid-wide wait (k >= 1): arrive, then spin until all `programs` have arrived k times.

  counter_ref: int32 [2] (arrivals, departures), zero at launch. active False (one program, interpret
  mode) compiles it out: programs then run phases back to back. -> (count at arrival, count at departure)
  (None, None when compiled out): values that exist only once the program has arrived / left, for
  `read_clock`."""
  if not active:
    return None, None
  plgpu.debug_barrier()  # every thread's stores are issued before the (acq_rel) arrival
  target = jnp.int32(programs * k)
  seen = plgpu.atomic_add(counter_ref, (_i32(0),), jnp.int32(1)) + 1
  left = jax.lax.while_loop(
    lambda c: c < target, lambda c: plgpu.atomic_add(counter_ref, (_i32(0),), _i32(0)), seen
  )
  plgpu.debug_barrier()
  return seen, left


def grid_leave(counter_ref, programs: int, active: bool):
  """After the last wait: the last program to leave resets the counter to zero for the next launch. -> the
  departures before this one (None when compiled out), for `read_clock`."""
  if not active:
    return None
  left = plgpu.atomic_add(counter_ref, (_i32(1),), jnp.int32(1))

  @pl.when(left == programs - 1)
  def _():
    plgpu.atomic_xchg(counter_ref, (_i32(0),), _i32(0))
    plgpu.atomic_xchg(counter_ref, (_i32(1),), _i32(0))

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

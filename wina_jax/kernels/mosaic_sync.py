"""Grid-wide waits and the clock inside one Mosaic GPU launch (Pallas' Mosaic GPU backend, warpgroup semantics):
the primitives a persistent layer on Mosaic GPU needs (issue 25), timed alone by `experiments.decode.wait_cost
--backend=mosaic`.

The wait (`grid_wait`): after a warpgroup barrier (`barrier`, unaligned), thread 0 of every program adds 1 to
an int32 semaphore in global memory (`semaphore()`: one for the whole grid, zeroed by Pallas at every launch)
with release semantics at GPU scope, then spins on relaxed loads until it reads programs x k at the k-th wait,
then an acquire fence and the barrier again. Every store a program made before the wait is visible to every
program after it. A program that spins `SPIN_LIMIT` times gives the wait up and counts it in its slot of an
int32 [programs] output (`check_gave_up` raises on any): programs that cannot all be resident at once
(`persistent_config.check_grid` refuses such grids beforehand) end on the watchdog instead of hanging the GPU.

Interpret mode does not run Mosaic GPU kernels; off the GPU these lower only (`tests/test_mosaic_sync.py`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, gpu, llvm, memref, nvvm, scf

from wina_jax.kernels import persistent_config as PC

# relaxed loads of the semaphore (each ~0.5-1 us) a program spends on one wait before giving it up: ~30-65 ms,
# while a wait lasts as long as the slowest program's phase (tens of us)
SPIN_LIMIT = 1 << 16
H100_SMS = 132  # the co-resident limit assumed where the device reports no SM count (off the GPU)
PUBLISHED = 1000  # `exchange`: program p publishes p * PUBLISHED + k before its k-th wait


class WaitGaveUp(RuntimeError):
  """A grid-wide wait of a Mosaic launch gave up (`check_gave_up`): its programs were not all resident."""


def _i32():
  return ir.IntegerType.get_signless(32)


def _c(v: int):
  return mgpu_utils.c(v, _i32())


def _thread0():
  return arith.cmpi(arith.CmpIPredicate.eq, mgpu_utils.thread_idx(), _c(0))


def program():
  """This program's index (i32): the grid is 1-D, one block per program."""
  return arith.index_cast(_i32(), gpu.block_id(gpu.Dimension.x))


def _store_from_thread0(ref, value) -> None:
  """Thread 0 writes value() (an i32 built inside the kernel, by every thread) to ref [1] int32 (global)."""

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
  def put(ctx, out):
    del ctx
    v = value()
    with mgpu_utils.when(_thread0()):
      memref.store(v, out, [mgpu_utils.c(0, ir.IndexType.get())])

  put(ref)


def clock(ref) -> None:
  """Thread 0 writes the GPU's global nanosecond clock (low 32 bits, PTX %globaltimer_lo) to ref [1] int32
  (global); the read is volatile, so it stays where it is in program order."""
  _store_from_thread0(
    ref, lambda: llvm.inline_asm(_i32(), [], "mov.u32 $0, %globaltimer_lo;", "=r", has_side_effects=True)
  )


def clear(ref) -> None:
  """Thread 0 writes 0 to ref [1] int32 (global): a program's own slot of an output, before it counts into it."""
  _store_from_thread0(ref, lambda: _c(0))


def barrier() -> None:
  """The warpgroup's barrier (id 1 + its index, 128 threads, as `mosaic.gpu.utils.warpgroup_barrier`) as PTX's
  unaligned `barrier.sync`: its threads may reach it from different instructions. `bar.sync` is
  `barrier.sync.aligned`, undefined when a warp's threads arrive at different copies of it, and LLVM made such
  copies: it threaded the jump between a `when(thread 0)` store and the wait's `when(thread 0)`, copying the
  barrier between them into both branches (the H200 PTX of session 22), and every such launch hung."""
  llvm.inline_asm(
    ir.Type.parse("!llvm.void"),
    [arith.addi(mgpu_utils.warpgroup_idx(sync=False), _c(1))],
    f"barrier.sync $0, {mgpu_utils.WARPGROUP_SIZE};",
    "r",
    has_side_effects=True,
  )


def commit_shared() -> None:
  """`mosaic.gpu.utils.commit_shared` with the unaligned `barrier`: the warpgroup's shared-memory writes made
  visible to the async proxy (TMA, wgmma) and to every thread, where the barrier follows a `when` block."""
  nvvm.fence_proxy(nvvm.ProxyKind.async_shared, space=nvvm.SharedSpace.shared_cta)
  barrier()


def pdl_launches() -> bool:
  """Whether this jax launches a Mosaic GPU kernel that calls `plgpu.griddepcontrol_wait` with programmatic
  dependent launch (Hopper's PDL, CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION): such a kernel may start
  while the kernel ahead of it in the stream still runs. jax 0.10 lowers the wait but launches every kernel
  plainly (the wait is then a no-op); jax 0.11 launches a kernel that waits with the attribute (the wait's
  effect, a `PdlEffect`). Benchmarks record it beside their rows, so that a 'pdl' row says whether PDL ran."""
  from jax._src.pallas.mosaic_gpu import primitives  # no public name says it

  _, effects = primitives.griddepcontrol_wait_p.abstract_eval()
  return any("pdl" in type(e).__name__.lower() for e in effects)


def grid_dependency(pdl: bool) -> None:
  """A Mosaic launch's first step (`MosaicConfig.pdl`): with pdl, wait until every kernel ahead of this one in
  the stream has ended and its writes show (griddepcontrol.wait), then let the kernel after this one launch
  (griddepcontrol.launch_dependents: it starts once every program of this grid has issued it, so this grid is
  all resident by then, and it waits in turn before it reads what this one writes). Launched early, a kernel
  runs beside the one ahead of it until its wait: nothing before this call may read or write global memory,
  hence it comes first. Meant to hide the launch latency and the kernel boundary's drain; on the H200 it hid
  nothing (decode_h200.md, session 26: an empty launch 3.79 us plain, 4.55 us with PDL, the step's Mosaic rows
  within their band). Without pdl it adds nothing."""
  if pdl:
    plgpu.griddepcontrol_wait()
    plgpu.griddepcontrol_launch_dependents()


def semaphore():
  """The launch's one grid-wide int32 semaphore in global memory, zero at launch; call it once per kernel body
  and pass it to every `grid_wait`. (A semaphore in a kernel's `scratch_types` is per program, not shared: waits on
  it never complete, as the first H200 run of this file showed.)"""
  return pl.get_global(plgpu.SemaphoreType.REGULAR(()))


def grid_wait(sem, gave_up, k: int, programs: int, spin_limit: int = SPIN_LIMIT) -> None:
  """The k-th grid-wide wait (k >= 1) of a launch of `programs` programs. sem: the launch's `semaphore()`, or a
  counter that every launch leaves at zero (`grid_leave`; its arrivals are its first element; with a third
  element, as `grid_sync.new_counter`'s, a given-up wait also counts there, which no launch resets, so that
  `grid_sync.check_waits` raises after the step and no per-launch check is needed);
  gave_up: this program's int32 [1] slot of a global output, zeroed by `clear` before the first wait; it
  counts the waits this program gave up after `spin_limit` loads.
  A program's TMA stores must be complete (`plgpu.wait_smem_to_gmem(0)`) before its wait."""
  if k < 1:
    raise ValueError(f"wait k={k} must be >= 1 (the first wait of a launch is k=1)")

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))
  def wait(ctx, sem_ref, gave_ref):
    del ctx
    i32 = _i32()
    ptr = mgpu_utils.memref_ptr(sem_ref)
    shape = ir.MemRefType(sem_ref.type).shape
    counts_gave_up = (
      len(shape) == 1 and shape[0] >= 3
    )  # a counter (not the scalar semaphore) with its third slot
    target = _c(programs * k)
    # every thread's writes, its TMA stores' too (async proxy, completed by the caller), are ordered before
    # thread 0's release
    llvm.inline_asm(ir.Type.parse("!llvm.void"), [], "fence.proxy.async;", "", has_side_effects=True)
    barrier()
    with mgpu_utils.when(_thread0()):
      llvm.inline_asm(
        ir.Type.parse("!llvm.void"),
        [ptr, _c(1)],
        "red.release.gpu.global.add.u32 [$0], $1;",
        "l,r",
        has_side_effects=True,
      )
      loop = scf.WhileOp([i32, i32], [_c(0), _c(0)])
      before = loop.before.blocks.append(i32, i32)
      with ir.InsertionPoint(before):
        _, spins = before.arguments
        seen = llvm.inline_asm(
          i32, [ptr], "ld.relaxed.gpu.global.u32 $0, [$1];", "=r,l", has_side_effects=True
        )
        short = arith.cmpi(arith.CmpIPredicate.ult, seen, target)
        budget = arith.cmpi(arith.CmpIPredicate.ult, spins, _c(spin_limit))
        scf.condition(arith.andi(short, budget), [seen, spins])
      after = loop.after.blocks.append(i32, i32)
      with ir.InsertionPoint(after):
        seen, spins = after.arguments
        scf.yield_([seen, arith.addi(spins, _c(1))])
      seen = loop.results[0]
      with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.ult, seen, target)):
        index0 = [mgpu_utils.c(0, ir.IndexType.get())]
        memref.store(arith.addi(memref.load(gave_ref, index0), _c(1)), gave_ref, index0)
        if counts_gave_up:
          llvm.inline_asm(
            ir.Type.parse("!llvm.void"),
            [mgpu_utils.getelementptr(ptr, [2], i32), _c(1)],
            "red.relaxed.gpu.global.add.u32 [$0], $1;",
            "l,r",
            has_side_effects=True,
          )
      llvm.inline_asm(ir.Type.parse("!llvm.void"), [], "fence.acquire.gpu;", "", has_side_effects=True)
    barrier()  # every thread leaves after thread 0 saw all programs arrive

  wait(sem, gave_up)


def grid_leave(counter, programs: int) -> None:
  """After a launch's last `grid_wait` on counter (int32 [>= 2], global: arrivals, then departures; e.g.
  `grid_sync.new_counter()`, passed in as an input): thread 0 of every program counts its departure (acq_rel,
  so its spins on the arrivals are done first), and the last to leave sets arrivals and departures back to zero.
  The same buffer then serves the next launch with no zeroing before it (`semaphore()` costs one per launch).
  Every program leaves, a watchdog's given-up waits included, so the counter always ends at zero."""

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
  def leave(ctx, ref):
    del ctx
    i32, index = _i32(), ir.IndexType.get()
    ptr = mgpu_utils.memref_ptr(ref)
    with mgpu_utils.when(_thread0()):
      left_ptr = mgpu_utils.getelementptr(ptr, [1], i32)
      before = llvm.inline_asm(
        i32,
        [left_ptr, _c(1)],
        "atom.acq_rel.gpu.global.add.u32 $0, [$1], $2;",
        "=r,l,r",
        has_side_effects=True,
      )
      with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.eq, before, _c(programs - 1))):
        for slot in (0, 1):
          memref.store(_c(0), ref, [mgpu_utils.c(slot, index)])

  leave(counter)


def _publish(slot, k: int) -> None:
  """Thread 0 writes program * PUBLISHED + k into slot [1] int32 (global)."""
  _store_from_thread0(slot, lambda: arith.addi(arith.muli(program(), _c(PUBLISHED)), _c(k)))


def _collect(slots, seen, k: int, programs: int) -> None:
  """Thread 0 copies the next program's slot k (slots [programs, waits] int32, global) into seen [1]."""

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))
  def get(ctx, src, out):
    del ctx
    index = ir.IndexType.get()
    nxt = arith.remui(arith.addi(program(), _c(1)), _c(programs))
    with mgpu_utils.when(_thread0()):
      got = memref.load(src, [arith.index_cast(index, nxt), mgpu_utils.c(k, index)])
      memref.store(got, out, [mgpu_utils.c(0, index)])

  get(slots, seen)


@functools.partial(jax.jit, static_argnames=("programs", "waits", "spin_limit"))
def exchange(*, programs: int, waits: int, spin_limit: int = SPIN_LIMIT):
  """One launch of `waits` empty phases on `programs` programs (refused by `check_grid` if they cannot all be
  resident), checking the waits' memory order: before its k-th wait program p publishes p * PUBLISHED + k,
  after it reads program (p + 1) % programs's. -> (seen [programs, waits] int32: what each read, expected
  ((p + 1) % programs) * PUBLISHED + k; gave_up [programs] int32: waits given up; clock [programs, waits, 2]
  int32: the global nanosecond clock before each wait's arrival and after its release)."""
  PC.check_grid(programs, PC.sm_count() or H100_SMS)
  width = max(waits, 1)

  def body(slots, seen, gave_up, marks):
    pid = lax.axis_index("sm")
    sem = semaphore()
    clear(gave_up.at[pl.ds(pid, 1)])
    for k in range(waits):
      _publish(slots.at[pid, pl.ds(k, 1)], k)
      clock(marks.at[pid, k, pl.ds(0, 1)])
      grid_wait(sem, gave_up.at[pl.ds(pid, 1)], k + 1, programs, spin_limit)
      clock(marks.at[pid, k, pl.ds(1, 1)])
      _collect(slots, seen.at[pid, pl.ds(k, 1)], k, programs)

  i32 = jnp.int32
  _, seen, gave_up, marks = plgpu.kernel(
    body,
    out_type=(
      jax.ShapeDtypeStruct((programs, width), i32),
      jax.ShapeDtypeStruct((programs, width), i32),
      jax.ShapeDtypeStruct((programs,), i32),
      jax.ShapeDtypeStruct((programs, width, 2), i32),
    ),
    grid=(programs,),
    grid_names=("sm",),
    compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )()
  return seen, gave_up, marks


@functools.partial(jax.jit, static_argnames=("grid", "waits", "expect", "spin_limit"))
def empty_waits(*, grid: int, waits: int, expect: int, spin_limit: int = SPIN_LIMIT):
  """One launch of `grid` programs, each clearing its watchdog slot and making `waits` grid-wide waits that
  count `expect` arrivals (expect > grid: waits that cannot complete, for the watchdog) -> gave_up [grid] int32.
  No stores but the slot's: the wait alone, as `mlp_partials` makes it (`exchange` adds the data it orders)."""
  PC.check_grid(grid, PC.sm_count() or H100_SMS)

  def body(gave_up):
    gave = gave_up.at[pl.ds(lax.axis_index("sm"), 1)]
    sem = semaphore()
    clear(gave)
    for k in range(waits):
      grid_wait(sem, gave, k + 1, expect, spin_limit)

  return plgpu.kernel(
    body,
    out_type=jax.ShapeDtypeStruct((grid,), jnp.int32),
    grid=(grid,),
    grid_names=("sm",),
    compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )()


def expected_seen(programs: int, waits: int) -> np.ndarray:
  """What `exchange` must read: [programs, waits] int32."""
  nxt = (np.arange(programs) + 1) % programs
  return (nxt[:, None] * PUBLISHED + np.arange(waits)[None, :]).astype(np.int32)


def guarded(out: jax.Array, gave_up: jax.Array, counter) -> jax.Array:
  """A launch's output, NaN throughout if one of its waits gave up (gave_up [programs] int32) and no counter
  counts it; with a counter (`grid_wait` counts give-ups in its third slot) out itself, and
  `grid_sync.check_waits` raises after the step, so no XLA op runs after the launch for the check."""
  return out if counter is not None else jnp.where(jnp.any(gave_up > 0), jnp.nan, out)


def check_gave_up(gave_up) -> None:
  """WaitGaveUp if any program of a launch gave up a wait (its outputs are wrong)."""
  gave = np.asarray(gave_up)
  if gave.any():
    raise WaitGaveUp(
      f"{int(gave.sum())} grid-wide waits gave up after {SPIN_LIMIT} spins ({int((gave > 0).sum())} of "
      f"{gave.size} programs): the grid's programs were not all resident at once, so the launch's outputs are "
      "wrong. Use fewer programs (persistent_config.check_grid) or less shared memory per program"
    )

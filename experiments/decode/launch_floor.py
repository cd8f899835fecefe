"""The floor of one launch inside a jitted step on the GPU, per kind of kernel, with no work in it (issue 25).

Session 24's profile put the folded Mosaic launches of the Llama-3-8B step at 6.8-15.3 us busy each at 99.9 %
sparsity, and session 22's clocks put ~2.5-4 us of each outside its programs' work. This measures what any
launch of each kind costs empty, two ways in one run:
  chain_us  per call of --chain dependent calls in one jitted, unrolled scan (`timing.chain_times`: median, min
            and max of --reps runs), each call also paying the chain's select (one XLA fusion);
  over_us   chain_us less the 'select' kernel's (the chain with no launch but its select): the launch's own
            cost in the step, boundary included;
  busy_us   the launch's duration in a profile of one chain (median over its launches; `bench.trace`), and
  gap_us    the median idle time from its end to the next kernel's start.
Kernels (x float32 [programs] -> float32 [programs]; every program writes its slot, zero, so the select keeps
x and the calls stay in order): 'select' (none), 'triton' (Pallas-Triton, one warp: x * 0), 'mosaic' (Pallas
Mosaic GPU, one warpgroup: thread 0 stores 0), 'mosaic:KB' (the same with KB KiB of shared memory reserved,
unused: what a tiled launch's carve-out costs) and 'mosaic+wait' / 'mosaic:KB+wait' (the same making one
grid-wide wait on a counter that the last program out leaves at zero, as the folded site launches do:
`mosaic_sync.grid_wait` / `grid_leave`; its chain time less the plain launch's is a phase boundary's cost inside
a launch, beside a launch boundary's); '+pdl' (after any '+wait') starts the Mosaic kernel with
`mosaic_sync.grid_dependency`, so that where jax launches it with programmatic dependent launch (the JSON's
`mosaic_pdl_launch`) it starts before the select ahead of it ends and lets the select after it start early: its
chain time less the plain kernel's is what PDL saves a boundary (run once more under
XLA_FLAGS=--xla_gpu_enable_pdl=false to see the XLA side's share: the select's own launches). Each at every
--programs (0: the SM count; 1792: the grid of the Triton gate|up kernel's tiling, 112 column blocks x 16
chunks). A '+wait' kernel on more programs than can be resident would only ever give up its wait: its row says
it was refused and why, and nothing runs.

GPU:  PYTHONPATH=. python3 -m experiments.decode.launch_floor --out=$OUT/launch_floor.json
CPU:  PYTHONPATH=. .venv/bin/python -m experiments.decode.launch_floor --programs=2
      (off the GPU each kernel only lowers for CUDA: the plumbing, no times)
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
from absl import app, flags
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import triton as pltriton

from experiments import common
from wina_jax import checks
from wina_jax.bench import trace
from wina_jax.bench.timing import chain_of, chain_times, run_record
from wina_jax.kernels import mosaic_gemv as mg
from wina_jax.kernels import mosaic_sync as ms
from wina_jax.kernels import persistent_config as PC
from wina_jax.kernels.grid_sync import GAVE_UP, new_counter
from wina_jax.kernels.pallas_gemv import compiler_params

SMEM_MAX_KB = 227  # an H100 / H200 block's dynamic shared memory limit


MOSAIC_OPTIONS = ("wait", "pdl")  # a Mosaic kernel's '+' options, in this order


def _parts(value: str) -> tuple[str, str, list]:
  """'mosaic:96+wait+pdl' -> ('mosaic', '96', ['wait', 'pdl'])."""
  head, *options = value.split("+")
  name, _, kb = head.partition(":")
  return name, kb, options


def kernel_rule(value: str) -> str | None:
  """A --kernels entry: select, triton, mosaic[:KB][+wait][+pdl]."""
  name, kb, options = _parts(value)
  if name in ("select", "triton") and not kb and not options:
    return None
  in_order = [o for o in MOSAIC_OPTIONS if o in options]
  if name == "mosaic" and (not kb or kb.isdigit() and 0 < int(kb) <= SMEM_MAX_KB) and options == in_order:
    return None
  return f"is not select, triton or mosaic[:KB][+wait][+pdl] with KB in [1, {SMEM_MAX_KB}]"


common.check(
  flags.DEFINE_list(
    "kernels",
    ["select", "triton", "mosaic", "mosaic+pdl", "mosaic:96", "mosaic:200", "mosaic+wait", "mosaic+wait+pdl"],
    "kernels (doc)",
  ),
  checks.each(kernel_rule, str, nonempty=True),
)
common.check(
  flags.DEFINE_list("programs", ["1", "0", "1792"], "programs per launch (0: the SM count)"),
  checks.each(checks.count(0), int),
)
common.check(flags.DEFINE_integer("chain", 64, "dependent calls per timed chain"), checks.count())
common.check(flags.DEFINE_integer("reps", 7, "timed chains per row"), checks.count())
common.check(flags.DEFINE_string("out", "", "write results JSON here"), checks.out_path())
FLAGS = flags.FLAGS


def _triton(x: jax.Array) -> jax.Array:
  def body(x_ref, o_ref):
    i = pl.program_id(0)
    pltriton.store(o_ref.at[i], pltriton.load(x_ref.at[i]) * 0)

  return pl.pallas_call(
    body,
    out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
    grid=(x.shape[0],),
    compiler_params=compiler_params(1, 1),
    name="launch_floor_triton",
  )(x)


def _mosaic(x: jax.Array, counter, smem_kb: int, pdl: bool) -> jax.Array:
  """counter None: no wait; else int32 [3] (`grid_sync.new_counter`): one grid-wide wait on it, then leave.
  pdl: first `mosaic_sync.grid_dependency`, as a `MosaicConfig(pdl=True)` launch starts."""
  programs = x.shape[0]

  def launch_floor_mosaic(x_ref, *refs, **scratch):  # the kernel's name in profiles
    del x_ref, scratch  # an operand, so that the chain keeps the calls in order
    ms.grid_dependency(pdl)
    slot = refs[-1].at[pl.ds(lax.axis_index("sm"), 1)]
    ms.clear(slot)
    if counter is not None:
      ms.grid_wait(refs[0], slot, 1, programs)
      ms.grid_leave(refs[0], programs)

  out = plgpu.kernel(
    launch_floor_mosaic,
    out_type=jax.ShapeDtypeStruct(x.shape, jnp.int32),
    grid=(x.shape[0],),
    grid_names=("sm",),
    scratch_types={"unused": plgpu.SMEM((smem_kb * 256,), jnp.float32)} if smem_kb else {},
    compiler_params=mg.compiler_params(),  # warpgroup semantics, as every Mosaic launch of the project
  )(x, *([] if counter is None else [counter]))
  return lax.bitcast_convert_type(out, jnp.float32)  # int 0 is float 0.0: no op on the GPU


def launcher(kernel: str):
  """A --kernels entry -> fn(x float32 [programs], counter) -> float32 [programs] of zeros ('select': x itself;
  counter: int32 [3], read by the '+wait' kernels only)."""
  name, kb, options = _parts(kernel)
  if name == "select":
    return lambda x, counter: x
  if name == "triton":
    return lambda x, counter: _triton(x)
  waits = "wait" in options
  return lambda x, counter: _mosaic(x, counter if waits else None, int(kb or 0), "pdl" in options)


def _profiled(chain, x, counter, name_part: str) -> dict:
  """busy_us / gap_us of the launches whose kernel name contains name_part, from one run of `chain` (a compiled
  `timing.chain_of`) under the profiler."""
  events = sorted(trace.trace_events(lambda: chain(x, counter)), key=lambda e: e[1])
  ours = [i for i, e in enumerate(events) if name_part in e[0]]
  gaps = [events[i + 1][1] - events[i][1] - events[i][2] for i in ours if i + 1 < len(events)]
  return {
    "launches_seen": len(ours),
    "busy_us": statistics.median(events[i][2] for i in ours) / 1e3 if ours else None,
    "gap_us": statistics.median(gaps) / 1e3 if gaps else None,
    "kernels_per_call": len(events) / FLAGS.chain,
  }


def row(kernel: str, programs: int, sms: int) -> dict:
  """One kernel at one grid size: its chain time, and where it launches, its profile (and for '+wait', the
  waits given up, which must be none; on more programs than `sms`, 'refused' and why instead)."""
  out = {"kernel": kernel, "programs": programs}
  waits = "wait" in _parts(kernel)[2]
  if waits:
    try:
      PC.check_grid(programs, sms)
    except PC.GridError as e:
      return {**out, "refused": str(e)}
  fn = launcher(kernel)
  x, counter = jnp.ones((programs,), jnp.float32), new_counter()
  if jax.default_backend() != "gpu":
    lowered = jax.jit(fn).trace(x, counter).lower(lowering_platforms=("cuda",)).as_text()
    out["lowered"] = kernel == "select" or "launch_floor" in lowered or "mosaic_gpu" in lowered
    return out
  chain = chain_of(fn, FLAGS.chain)  # compiled once: timed, then profiled
  ts = [t * 1e6 for t in chain_times(fn, x, counter, n=FLAGS.chain, reps=FLAGS.reps, chain=chain)]
  out.update(chain_us=statistics.median(ts), chain_min_us=min(ts), chain_max_us=max(ts))
  if kernel != "select":
    out.update(_profiled(chain, x, counter, "launch_floor"))
  if waits:
    out["waits_gave_up"] = int(jax.device_get(counter)[GAVE_UP])
  return out


def main(argv):
  del argv
  declared = common.setup(jnp.float32)
  sms = PC.sm_count() or ms.H100_SMS
  res = {
    **run_record(declared),
    "command": common.command_line("experiments.decode.launch_floor"),
    "rows": [],
  }
  res["sms"] = sms
  for programs in [int(p) or sms for p in FLAGS.programs]:
    base = None
    for kernel in FLAGS.kernels:
      r = row(kernel, programs, sms)
      if kernel == "select":
        base = r.get("chain_us")
      if "refused" in r:
        line = f"{kernel:15s} programs {programs:4d}  refused: {r['refused']}"
      elif "chain_us" not in r:
        line = f"{kernel:15s} programs {programs:4d}  lowered: {r['lowered']}"
      else:
        if base is not None:
          r["over_us"] = r["chain_us"] - base
        line = f"{kernel:15s} programs {programs:4d}  chain {r['chain_us']:6.2f} us ({r['chain_min_us']:.2f}-"
        line += f"{r['chain_max_us']:.2f})"
        if "over_us" in r:
          line += f"  over select {r['over_us']:6.2f}"
        if r.get("busy_us") is not None:
          line += (
            f"  busy {r['busy_us']:5.2f}  gap {r['gap_us']:5.2f}  kernels/call {r['kernels_per_call']:.2f}"
          )
      common.emit_row(res, r, line, FLAGS.out)


if __name__ == "__main__":
  app.run(main)

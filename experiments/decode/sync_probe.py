"""Where a Mosaic GPU grid-wide wait kernel stops (`wina_jax.kernels.mosaic_sync`): each case in its own child
process under its own time limit, which reports each stage as it reaches it (traced, compiled, ran, checked), so
one that hangs, in compilation or on the GPU, leaves the others' results and its own last stage. Sessions 20-21
saw `exchange` hang on the H200 while the MLP launch's identical wait completed.

Cases: `waits:G:E:W` (`empty_waits`: G programs, W waits each counting E arrivals; E > G is the watchdog's
case), `exchange:P:W` (`exchange`: P programs, W waits, each program reading its neighbour's value after each);
`waits+in`, `waits+smem`, `clear:G` (no wait) and their `+in` / `+smem`: the same kernel with an unread input,
with unused shared memory, or with only the watchdog slot's clear (`variant`), to isolate what hangs.
With --dump, each GPU child asks Mosaic to write its PTX and SASS under OUT_dump/CASE (MOSAIC_GPU_DUMP_*).

GPU:  PYTHONPATH=. python3 -m experiments.decode.sync_probe --dump --out=$OUT/sync_probe.json
CPU:  PYTHONPATH=. .venv/bin/python -m experiments.decode.sync_probe --cases=waits:1:2:1,exchange:2:1
"""

from __future__ import annotations

import faulthandler
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from experiments import common
from wina_jax import checks
from wina_jax.bench.timing import run_record
from wina_jax.kernels import mosaic_sync as ms

DEFAULT_CASES = [
  "waits:1:2:1",
  "waits:2:2:1",
  "waits:132:132:1",
  "exchange:1:1",
  "exchange:2:1",
  "exchange:132:1",
]
CASES = flags.DEFINE_list("cases", DEFAULT_CASES, "cases (module doc)")
common.check(flags.DEFINE_integer("case_s", 25, "seconds a case may take"), checks.count())
flags.DEFINE_bool("dump", False, "on the GPU, have Mosaic dump each case's PTX and SASS beside --out")
flags.DEFINE_string("child", "", "internal: run this one case and print its stages")
common.check(flags.DEFINE_string("out", "", "write results JSON here"), checks.out_path())
FLAGS = flags.FLAGS


def variant(grid: int, expect: int, waits: int, spin: int, extra: set):
  """`empty_waits` with `extra` parts, to find what makes a launch hang: 'in' (an int32 [grid] input it does not
  read), 'smem' (1 KiB of shared memory it does not use); waits 0: the watchdog slot's clear alone."""

  def body(*refs, **scratch):
    del scratch
    gave = refs[-1].at[pl.ds(lax.axis_index("sm"), 1)]
    ms.clear(gave)
    if waits:
      sem = ms.semaphore()
      for k in range(waits):
        ms.grid_wait(sem, gave, k + 1, expect, spin)

  kernel = plgpu.kernel(
    body,
    out_type=jax.ShapeDtypeStruct((grid,), jnp.int32),
    grid=(grid,),
    grid_names=("sm",),
    scratch_types={"unused": plgpu.SMEM((256,), jnp.float32)} if "smem" in extra else {},
    compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
  )
  return jax.jit(lambda: kernel(jnp.zeros((grid,), jnp.int32)) if "in" in extra else kernel())


def launch(case: str):
  """case -> (the jitted launch of no arguments, check(outputs) -> what it found)."""
  head, *n = case.split(":")
  kind, *extra = head.split("+")
  n = [int(v) for v in n]
  if kind in ("waits", "clear") and len(n) == (3 if kind == "waits" else 1) and set(extra) <= {"in", "smem"}:
    grid, expect, waits = n if kind == "waits" else (n[0], n[0], 0)
    spin = 1000 if expect > grid else ms.SPIN_LIMIT

    def check(gave_up):
      gave = np.asarray(gave_up)
      return {"gave_up": int(gave.sum()), "expected_gave_up": grid * waits if expect > grid else 0}

    if kind == "waits" and not extra:
      return jax.jit(lambda: ms.empty_waits(grid=grid, waits=waits, expect=expect, spin_limit=spin)), check
    return variant(grid, expect, waits, spin, set(extra)), check
  if kind == "exchange" and len(n) == 2 and not extra:
    programs, waits = n

    def check(outs):
      seen, gave_up, _ = outs
      right = np.asarray(seen) == ms.expected_seen(programs, waits)
      return {"gave_up": int(np.asarray(gave_up).sum()), "seen_right": float(right.mean())}

    return jax.jit(lambda: ms.exchange(programs=programs, waits=waits)), check
  raise ValueError(f"case {case!r} is not waits[+in][+smem]:G:E:W, clear[+in][+smem]:G or exchange:P:W")


common.check(CASES, checks.each(checks.parses(launch), str, nonempty=True))


def child(case: str) -> None:
  """Run one case, printing `stage <name> <seconds>` as each is reached (and `found <json>` at the end)."""
  t0 = time.perf_counter()
  faulthandler.dump_traceback_later(FLAGS.case_s, exit=True)  # a hang ends here, with where it stood

  def stage(name):
    print(f"stage {name} {time.perf_counter() - t0:.2f}", flush=True)

  f, check = launch(case)
  lowered = f.trace().lower(**({} if jax.default_backend() == "gpu" else {"lowering_platforms": ("cuda",)}))
  stage("lowered")
  if jax.default_backend() != "gpu":
    return
  compiled = lowered.compile()
  stage("compiled")
  outs = compiled()
  stage("dispatched")
  jax.block_until_ready(outs)
  stage("ran")
  print("found " + json.dumps(check(outs)), flush=True)


def run_case(case: str) -> dict:
  env = dict(os.environ, PYTHONFAULTHANDLER="1")
  if FLAGS.dump and FLAGS.out:
    where = f"{os.path.splitext(FLAGS.out)[0]}_dump/{case.replace(':', '_')}"
    os.makedirs(where, exist_ok=True)
    env.update(MOSAIC_GPU_DUMP_TO=where, MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_SASS="1")
  cmd = [sys.executable, "-m", "experiments.decode.sync_probe", f"--child={case}", f"--case_s={FLAGS.case_s}"]
  row = {"case": case, "stages": {}}
  try:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=FLAGS.case_s + 10)
    out, row["rc"] = done.stdout, done.returncode
    if done.returncode:  # a case past --case_s ends itself, its Python stack on stderr (faulthandler)
      row["stderr_tail"] = done.stderr[-3000:]
  except subprocess.TimeoutExpired as e:
    out, row["timed_out"] = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), True
  for line in out.splitlines():
    if line.startswith("stage "):
      _, name, sec = line.split()
      row["stages"][name] = float(sec)
    elif line.startswith("found "):
      row.update(json.loads(line[len("found ") :]))
  return row


def main(argv):
  del argv
  if FLAGS.child:
    child(FLAGS.child)
    return
  res = {**run_record(common.setup()), "case_s": FLAGS.case_s, "rows": []}
  for case in FLAGS.cases:
    row = run_case(case)
    last = max(row["stages"], key=row["stages"].get) if row["stages"] else "none"
    state = "KILLED" if row.get("timed_out") else f"rc {row.get('rc')}"
    found = {k: v for k, v in row.items() if k not in ("case", "stages", "rc", "stderr_tail", "timed_out")}
    common.emit_row(
      res, row, f"{case:18s} {state:10s} last stage {last} {row['stages'].get(last, '')} {found}", FLAGS.out
    )


if __name__ == "__main__":
  app.run(main)

"""Which kernels XLA compiled to wait on their grid dependency, from the PTX of an XLA dump (issue 25).

XLA (`--xla_gpu_enable_pdl`, Hopper and later) starts each kernel it launches with programmatic dependent
launch with griddepcontrol.wait, so that kernel may start before the one ahead of it ends. This reads every
*.ptx file under --dump and reports each kernel's wait and launch_dependents (`wina_jax.bench.ptx`), grouped by
kind: the Pallas-Triton kernels (their names are the Pallas kernels', e.g. `sparse_gemv_compact`,
`launch_floor_triton`), then the rest by the profile's kernel categories (XLA's fusions among them). Mosaic GPU kernels are not in XLA's dump: they wait where
`MosaicConfig.pdl` asks (`mosaic_sync.grid_dependency`).

GPU (stage `ptx` of run_mosaic_h200.sh): XLA_FLAGS=--xla_dump_to=DIR python3 -m experiments.decode.launch_floor
  --programs=0 --kernels=select,triton --chain=4 --reps=1; PYTHONPATH=. python3 -m experiments.decode.pdl_ptx
  --dump=DIR --out=$OUT/pdl_ptx.json
CPU:  PYTHONPATH=. .venv/bin/python -m experiments.decode.pdl_ptx --dump=DIR (any folder of .ptx files)
"""

from __future__ import annotations

import collections
import json
import pathlib

from absl import app, flags

from experiments import common
from wina_jax import checks
from wina_jax.bench.ptx import grid_dependency
from wina_jax.bench.trace import category

flags.DEFINE_string("dump", "", "an XLA dump folder (--xla_dump_to), searched for *.ptx")
flags.DEFINE_list(
  "pallas", ["sparse_gemv", "decode_attention", "launch_floor_triton"], "Pallas kernel name parts"
)
common.check(flags.DEFINE_string("out", "", "write results JSON here"), checks.out_path())
FLAGS = flags.FLAGS


def kind(name: str) -> str:
  """'pallas' (a name part of --pallas), else the profile's kernel category (`bench.trace.category`: 'fusion'
  for XLA's fusions, 'matmul', 'copy', 'other', ...)."""
  return "pallas" if any(p in name for p in FLAGS.pallas) else category(name)


def main(argv):
  del argv
  if not FLAGS.dump or not pathlib.Path(FLAGS.dump).is_dir():
    raise SystemExit(f"--dump={FLAGS.dump!r} is not a folder: give the --xla_dump_to folder of a GPU run")
  files = sorted(pathlib.Path(FLAGS.dump).rglob("*.ptx"))
  if not files:
    found = collections.Counter(
      "".join(f.suffixes[-1:]) for f in pathlib.Path(FLAGS.dump).rglob("*") if f.is_file()
    )
    raise SystemExit(
      f"no .ptx files under {FLAGS.dump} (files there by suffix: {dict(found) or 'none'}): run the step with "
      f"XLA_FLAGS=--xla_dump_to={FLAGS.dump} and without jax's persistent compilation cache (a cache hit compiles, "
      "and dumps, nothing: JAX_ENABLE_COMPILATION_CACHE=false)"
    )
  rows = []
  for f in files:
    for name, marks in grid_dependency(f.read_text(errors="replace")).items():
      rows.append({"file": f.name, "kernel": name, "kind": kind(name), **marks})
  summary = {}
  for r in rows:
    s = summary.setdefault(r["kind"], {"kernels": 0, "wait": 0, "launch_dependents": 0})
    s["kernels"] += 1
    s["wait"] += r["wait"]
    s["launch_dependents"] += r["launch_dependents"]
  for k, s in sorted(summary.items()):
    print(
      f"{k:7s} kernels {s['kernels']:4d}  wait {s['wait']:4d}  launch_dependents {s['launch_dependents']:4d}"
    )
  for r in rows:
    if r["kind"] == "pallas":
      print(f"  {r['kernel']}: wait {r['wait']}, launch_dependents {r['launch_dependents']}")
  if FLAGS.out:
    res = {"command": common.command_line("experiments.decode.pdl_ptx"), "summary": summary, "rows": rows}
    pathlib.Path(FLAGS.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
  app.run(main)

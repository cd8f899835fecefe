"""Where a kernel's warps stall, from Nsight Compute's per-instruction source page.

Reads the CSV that `ncu --import REPORT --page source --csv --print-source sass` writes (run_persistent_h200.sh's
ncu stage: one launch of the persistent layer kernel) and summarizes its warp-stall samples: the share of each
stall reason, and the samples grouped by how often an instruction ran per warp (a loop body's instructions share
one count: the once-per-warp prologue 1.0, a tile loop its trips per program), each group with its instruction
count and commonest opcodes, so that "the tile loop is 1155 instructions and half the samples" is read off, not
guessed. Warps: the first instruction's execution count (every warp runs it once) unless --warps.

  PYTHONPATH=. python3 -m experiments.decode.ncu_stalls --csv=ncu_1_source.csv --out=ncu_stalls.json
"""

from __future__ import annotations

import collections
import csv
import gzip
import json

from absl import app, flags

from experiments import common
from wina_jax import checks

common.check(flags.DEFINE_string("csv", "", "ncu source-page CSV (.csv or .csv.gz)"), checks.file())
common.check(flags.DEFINE_integer("warps", 0, "warps in the launch (0: inferred)"), checks.count(0))
common.check(flags.DEFINE_integer("top", 12, "groups and instructions listed"), checks.count())
common.check(flags.DEFINE_string("out", "", "JSON output path"), checks.out_path())
FLAGS = flags.FLAGS
SAMPLES, EXECUTED = "Warp Stall Sampling (All Samples)", "Instructions Executed"


def _num(text: str) -> float:
  try:
    return float(text.replace(",", ""))
  except ValueError:
    return 0.0


def _opcode(sass: str) -> str:
  """'@!P2 FADD R1, R2, R3' -> 'FADD'."""
  words = [w for w in sass.split() if not w.startswith("@")]
  return words[0] if words else "?"


def read_rows(path: str) -> list[dict]:
  """The CSV's instruction rows as dicts (its first line names the kernel, the second the columns)."""
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    lines = list(csv.reader(f))
  header = next((i for i, line in enumerate(lines) if SAMPLES in line), None)
  if header is None:
    raise common.InputError(
      f"--csv={path} has no '{SAMPLES}' column: write it with ncu --import REPORT --page source --csv "
      "--print-source sass"
    )
  names = lines[header]
  return [dict(zip(names, line)) for line in lines[header + 1 :] if len(line) == len(names)]


def summarize(rows: list[dict], warps: int = 0, top: int = 12) -> dict:
  """{'samples', 'warps', 'stalls': {reason: share}, 'groups': [...], 'top_instructions': [...]}."""
  reasons = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k]
  total = sum(_num(r[SAMPLES]) for r in rows) or 1.0
  if not warps:  # the kernel's first instruction runs once per warp
    warps = int(next(_num(r[EXECUTED]) for r in rows if _num(r[EXECUTED]) > 0))
  stalls = {k.removeprefix("stall_"): sum(_num(r[k]) for r in rows) for k in reasons}
  groups: dict = collections.defaultdict(
    lambda: {"samples": 0.0, "instructions": 0, "ops": collections.Counter()}
  )
  for r in rows:
    g = groups[round(_num(r[EXECUTED]) / warps, 1)]
    g["samples"] += _num(r[SAMPLES])
    g["instructions"] += 1
    g["ops"][_opcode(r.get("Source", ""))] += 1
  ranked = sorted(groups.items(), key=lambda kv: -kv[1]["samples"])[:top]
  hot = sorted(rows, key=lambda r: -_num(r[SAMPLES]))[:top]
  return {
    "samples": total,
    "warps": warps,
    "stalls": {k: v / total for k, v in sorted(stalls.items(), key=lambda kv: -kv[1]) if v},
    "groups": [
      {
        "runs_per_warp": k,
        "share": g["samples"] / total,
        "instructions": g["instructions"],
        "ops": dict(g["ops"].most_common(6)),
      }
      for k, g in ranked
    ],
    "top_instructions": [
      {
        "sass": r.get("Source", ""),
        "share": _num(r[SAMPLES]) / total,
        "runs_per_warp": _num(r[EXECUTED]) / warps,
        "stall": max(reasons, key=lambda k: _num(r[k])).removeprefix("stall_"),
      }
      for r in hot
    ],
  }


def main(argv):
  del argv
  common.setup()
  if not FLAGS.csv:
    raise common.InputError("--csv= names no file: pass the CSV of ncu --import REPORT --page source --csv")
  out = summarize(read_rows(FLAGS.csv), FLAGS.warps, FLAGS.top)
  print(f"{out['samples']:.0f} samples over {out['warps']} warps; stall reasons:")
  for k, v in out["stalls"].items():
    print(f"  {k:20s} {100 * v:5.1f} %")
  print("by runs per warp (a loop body's instructions share one):")
  for g in out["groups"]:
    print(
      f"  {g['runs_per_warp']:7.1f}  {100 * g['share']:5.1f} %  {g['instructions']:5d} instructions  {g['ops']}"
    )
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(
        {"command": common.command_line("experiments.decode.ncu_stalls"), "csv": FLAGS.csv, **out},
        f,
        indent=1,
      )


if __name__ == "__main__":
  app.run(main)

"""`experiments.decode.ncu_stalls` on a small source-page CSV written here in Nsight Compute's layout: the stall
shares, the groups by runs per warp (warps inferred from the first instruction) and the hottest instruction."""

import csv
import gzip
import json
import subprocess
import sys


def write_csv(path):
  header = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed"]
  header += ["stall_barrier", "stall_long_sb", "stall_barrier (Not Issued)"]
  rows = [  # 8 warps: an entry instruction (once each), a two-instruction loop of 5 trips, a barrier
    ["0x10", "  MOV R1, c[0x0][0x28]", "2", "8", "0", "2", "0"],
    ["0x20", "  LDG.E.128 R4, [R2.64]", "30", "40", "0", "30", "0"],
    ["0x30", "  @!P0 FADD R5, R4, R5", "10", "40", "0", "0", "0"],
    ["0x40", "  BAR.SYNC.DEFER_BLOCKING 0x0", "18", "8", "18", "0", "9"],
  ]
  with gzip.open(path, "wt", newline="") as f:
    f.write('"Kernel Name","persistent_layer",\n')
    csv.writer(f).writerows([header, *rows])


def test_summary(tmp_path):
  src, out = tmp_path / "s.csv.gz", tmp_path / "s.json"
  write_csv(src)
  cmd = [sys.executable, "-m", "experiments.decode.ncu_stalls", f"--csv={src}", f"--out={out}", "--top=2"]
  subprocess.run(cmd, check=True, capture_output=True)
  res = json.loads(out.read_text())
  assert res["warps"] == 8 and res["samples"] == 60
  assert res["stalls"] == {"long_sb": 32 / 60, "barrier": 18 / 60}  # the Not Issued column is not a reason
  loop, once = res["groups"]
  assert loop == {
    "runs_per_warp": 5.0,
    "share": 40 / 60,
    "instructions": 2,
    "ops": {"LDG.E.128": 1, "FADD": 1},
  }
  assert once["runs_per_warp"] == 1.0 and once["instructions"] == 2 and once["share"] == 20 / 60
  assert res["top_instructions"][0] == {
    "sass": "  LDG.E.128 R4, [R2.64]",
    "share": 0.5,
    "runs_per_warp": 5.0,
    "stall": "long_sb",
  }


def test_a_csv_without_samples_is_refused(tmp_path):
  src = tmp_path / "bad.csv"
  src.write_text("a,b\n1,2\n")
  res = subprocess.run(
    [sys.executable, "-m", "experiments.decode.ncu_stalls", f"--csv={src}"], capture_output=True, text=True
  )
  assert res.returncode == 1 and "--print-source sass" in res.stderr and "Traceback" not in res.stderr

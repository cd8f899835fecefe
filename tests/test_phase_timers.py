"""A CPU smoke run of `experiments.decode.phase_timers` (interpret mode: one program, the clock reads zero):
its rows, phases and kept fractions; the GPU measurement itself runs in `run_persistent_h200.sh`."""

import json
import subprocess
import sys

from wina_jax.kernels import persistent_layer as PL


def test_tiny_cpu_run(tmp_path):
  out = tmp_path / "t.json"
  subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.decode.phase_timers",
      "--models=tiny",
      "--persistent_configs=32:32:32:4:1:0.875:64:1:resident",
      "--sparsities=0,0.5",
      "--reps=1",
      f"--out={out}",
    ],
    check=True,
    capture_output=True,
  )
  res = json.loads(out.read_text())
  assert res["interpret"] and res["command"].startswith("python -m experiments.decode.phase_timers")
  assert [r["sparsity"] for r in res["rows"]] == [0.0, 0.5]
  for r in res["rows"]:
    assert list(r["phases"]) == list(PL.PHASES) and r["span_us"] == 0.0
    assert (
      "wait_after_median_us" in r["phases"]["qkv"]
      and "wait_after_median_us" not in r["phases"]["residual_mlp"]
    )
    work = r["last_launch"]["work_us"]  # one launch, per phase and program (one program here)
    assert len(work) == len(PL.PHASES) and all(w == [0.0] for w in work)
    assert len(r["last_launch"]["prologue_us"]) == len(PL.SITES)
    fractions = [f for v in r["kept"].values() for f in v]
    assert all(f == 1.0 for f in fractions) if r["sparsity"] == 0 else all(0.3 < f < 0.7 for f in fractions)

"""The memory estimate (`wina_jax.memory`) against the measured peak resident memory of CPU runs at two
sizes each (`tests/memory_probe.py`, one fresh process per run), and the refusal it drives."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from memory_probe import CFG

from wina_jax import memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = [("forward", 2, 1024), ("forward", 2, 1536), ("calibration", 4, 768), ("calibration", 4, 1536)]


def measure(kind: str, n: int, t: int) -> int:
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  p = subprocess.run(
    [sys.executable, os.path.join(ROOT, "tests", "memory_probe.py"), kind, str(n), str(t)],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert p.returncode == 0, p.stderr[-2000:]
  res = json.loads(p.stdout.strip().splitlines()[-1])
  assert res["peak"] > 0, (kind, n, t, res)
  return res["peak"]


def test_estimate_within_its_stated_error_of_measured_peaks():
  with ThreadPoolExecutor(2) as pool:  # resident memory is per process: running two at once changes nothing
    measured = list(pool.map(lambda r: measure(*r), RUNS))
  rows = []
  for (kind, n, t), peak in zip(RUNS, measured):
    est = sum(getattr(memory, kind)(CFG, n, t).values())
    rows.append((kind, n, t, est, peak, est / peak - 1))
  report = "\n".join(
    f"{k} {n}x{t}: estimate {e >> 20} MiB, measured {m >> 20} MiB, {r:+.1%}" for k, n, t, e, m, r in rows
  )
  assert all(abs(r) <= memory.MEASURED_ERROR for *_, r in rows), report
  for kind in ("forward", "calibration"):  # the sizes differ enough for the activations to dominate
    small, large = [m for k, _, _, _, m, _ in rows if k == kind]
    assert large > 1.5 * small, report


def test_estimate_scales_with_the_shapes():
  f = lambda b, t: sum(memory.forward(CFG, b, t).values())
  assert f(2, 1024) < f(4, 1024) < f(4, 2048)
  parts = memory.forward(CFG, 4, 100_000)
  assert parts["attention"] == 4 * 4 * CFG.num_attention_heads * 100_000**2 * 4  # 4 float32 [B, H, T, T]
  cal = memory.calibration(CFG, 16, 256)
  assert cal["hidden states"] == 2 * 16 * 256 * CFG.hidden_size * 4
  assert memory.transform(CFG)["params"] == 2 * memory.param_bytes(CFG)


def test_refusal_names_the_estimate_and_the_flags(monkeypatch):
  monkeypatch.setenv("WINA_JAX_MEMORY", "1G")
  parts = memory.calibration(CFG, 4, 8192)
  with pytest.raises(
    MemoryError,
    match=r"needs an estimated \d+\.\d GiB .*more than WINA_JAX_MEMORY \(1\.0 GiB\); lower --seq_len",
  ):
    memory.check(parts, "calibration on 4 x 8192 tokens", "lower --seq_len or --max_windows")
  assert memory.check(memory.forward(CFG, 1, 16), "a forward", "lower --seq_len") < memory.GIB


def test_available_and_sizes(monkeypatch):
  monkeypatch.delenv("WINA_JAX_MEMORY", raising=False)
  have, where = memory.available()
  assert have > 0 and where
  assert memory.parse_size("8G") == 8 << 30 and memory.parse_size("512MiB") == 512 << 20
  assert memory.parse_size("1000") == 1000
  with pytest.raises(ValueError, match="not a size"):
    memory.parse_size("lots")

"""Every script's flags walked (`tests/flag_walk.py`, one process per script): bad input stops with one
error naming the flag and the value, in seconds, before any model is loaded; and issue 26's table.

Numeric flags (integers, floats, lists of them) are probed at 0, -1, NaN and huge (2^63; inf for floats):
NaN and huge are always refused; a negative only where the help says what '< 0' means; 0 for integers only
where the help says what '(0: ...)' means or gives a range '(0..N)' (floats: 0 is an amount, e.g. sparsity
0 = dense). Path flags are probed missing, empty and cut short (JSON, .npz); output paths under a file; a
model cut short is refused by `common.preflight`, before loading (the table's cases, every model script).
"""

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import once_per_session

from wina_jax import assets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(
  f"experiments.{room}.{f[:-3]}"
  for room in ("quality", "decode")
  for f in os.listdir(os.path.join(ROOT, "experiments", room))
  if f.endswith(".py") and f != "__init__.py"
)
PARSE_SECONDS = 2.0  # one flag's check
RUN_SECONDS = 60.0  # a case through `main` up to its error (reads a GGUF header; a loaded 2-core machine)


def files(d) -> dict[str, str]:
  """Prepared inputs: missing, empty, cut-short JSON / .npz / GGUF (the issue's first 50 MB of SmolLM2's
  file), a GGUF cut inside its header, a text file named .gguf, an output path under a file."""
  gguf = assets.default_gguf()
  empty = d / "empty.txt"
  empty.write_bytes(b"")
  out = {"missing": str(d / "missing" / "nothing.txt"), "empty": str(empty), "under_file": str(empty / "out")}
  with open(os.path.join(ROOT, "benchmarks", "results", "bench_decode_h200_llama.json"), "rb") as f:
    (d / "cut.json").write_bytes(f.read()[:300])
  out["cut_json"] = str(d / "cut.json")
  import numpy as np

  np.savez(d / "full.npz", a=np.arange(1000))
  (d / "cut.npz").write_bytes((d / "full.npz").read_bytes()[:500])
  out["cut_npz"] = str(d / "cut.npz")
  with open(gguf, "rb") as f:
    (d / "cut.gguf").write_bytes(f.read(50_000_000))
  with open(gguf, "rb") as f:
    (d / "header_cut.gguf").write_bytes(f.read(4096))
  (d / "text.gguf").write_text("not a GGUF file\n")
  out.update(
    cut_model=str(d / "cut.gguf"), header_cut=str(d / "header_cut.gguf"), not_gguf=str(d / "text.gguf")
  )
  out["gguf_size"] = str(os.path.getsize(gguf))
  return out


def cases(f: dict) -> dict[str, list[tuple[list[str], list[str]]]]:
  """{script: [(argv, substrings its error must contain)]}: the issue's table, rows that were clear
  already included."""
  return {
    "experiments.quality.calibrate": [
      (
        ["--method=teal", "--seq_len=100000", "--max_windows=2"],
        ["max_position_embeddings (8192)", "--seq_len"],
      ),
      (["--seq_len=4096", "--max_windows=4"], ["needs an estimated", "GiB", "--seq_len or --max_windows"]),
      ([f"--model={f['cut_model']}"], ["cut short", f"need {f['gguf_size']} bytes", "the file has 50000000"]),
      ([f"--model={f['header_cut']}"], ["damaged or cut-short header", "4096 bytes"]),
      ([f"--model={f['not_gguf']}"], ["is not a GGUF file"]),
      (["--sparsity=1.5"], ["--sparsity=1.5", "[0, 1)"]),
      (["--method=magic"], ["--method=magic", "unknown method 'magic'"]),
    ],
    "experiments.quality.sweep": [
      (["--seq_len=0", "--tasks=", "--methods=dense"], ["--seq_len=0", "[2, 2147483647]"]),
      (
        ["--seq_len=9000", "--tasks=", "--methods=dense"],
        ["--seq_len=9000", "max_position_embeddings (8192)"],
      ),
      (["--limit=0"], ["--limit=0"]),
      (["--methods=dense,magic"], ["unknown method 'magic'"]),
      ([f"--ppl_text={f['empty']}", "--tasks=", "--methods=dense"], ["--ppl_text=", "is empty"]),
      ([f"--model={f['missing']}.gguf"], ["--model=", "does not exist"]),
      ([f"--model={f['cut_model']}", "--tasks=", "--methods=dense"], ["cut short"]),
    ],
    **{
      f"experiments.quality.{s}": [([f"--model={f['cut_model']}"], ["cut short", "the file has 50000000"])]
      for s in ("evaluate", "analyze_errors", "transform_basis")
    },
  }


def walk(module: str, f: dict, d) -> dict:
  env = {
    **os.environ,
    "PYTHONPATH": ROOT,
    "JAX_PLATFORMS": "cpu",
    "WINA_JAX_CACHE": str(d / f"cache-{module}"),  # empty: a model conversion would show
    "WINA_JAX_MEMORY": "1G",  # the memory case's cap; every other case stops before the estimate
  }
  argv = [sys.executable, os.path.join(ROOT, "tests", "flag_walk.py"), module, json.dumps(f)]
  argv.append(json.dumps([a for a, _ in cases(f).get(module, [])]))
  p = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, f"{module}: {p.stderr[-3000:]}"
  return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def walked(tmp_path_factory):
  """(prepared files, {script: its walk}): built once per test session, however xdist splits this module."""

  def build():
    d = tmp_path_factory.mktemp("inputs")
    f = files(d)
    with ThreadPoolExecutor(2) as pool:
      return f, dict(zip(SCRIPTS, pool.map(lambda m: walk(m, f, d), SCRIPTS)))

  return once_per_session(tmp_path_factory, "inputs_walked", build)


def probes(result: dict):
  for name, flag in result["flags"].items():
    for value, error in flag["probes"].items():
      if not value.endswith(":seconds"):
        yield name, flag, value, error, flag["probes"][value + ":seconds"]


def test_defaults_pass_their_rules(walked):
  _, results = walked
  assert {m: r["defaults"] for m, r in results.items() if r["defaults"] is not None} == {}
  assert len(results) == len(SCRIPTS) >= 16


def test_numeric_flags_refuse_zero_negative_nan_and_huge(walked):
  _, results = walked
  bad, n = [], 0
  for module, result in results.items():
    for name, flag, value, error, seconds in probes(result):
      if flag["type"] == "other":
        continue
      n += 1
      assert seconds < PARSE_SECONDS, (module, name, value, seconds)
      if error is None:
        documented = (
          value == "0"
          and (flag["type"] in ("float", "floats") or re.search(r"\(0\s*[:=]|\(0\.\.", flag["help"]))
        ) or (value == "-1" and "< 0" in flag["help"])
        if not documented:
          bad.append(f"{module} --{name}={value} accepted")
      elif f"--{name}=" not in error:
        bad.append(f"{module} --{name}={value}: the error does not name the flag: {error}")
  assert n > 150 and not bad, "\n".join(bad)


def test_path_flags_refuse_missing_empty_and_cut_short_files(walked):
  f, results = walked
  bad, n = [], 0
  for module, result in results.items():
    for name, flag, value, error, seconds in probes(result):
      if flag["type"] != "other":
        continue
      n += 1
      assert seconds < PARSE_SECONDS, (module, name, value, seconds)
      if error is None or f"--{name}=" not in error:
        bad.append(f"{module} --{name}={value}: {error}")
  assert n > 40 and not bad, "\n".join(bad)
  json_flags = {n for r in results.values() for n, fl in r["flags"].items() if f["cut_json"] in fl["probes"]}
  assert {"json", "configs", "sweeps", "config_sets"} <= json_flags


@pytest.mark.parametrize(
  "module",
  [
    f"experiments.quality.{s}"
    for s in ("calibrate", "sweep", "evaluate", "analyze_errors", "transform_basis")
  ],
)
def test_issue_table(walked, module):
  """Each row: an error (no traceback), naming the problem, before any weights are converted."""
  f, results = walked
  for argv, expect in cases(f)[module]:
    res = results[module]["cases"][" ".join(argv)]
    assert "traceback" not in res, (argv, res["traceback"])
    assert res["exit"] is not None, (argv, "ran without an error")
    for s in expect:
      assert s in res["exit"], (argv, s, res["exit"])
    assert not res["loaded"] and res["seconds"] < RUN_SECONDS, (argv, res)

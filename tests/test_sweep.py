"""The sweep on a tiny random model: a run killed after its first cell, restarted, ends with the same files."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm2_tokenizer):
  """An HF checkpoint folder: a 2-layer random llama with SmolLM2's vocabulary and tokenizer."""
  import transformers
  from conftest import TINY

  path = str(tmp_path_factory.mktemp("tiny_llama"))
  cfg = transformers.LlamaConfig(**{**TINY, "vocab_size": smollm2_tokenizer.vocab_size})
  cfg._attn_implementation = "eager"
  transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
  smollm2_tokenizer.save_pretrained(path)
  return path


def _cmd(model, out):
  return [
    sys.executable,
    "-m",
    "experiments.quality.sweep",
    f"--model={model}",
    "--methods=dense,teal",
    "--sparsities=0.5",
    "--tasks=piqa,arc_easy",
    "--limit=2",
    "--ppl_windows=1",
    "--seq_len=16",
    "--batch_tokens=256",
    f"--out={out}",
  ]


def _env():
  return {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}


def test_killed_and_resumed_sweep_gives_the_same_table(tiny_folder, tmp_path):
  full, resumed = tmp_path / "full", tmp_path / "resumed"
  subprocess.run(_cmd(tiny_folder, full), check=True, cwd=ROOT, env=_env(), capture_output=True)
  outputs = ("table.md", "results.csv", "results.json", "accuracy.png", "perplexity.png")
  assert all((full / f).exists() for f in outputs)

  proc = subprocess.Popen(
    _cmd(tiny_folder, resumed), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  cells = resumed / "cells"
  deadline = time.time() + 600
  while proc.poll() is None and time.time() < deadline:
    if cells.exists() and any(p.suffix == ".json" for p in cells.iterdir()):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.05)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the sweep finished before it could be killed"
  done = sorted(p for p in cells.iterdir() if p.suffix == ".json")
  assert len(done) == 1 and not (resumed / "table.md").exists()
  first_mtime = done[0].stat().st_mtime_ns

  res = subprocess.run(
    _cmd(tiny_folder, resumed), check=True, cwd=ROOT, env=_env(), capture_output=True, text=True
  )
  assert "1 already done" in res.stdout
  assert done[0].stat().st_mtime_ns == first_mtime  # the finished cell was not recomputed
  for f in ("table.md", "results.csv", "results.json"):
    assert (resumed / f).read_text() == (full / f).read_text()
  for p in cells.glob("*.json"):  # every cell file is complete JSON
    cell = json.loads(p.read_text())
    row, items = cell["row"], cell["items"]  # items: what bootstrap bands resample
    assert row["method"] in ("dense", "teal")
    assert math.exp(sum(items["ppl_window_nll"])) == pytest.approx(row["ppl"], rel=1e-6)  # 1 window
    for t in ("piqa", "arc_easy"):
      assert len(items[f"{t}/correct"]) == 2 and sum(items[f"{t}/correct"]) / 2 == row[t]
  table = (full / "table.md").read_text()
  assert "| dense |" in table and "| teal |" in table
  cell = json.loads(next(cells.glob("teal@*.json")).read_text())
  assert len(cell["numerics"]["runs"]) == 2 and cell["numerics"]["eps"] == 6e-8  # default --seeds=2
  assert "] ~[" in next(l for l in table.splitlines() if l.startswith("| teal |"))  # both bands
  assert "| 50% | teal | dense |" in table  # compared with dense


def test_more_seeds_compute_only_the_missing_runs(tiny_folder, tmp_path):
  out = tmp_path / "s"
  subprocess.run(
    _cmd(tiny_folder, out) + ["--seeds=0"], check=True, cwd=ROOT, env=_env(), capture_output=True
  )
  before = {p.name: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
  assert all(c["numerics"]["runs"] == [] for c in before.values())
  dense_line = lambda: next(
    l for l in (out / "table.md").read_text().splitlines() if l.startswith("| dense |")
  )
  assert "[" in dense_line() and "~[" not in dense_line()  # bootstrap band, no numerics band
  res = subprocess.run(
    _cmd(tiny_folder, out) + ["--seeds=1", "--continuation=The", "--continuation_tokens=3"],
    check=True,
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
  )
  assert "0 already done" in res.stdout
  for name, old in before.items():
    new = json.loads((out / "cells" / name).read_text())
    assert new["row"] == old["row"] and new["items"] == old["items"]  # kept, not recomputed
    assert len(new["numerics"]["runs"]) == 1 and new["continuation"]["prompt"] == "The"
  assert "~[" in dense_line() and "Greedy continuations" in (out / "table.md").read_text()


def test_bundle_replaces_tokenizer_and_data_and_deadline_stops_early(tiny_folder, tmp_path):
  """A sweep reading a bundle gives the table of one that tokenized; a zero deadline runs one cell."""
  bundle = tmp_path / "data.npz"
  ref = subprocess.run(
    _cmd(tiny_folder, tmp_path / "ref") + [f"--bundle={bundle}"],
    check=True,
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
  )
  assert bundle.exists()
  stopped = subprocess.run(
    _cmd(tiny_folder, tmp_path / "b") + [f"--bundle={bundle}", "--deadline_s=0"],
    check=True,
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
  )
  assert "1 of 2 cells left" in stopped.stdout and "--report_only" in stopped.stdout
  assert "| dense |" in stopped.stdout and "| teal |" not in stopped.stdout
  subprocess.run(
    _cmd(tiny_folder, tmp_path / "b") + [f"--bundle={bundle}"],
    check=True,
    cwd=ROOT,
    env=_env(),
    capture_output=True,
  )
  assert (tmp_path / "b" / "table.md").read_text() == (tmp_path / "ref" / "table.md").read_text()
  assert "| teal |" in ref.stdout
  bad = subprocess.run(
    _cmd(tiny_folder, tmp_path / "c") + [f"--bundle={bundle}", "--limit=3"],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
  )
  assert bad.returncode != 0 and "other settings" in bad.stderr and "'limit': (2, 3)" in bad.stderr


def test_evaluate_script_uses_the_recommended_variant_when_no_method_is_given(tiny_folder):
  from wina_jax.eval.recommended import recommended

  rec = recommended(0.5)
  res = subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.quality.evaluate",
      f"--model={tiny_folder}",
      "--sparsity=0.5",
      "--seq_len=16",
      "--max_windows=2",
      "--calib_windows=2",
      "--max_new_tokens=2",
    ],
    check=True,
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
  )
  assert f"{rec.spec} at 0.5 ({rec.mode}, {rec.allocation}): perplexity" in res.stdout

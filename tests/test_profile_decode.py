"""`wina_jax.bench.trace` (the per-step summary of kernel events) and a CPU smoke run of
`experiments.decode.profile_decode`."""

import json
import subprocess
import sys

import pytest

from wina_jax.bench.trace import category, summarize


def test_summary_splits_busy_and_gap():
  # two steps; kernels at [0, 10) and [5, 20) overlap, then a gap of 30 ns, then [50, 60)
  events = [("sparse_gemv_compact", 0, 10), ("loop_add_fusion", 5, 15), ("gemv_bf16", 50, 10)]
  s = summarize(events, steps=2, top=5)
  assert s["kernels_per_step"] == 1.5
  assert s["busy_ms"] == pytest.approx(30 / 2 / 1e6) and s["span_ms"] == pytest.approx(60 / 2 / 1e6)
  assert s["gap_ms"] == pytest.approx(30 / 2 / 1e6)
  assert set(s["categories"]) == {"sparse_gemv", "fusion", "matmul"}
  assert s["top_kernels"][0]["name"] == "loop_add_fusion" and s["top_kernels"][0]["us_each"] == 15 / 1e3
  assert summarize([], 2, 5) == {"kernels_per_step": 0}


def test_variant_names():
  from experiments.decode.profile_decode import parse_variant

  assert parse_variant("dense") == ("dense", 0.0, "") and parse_variant("wina:0.65") == ("wina", 0.65, "")
  assert parse_variant("weightless") == ("weightless", 0.0, "")
  assert parse_variant("teal:0.999+mlp") == ("teal", 0.999, "mlp")
  assert parse_variant("teal:0.5+mlp22") == ("teal", 0.5, "mlp22")
  for bad in (
    "teal",
    "teal:1.0",
    "cats:0.5",
    "dense:0.5",
    "dense+mlp",
    "weightless:0.5",
    "teal:0.5+attn",
    "teal:0.5+mlp3",
  ):
    with pytest.raises(ValueError, match="METHOD:SPARSITY"):
      parse_variant(bad)


def test_categories():
  assert category("sparse_gemv_compact") == "sparse_gemv"
  assert category("decode_attention") == "attention"
  assert category("sm90_xmma_gemm_bf16") == "matmul"
  assert category("input_reduce_fusion") == "fusion"
  assert category("memset32d") == "copy"
  assert category("whatever") == "other"
  assert category("persistent_attention") == "persistent" and category("persistent_layer") == "persistent"


def test_tiny_cpu_run(tmp_path):
  """Rows per variant, and the numerics the run declared: --precision and the random weights' bfloat16."""
  out = tmp_path / "p.json"
  subprocess.run(
    [
      sys.executable,
      "-m",
      "experiments.decode.profile_decode",
      "--tiny",
      "--variants=dense,weightless,teal:0.5",
      "--precision=tf32",
      f"--out={out}",
    ],
    check=True,
    capture_output=True,
  )
  res = json.loads(out.read_text())
  rows = res["rows"]
  assert [r["variant"] for r in rows] == ["dense", "weightless", "teal:0.5"]
  assert all(r["kernels_per_step"] > 0 and r["busy_ms"] > 0 for r in rows)
  # the rows after the weightless one carry what they add over it: their own figures less its
  assert "over_weightless" not in rows[0] and "over_weightless" not in rows[1]
  added = rows[2]["over_weightless"]
  assert added["kernels"] == pytest.approx(rows[2]["kernels_per_step"] - rows[1]["kernels_per_step"])
  assert added["busy_ms"] == pytest.approx(rows[2]["busy_ms"] - rows[1]["busy_ms"])
  assert added["layer_busy_us"] == pytest.approx(added["busy_ms"] * 1e3 / 2)  # the tiny model's 2 layers
  assert {"xla_flags", "mosaic_pdl_launch"} <= res.keys()
  declared = res["declared_numerics"]
  assert declared["precision"] == "tf32" and declared["matmul"] == "tensorfloat32"
  assert declared["dtype"] == "bfloat16" and {"backend", "topk_impl", "note"} <= declared.keys()


def test_decode_overhead_tiny_cpu_run(tmp_path):
  out = tmp_path / "o.json"
  subprocess.run(
    [sys.executable, "-m", "experiments.decode.decode_overhead", "--tiny", f"--out={out}"],
    check=True,
    capture_output=True,
  )
  res = json.loads(out.read_text())
  assert {"declared_numerics", "xla_flags", "mosaic_pdl_launch"} <= res.keys()
  assert {r["variant"] for r in res["timings"]} == {"dense", "teal", "teal_sem"}
  assert res["profiles"] and all(p["kernels_per_step"] > 0 for p in res["profiles"].values())
  # on CPU the tiny run uses the Pallas kernels in interpret mode: teal's 'partials' reduce and teal_sem's
  # 'semaphore' reduce are different code, and one step of each gives the same logits up to bf16 rounding
  assert res["backend"] == "interpret"
  step = res["checks"]["tiny/step"]
  assert step["rel_err_sem_vs_teal"] < 1e-2 and step["same_token"] and step["sem_bitwise_repeatable"]

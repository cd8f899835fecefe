"""The sweep's table: bands next to every number, and verdicts on method-vs-method differences."""

import numpy as np

from wina_jax.eval import report


def _cell(method, s, nll, rows, runs):
  """A sweep cell with per-window NLLs `nll`, PIQA rows `rows` and perturbed runs [(ppl, piqa)]."""
  ppl = float(np.exp(np.mean(nll)))
  row = {
    "method": method,
    "sparsity": s,
    "measured_sparsity": s,
    "gflops": 0.2,
    "ppl": ppl,
    "piqa": float(np.mean(rows)),
    "avg": float(np.mean(rows)),
  }
  return {
    "row": row,
    "items": {"ppl_window_nll": list(nll), "piqa/correct": list(rows)},
    "numerics": {"eps": 6e-8, "runs": [{"ppl": p, "piqa": a} for p, a in runs]},
  }


def test_table_prints_bands_and_marks_real_and_noise_differences():
  rng = np.random.default_rng(0)
  nll = rng.normal(3.0, 0.3, 40)
  rows = rng.integers(0, 2, 300)
  dense = _cell("dense", 0.0, nll - 0.5, rows, [(np.exp(2.5) * 1.001, rows.mean())])
  teal = _cell("teal", 0.5, nll, rows, [(np.exp(3.0) * 1.002, rows.mean())])
  flipped = rows.copy()
  flipped[:3] = 1 - flipped[:3]  # 3 of 300 rows differ: noise
  wina = _cell("wina", 0.5, nll + rng.normal(0, 0.01, 40), flipped, [(np.exp(3.0) * 0.999, flipped.mean())])
  rows_out = report.banded_rows([dense, teal, wina], ["piqa"])
  teal_bands = rows_out[1]["bands"]
  md = report.markdown(rows_out, ["piqa"])
  lo, hi = rows_out[1]["bands"]["ppl"]["sampling"]
  assert lo < rows_out[1]["ppl"] < hi
  assert f"{rows_out[1]['ppl']:.3f} [{lo:.3f}, {hi:.3f}] ~[" in md
  assert rows_out[1]["bands"]["ppl"]["numerics"]["n"] == 2
  comp = report.comparison_table([dense, teal, wina], ["piqa"], "teal")
  lines = comp.splitlines()[2:]
  assert lines[0].startswith("| 50% | teal | dense |") and "**real**" in lines[0].split("|")[4]  # ppl x 1.65
  assert lines[1].startswith("| 50% | wina | teal |") and lines[1].count("**within noise**") == 2
  # a stored cell without items (older sweeps) prints its plain value and joins no comparison
  old = {"row": dict(wina["row"])}
  assert "bands" not in report.banded_rows([old], ["piqa"])[0]
  assert report.comparison_table([teal, old], ["piqa"], "teal") == ""
  # perplexity-only re-runs (--noseed_tasks): the task keeps its bootstrap band and has no numerics band
  ppl_only = {**teal, "numerics": {"eps": 6e-8, "runs": [{"ppl": 20.0}, {"ppl": 20.1}]}}
  b = report.cell_bands(ppl_only, ["piqa"])
  assert b["ppl"]["numerics"]["n"] == 3 and b["piqa"]["numerics"] is None and b["avg"]["numerics"] is None
  assert b["piqa"]["sampling"] == teal_bands["piqa"]["sampling"]


def test_plot_uses_a_log_axis_when_values_span_orders_of_magnitude(tmp_path):
  """A collapsed variant (perplexity 2e9 beside 40) gets a log axis; ordinary spans and accuracies stay
  linear."""
  assert report.wants_log([42.0, 71.0, 2.0e9]) and not report.wants_log([21.6, 38.0, 176.0])
  assert not report.wants_log([0.0, 0.5]) and not report.wants_log([])
  rows = [
    dict(method=m, sparsity=s, measured_sparsity=s, ppl=p, avg=0.4)
    for m, s, p in [("dense", 0.0, 42.0), ("teal", 0.5, 71.0), ("teal-transform", 0.5, 2.0e9)]
  ]
  path = tmp_path / "perplexity.png"
  report.plot(rows, [], str(path), [("ppl", "perplexity"), ("avg", "avg")])
  assert path.stat().st_size > 0

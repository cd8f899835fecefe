"""Tables and plots of docs/findings.md from the committed sweep results (nothing is recomputed).

  python -m experiments.quality.findings            # rewrite the generated tables in docs/findings.md + PNGs
  python -m experiments.quality.findings --check    # exit 1 if docs/findings.md is out of date (tests run this)

Reads results/sweep/h200/{threshold-uniform,threshold-greedy}/results.json (the H200 grid, 1000 rows
per task; command in docs/findings.md), results/sweep/cpu_grid/*/results.json (the CPU grid over
modes and allocations), results/analysis/errors.csv (per-site errors) and the paper's protocol on two
models (`PROTOCOL`: results/sweep/{smollm2-topk,qwen1.5b}/topk-{uniform,greedy}, rows and their cells'
items, i.e. per-window NLLs and per-row correctness, for standard errors). Writes the blocks between
`<!-- findings:NAME -->` and `<!-- /findings:NAME -->`
in docs/findings.md and docs/findings/{quality_vs_sparsity,pareto}.png.

avg4 is the mean over the tasks where dense SmolLM2 is above the majority-class rate of the rows scored
(PIQA, HellaSwag, ARC-Easy, ARC-Challenge; the `baselines` table shows the other three at or below it).

Bands (`wina_jax.eval.bands`): the H200 cells predate per-row / per-window storage, so their accuracy
differences get an unpaired binomial 95 % interval from the committed accuracies and row counts, and
their perplexity differences none; CPU-grid cells that carry items get the sweep's paired bootstrap and
numerics band (`wina_jax.eval.report.comparison_table`), the others are listed as without a band.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import sys
from typing import Optional

from absl import app, flags

from wina_jax.eval import recommended as R
from wina_jax.eval import report

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
H200 = os.path.join(ROOT, "results", "sweep", "h200")
CPU = os.path.join(ROOT, "results", "sweep", "cpu_grid")
DOC = os.path.join(ROOT, "docs", "findings.md")
FIGS = os.path.join(ROOT, "docs", "findings")
TASKS = ("piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "boolq", "mmlu")
INFORMATIVE = ("piqa", "hellaswag", "arc_easy", "arc_challenge")
MAIN = ("dense", "teal", "teal-transform", "cats", "wina", "wina-transform")
CPU_RUNS = ("threshold-uniform", "topk-uniform", "threshold-greedy")
PROTOCOL = {  # 2026-12-01, TF32 matmuls (JAX's GPU default, before precision was declared), no numerics band
  "SmolLM2-135M": os.path.join(ROOT, "results", "sweep", "smollm2-topk"),
  "Qwen2.5-Coder-1.5B": os.path.join(ROOT, "results", "sweep", "qwen1.5b"),
}
GRID = os.path.join(ROOT, "results", "sweep", "protocol")  # 2026-12-02: declared precision, both bands
PROTOCOL_TF32 = {
  "SmolLM2-135M": os.path.join(GRID, "smollm2", "tf32"),
  "Qwen2.5-Coder-1.5B": os.path.join(GRID, "qwen1.5b", "tf32"),
  "Gemma-3-270M": os.path.join(GRID, "gemma3-270m", "tf32"),
}
PROTOCOL_F32 = {
  "SmolLM2-135M": os.path.join(GRID, "smollm2", "float32"),
  "Qwen2.5-Coder-1.5B": os.path.join(GRID, "qwen1.5b", "float32"),
  "Gemma-3-270M": os.path.join(GRID, "gemma3-270m", "float32"),
}
# (method, allocation) vs (method, allocation): WINA vs TEAL, what the transform does, what greedy does.
COMPARISONS = tuple(
  ((a, x), (b, y))
  for a, x, b, y in (
    ("wina", "uniform", "teal", "uniform"),
    ("wina-transform", "uniform", "wina", "uniform"),
    ("teal-transform", "uniform", "teal", "uniform"),
    ("wina-transform", "uniform", "teal", "uniform"),
    ("cats", "uniform", "teal", "uniform"),
    ("teal", "greedy", "teal", "uniform"),
    ("wina", "greedy", "teal", "greedy"),
    ("wina-transform", "greedy", "teal", "greedy"),
    ("wina-transform", "greedy", "wina-transform", "uniform"),
  )
)

CHECK = flags.DEFINE_bool("check", False, "Only check that docs/findings.md matches the results.")


def load_rows(path: str) -> list[dict]:
  with open(path) as f:
    rows = json.load(f)
  for r in rows:
    if all(t in r for t in INFORMATIVE):
      r["avg4"] = sum(r[t] for t in INFORMATIVE) / len(INFORMATIVE)
  return rows


def _pct(v: float) -> str:
  return f"{100 * v:.2f}"


def table(head: list[str], lines: list[list[str]]) -> str:
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  return "\n".join(out + ["| " + " | ".join(x) + " |" for x in lines]) + "\n"


def majority_rates(limit: int = 1000) -> dict[str, float]:
  """Per task: the share of the most frequent gold answer in the first `limit` rows (the data wheel)."""
  from collections import Counter

  from wina_jax.eval.tasks import load_task

  out = {}
  for t in TASKS:
    golds = [ex.gold for ex in load_task(t, limit)]
    out[t] = Counter(golds).most_common(1)[0][1] / len(golds)
  return out


def baselines_table(uniform: list[dict]) -> str:
  dense = next(r for r in uniform if r["method"] == "dense")
  maj = majority_rates()
  return table(
    ["task", "rows", "dense SmolLM2", "majority class", "informative (in avg4)"],
    [
      [t, str(dense[f"{t}/n"]), _pct(dense[t]), _pct(maj[t]), "yes" if t in INFORMATIVE else "no"]
      for t in TASKS
    ],
  )


def variants_table(rows: list[dict]) -> str:
  teal = {r["sparsity"]: r["ppl"] for r in rows if r["method"] == "teal"}
  lines = []
  for r in rows:
    rel = "" if r["method"] == "dense" else f"{100 * (r['ppl'] / teal[r['sparsity']] - 1):+.1f}%"
    lines.append(
      [
        r["method"],
        f"{100 * r['sparsity']:.0f}%",
        f"{100 * r['measured_sparsity']:.1f}%",
        f"{r['gflops']:.4f}",
        str(r.get("rotated_blocks", 0)),
        f"{r['ppl']:.2f}",
        rel,
        _pct(r["avg4"]),
        _pct(r["avg"]),
      ]
    )
  return table(
    [
      "variant",
      "target",
      "measured",
      "GFLOPs/token",
      "rotated blocks",
      "ppl",
      "ppl vs teal",
      "avg4",
      "avg (7 tasks)",
    ],
    lines,
  )


def greedy_table(uniform: list[dict], greedy: list[dict]) -> str:
  uni = {(r["method"], r["sparsity"]): r for r in uniform}
  lines = []
  for g in greedy:
    u = uni[(g["method"], g["sparsity"])]
    for alloc, r in (("uniform", u), ("greedy", g)):
      lines.append(
        [
          g["method"],
          f"{100 * g['sparsity']:.0f}%",
          alloc,
          f"{100 * r['measured_sparsity']:.1f}%",
          f"{r['ppl']:.2f}",
          _pct(r["avg4"]),
          _pct(r["avg"]),
        ]
      )
  return table(["method", "target", "allocation", "measured", "ppl", "avg4", "avg (7 tasks)"], lines)


def cpu_table(runs: dict[str, list[dict]]) -> str:
  """Perplexity per (mode-allocation, method, target); mode / allocation as columns to compare."""
  cells = {(run, r["method"], r["sparsity"]): r for run, rows in runs.items() for r in rows}
  keys = sorted({(m, s) for _, m, s in cells}, key=lambda k: (k[1], MAIN.index(k[0]) if k[0] in MAIN else 99))
  lines = []
  for m, s in keys:
    vals = [
      f"{cells[(run, m, s)]['ppl']:.2f} ({100 * cells[(run, m, s)]['measured_sparsity']:.1f}%)"
      if (run, m, s) in cells
      else "not run"
      for run in runs
    ]
    lines.append([m, f"{100 * s:.0f}%", *vals])
  return table(["method", "target", *[f"{run}: ppl (measured)" for run in runs]], lines)


def site_error_table(path: str, sparsity: str = "0.5") -> str:
  """Mean isolated relative output error per projection at `sparsity` (results/analysis/errors.csv)."""
  import csv
  from collections import defaultdict

  acc = defaultdict(list)
  with open(path) as f:
    for r in csv.DictReader(f):
      if r["mode"] == "isolated" and r["sparsity"] == sparsity:
        acc[(r["method"], r["proj"])].append(float(r["rel_actual"]))
  projs = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  methods = ("teal", "teal-transform", "wina", "wina-transform")
  return table(
    ["method", *projs], [[m, *(f"{sum(acc[(m, p)]) / len(acc[(m, p)]):.4f}" for p in projs)] for m in methods]
  )


def _acc_half_width(rows: list[dict], task_list: tuple) -> float:
  """95 % half-width (normal, binomial) of the mean accuracy over `task_list` of the difference of two
  methods scored on the same rows, as if they were independent (conservative: no per-row data to pair)."""
  var = sum(r[t] * (1 - r[t]) / r[f"{t}/n"] for r in rows for t in task_list) / len(task_list) ** 2
  return 1.96 * math.sqrt(var)


def h200_noise_table(
  uniform: list[dict], pairs=(("teal", "wina"), ("teal-transform", "wina-transform"))
) -> str:
  """Per target: b - a in perplexity (no band: no per-window NLLs were stored) and avg4 with its unpaired
  binomial 95 % interval, and whether 0 lies outside it."""
  cells = {(r["method"], r["sparsity"]): r for r in uniform}
  lines = []
  for a, b in pairs:
    for s in sorted({r["sparsity"] for r in uniform if r["method"] == b}):
      ra, rb = cells[(a, s)], cells[(b, s)]
      d, hw = rb["avg4"] - ra["avg4"], _acc_half_width([ra, rb], INFORMATIVE)
      lines.append(
        [
          f"{b} - {a}",
          f"{100 * s:.0f}%",
          f"{100 * (rb['ppl'] / ra['ppl'] - 1):+.1f}%",
          "none stored",
          f"{100 * d:+.2f} +- {100 * hw:.2f}",
          "outside" if abs(d) > hw else "within sampling noise",
        ]
      )
  return table(
    ["b - a", "target", "ppl (relative)", "ppl band", "avg4 points +- 95 % (unpaired)", "avg4"], lines
  )


def load_cells(run_dir: str) -> list[dict]:
  cells = []
  for p in sorted(glob.glob(os.path.join(run_dir, "cells", "*.json"))):
    with open(p) as f:
      cells.append(json.load(f))
  return cells


def cpu_noise_table(runs: dict[str, list[dict]]) -> str:
  """The paired comparisons of each CPU-grid run whose cells carry items (every method vs TEAL, and
  WINA-Transform vs TEAL-Transform), and which cells do not."""
  out = []
  for run, cells in runs.items():
    banded = [c for c in cells if "items" in c]
    missing = sorted(
      f"{c['row']['method']} @ {100 * c['row']['sparsity']:.0f}%" for c in cells if "items" not in c
    )
    rotated = [c for c in banded if c["row"]["method"] in ("teal-transform", "wina-transform")]
    tables = [
      report.comparison_table(banded, (), "teal"),
      report.comparison_table(rotated, (), "teal-transform"),
    ]
    comp = "\n".join(t for t in tables if t)  # vs TEAL; WINA- vs TEAL-Transform (statement 3)
    out.append(
      f"**{run}**"
      + (f" (no band yet: {', '.join(missing)})" if missing else "")
      + "\n\n"
      + (comp or "no cell with items yet.\n")
    )
  return "\n".join(out)


def recommended_table(uniform: list[dict]) -> str:
  lines = []
  for s, rec in sorted(R.RECOMMENDED.items()):
    picked = R.pick(uniform, s)
    lines.append(
      [
        f"{100 * s:.0f}%",
        picked,
        f"{rec.spec} ({rec.mode}, {rec.allocation})",
        "yes" if picked == rec.spec else "NO",
      ]
    )
  return table(["target", "rule's pick (H200 grid)", "wina_jax.eval.recommended", "agree"], lines)


def blocks(uniform: list[dict]) -> dict[str, str]:
  greedy = load_rows(os.path.join(H200, "threshold-greedy", "results.json"))
  cpu = {
    run: load_rows(os.path.join(CPU, run, "results.json"))
    for run in CPU_RUNS
    if os.path.exists(os.path.join(CPU, run, "results.json"))
  }
  cpu_cells = {
    run: load_cells(os.path.join(CPU, run)) for run in CPU_RUNS if os.path.isdir(os.path.join(CPU, run))
  }
  return {
    "main": report.markdown([r for r in uniform if r["method"] in MAIN], TASKS),
    "h200_noise": h200_noise_table(uniform),
    "cpu_noise": cpu_noise_table(cpu_cells),
    "baselines": baselines_table(uniform),
    "variants": variants_table(uniform),
    "greedy": greedy_table(uniform, greedy),
    "cpu_grid": cpu_table(cpu),
    "recommended": recommended_table(uniform),
    "site_errors": site_error_table(os.path.join(ROOT, "results", "analysis", "errors.csv")),
    **protocol_blocks(),
  }


def protocol_blocks() -> dict[str, str]:
  models = {name: protocol_cells(folder) for name, folder in PROTOCOL.items()}
  tf32 = {name: protocol_cells(folder) for name, folder in PROTOCOL_TF32.items()}
  f32 = {name: protocol_cells(folder) for name, folder in PROTOCOL_F32.items()}
  return {
    "protocol": protocol_table(models),
    "protocol_comparisons": comparison_table(models),
    "protocol_tf32": protocol_table(tf32),
    "protocol_tf32_comparisons": comparison_table(tf32),
    "precision_check": precision_table(tf32, f32),
  }


def precision_table(tf32: dict[str, dict], f32: dict[str, dict]) -> str:
  """Cells run at both precisions: perplexity and avg4 at each, and the WINA - TEAL perplexity change at
  each with its SE (the verdict check of a TF32 grid against float32)."""
  import numpy as np

  lines = []
  for name, cells in f32.items():
    for key in sorted(cells, key=lambda k: (k[2], k[0])):
      other = tf32[name].get(key)
      if other is None:
        continue
      row = [name, key[0], f"{100 * key[2]:.0f}%"]
      for c in (cells[key], other):
        row += [
          f"{math.exp(_mean_se(c['_items']['ppl_window_nll'])[0]):.4f}",
          f"{100 * _avg4_se(c['_items'])[0]:.2f}",
        ]
      if key[0] == "wina":
        for grid in (cells, tf32[name]):
          t = grid.get(("teal", key[1], key[2]))
          d, d_se = _mean_se(
            np.subtract(grid[key]["_items"]["ppl_window_nll"], t["_items"]["ppl_window_nll"])
          )
          row.append(f"{100 * np.expm1(d):+.1f}% ±{100 * d_se:.1f}")
      else:
        row += ["", ""]
      lines.append(row)
  return table(
    [
      "model",
      "method",
      "target",
      "ppl float32",
      "avg4 float32",
      "ppl tf32",
      "avg4 tf32",
      "wina - teal ppl float32",
      "wina - teal ppl tf32",
    ],
    lines,
  )


def protocol_cells(folder: str) -> dict[tuple[str, str, float], dict]:
  """{(method, allocation, target): row + '_items'} of the finished cells in folder/topk-{uniform,greedy}:
  the rows of results.json, each with the items of the cell file holding that very row."""
  out = {}
  for alloc in ("uniform", "greedy"):
    path = os.path.join(folder, f"topk-{alloc}")
    if not os.path.exists(os.path.join(path, "results.json")):
      continue
    cells = load_cells(path)
    for r in load_rows(os.path.join(path, "results.json")):
      match = [c for c in cells if c["row"] == {k: v for k, v in r.items() if k not in ("avg4", "bands")}]
      if not match:
        raise ValueError(f"{path}: no cell file holds the row of {r['method']} @ {r['sparsity']}")
      out[(r["method"], alloc, r["sparsity"])] = {**r, "_items": match[0]["items"]}
  return out


def _mean_se(x) -> tuple[float, float]:
  """Mean and its standard error (sample sd / sqrt(n))."""
  import numpy as np

  x = np.asarray(x, np.float64)
  return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def _avg4_se(items_a: dict, items_b: Optional[dict] = None) -> tuple[float, float]:
  """avg4 (or its paired difference a - b on the same rows) and its standard error: per task the mean
  of per-row correctness (differences), then the mean over tasks with SE sqrt(sum SE_t^2) / 4."""
  import numpy as np

  means, ses = [], []
  for t in INFORMATIVE:
    x = np.asarray(items_a[f"{t}/correct"], np.float64)
    if items_b is not None:
      x = x - np.asarray(items_b[f"{t}/correct"], np.float64)
    m, se = _mean_se(x)
    means.append(m)
    ses.append(se)
  return float(np.mean(means)), float(np.sqrt(np.sum(np.square(ses))) / len(INFORMATIVE))


def protocol_table(models: dict[str, dict]) -> str:
  """Every cell of the paper's protocol, per model: ppl +- SE (delta method over windows), per-task
  accuracy and avg4 +- SE."""
  lines = []
  for name, cells in models.items():
    order = sorted(cells, key=lambda k: (k[2], k[1] != "uniform", MAIN.index(k[0]) if k[0] in MAIN else 99))
    for key in order:
      r = cells[key]
      it = r["_items"]
      nll, nll_se = _mean_se(it["ppl_window_nll"])
      avg, avg_se = _avg4_se(it)
      accs = []
      for t in INFORMATIVE:
        m, se = _mean_se(it[f"{t}/correct"])
        accs.append(f"{100 * m:.1f} ±{100 * se:.1f}")
      lines.append(
        [
          name,
          key[0],
          f"{100 * key[2]:.0f}%",
          key[1],
          f"{100 * r['measured_sparsity']:.1f}%",
          f"{math.exp(nll):.3f} ±{math.exp(nll) * nll_se:.3f}",
          *accs,
          f"{100 * avg:.2f} ±{100 * avg_se:.2f}",
        ]
      )
  return table(
    ["model", "method", "target", "allocation", "measured", "ppl ±SE", *INFORMATIVE, "avg4 ±SE"], lines
  )


def comparison_table(models: dict[str, dict]) -> str:
  """Paired differences on the same windows and rows (`COMPARISONS`): the measured (parameter-weighted)
  sparsity of both sides (a comparison at unequal work says so), perplexity ratio - 1 and avg4 difference,
  each with its standard error; 'yes' where |difference| > 2 SE."""
  import numpy as np

  lines = []
  for name, cells in models.items():
    for s in sorted({k[2] for k in cells if k[2] > 0}):
      for a, b in COMPARISONS:
        ca, cb = cells.get((*a, s)), cells.get((*b, s))
        if ca is None or cb is None:
          continue
        d, d_se = _mean_se(np.subtract(ca["_items"]["ppl_window_nll"], cb["_items"]["ppl_window_nll"]))
        g, g_se = _avg4_se(ca["_items"], cb["_items"])
        lines.append(
          [
            name,
            f"{100 * s:.0f}%",
            f"{a[0]} ({a[1]}) vs {b[0]} ({b[1]})",
            f"{100 * ca['measured_sparsity']:.1f}% / {100 * cb['measured_sparsity']:.1f}%",
            f"{100 * np.expm1(d):+.1f}% ±{100 * d_se:.1f}",
            "yes" if abs(d) > 2 * d_se else "no",
            f"{100 * g:+.2f} ±{100 * g_se:.2f}",
            "yes" if abs(g) > 2 * g_se else "no",
          ]
        )
  return table(
    [
      "model",
      "target",
      "comparison",
      "measured sparsity",
      "ppl change ±SE",
      "beyond 2 SE",
      "avg4 change (points) ±SE",
      "beyond 2 SE",
    ],
    lines,
  )


def render(doc: str, generated: dict[str, str]) -> str:
  for name, text in generated.items():
    pat = re.compile(rf"(<!-- findings:{name} -->\n).*?(<!-- /findings:{name} -->)", re.S)
    if not pat.search(doc):
      raise ValueError(
        f"docs/findings.md lacks the markers <!-- findings:{name} --> ... <!-- /findings:{name} -->"
      )
    doc = pat.sub(lambda m: m.group(1) + text + m.group(2), doc)
  return doc


def plots(uniform: list[dict]) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  methods = list(dict.fromkeys(r["method"] for r in uniform if r["method"] != "dense"))
  dense = next(r for r in uniform if r["method"] == "dense")
  os.makedirs(FIGS, exist_ok=True)
  for name, xkey, xlabel in (
    ("quality_vs_sparsity", "measured_sparsity", "measured sparsity (%)"),
    ("pareto", "gflops", "GFLOPs per token (incl. shortcut rotations)"),
  ):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, ykey, ylabel in (
      (axes[0], "ppl", "held-out perplexity (log)"),
      (axes[1], "avg4", "avg4 accuracy (%)"),
    ):
      for m in methods:
        pts = sorted((r[xkey], r[ykey]) for r in uniform if r["method"] == m)
        scale = 100 if xkey == "measured_sparsity" else 1
        ax.plot(
          [scale * x for x, _ in pts],
          [y * (100 if ykey == "avg4" else 1) for _, y in pts],
          marker="o",
          ls="--" if "transform" in m else "-",
          label=m,
        )
      dx = 0 if xkey == "measured_sparsity" else dense[xkey]
      ax.plot([dx], [dense[ykey] * (100 if ykey == "avg4" else 1)], "k*", ms=12, label="dense")
      ax.set_xlabel(xlabel)
      ax.set_ylabel(ylabel)
      if ykey == "ppl":
        ax.set_yscale("log")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("SmolLM2-135M-Instruct, threshold mode, uniform allocation (H200 grid)")
    fig.tight_layout()
    fig.savefig(os.path.join(FIGS, f"{name}.png"), dpi=110)
    plt.close(fig)


def main(argv):
  del argv
  with open(DOC) as f:
    doc = f.read()
  uniform = load_rows(os.path.join(H200, "threshold-uniform", "results.json"))
  new = render(doc, blocks(uniform))
  if CHECK.value:
    if new != doc:
      print("docs/findings.md is out of date: run python -m experiments.quality.findings", file=sys.stderr)
      sys.exit(1)
    print("docs/findings.md matches the results")
    return
  report.write_atomic(DOC, new)
  plots(uniform)
  print(f"wrote {DOC} and {FIGS}/")


if __name__ == "__main__":
  app.run(main)

"""Sweep results -> a paper-style markdown table, CSV, JSON and PNG plots.

A row is a dict: method, sparsity (target), measured_sparsity, gflops, ppl, one column per task (the
task's reported metric, `wina_jax.eval.tasks.TASKS[t].metric`), and avg (mean over the tasks).
Rows come out in a fixed order (dense first, then by sparsity and the given method order), so the same
rows always give byte-identical files.

A sweep cell is {'row', 'items' (per-window NLLs, per-row correctness), 'numerics' {'eps', 'runs'}}
(`experiments/sweep.py`); `cell_bands` turns it into the row's 'bands' (`wina_jax.eval.bands`): per metric
(ppl, each task, avg) the 95 % bootstrap interval and the spread over the unperturbed run and its
perturbed re-runs. The table prints them as `value [lo, hi] ~[min, max]`; `comparison_table` gives each
method's difference from a reference method at the same sparsity with its verdict.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence

from wina_jax.eval import bands as B
from wina_jax.eval.tasks import TASKS

LEGEND = (
  "value [lo, hi] ~[min, max]: [lo, hi] is the 95 % bootstrap interval over windows (perplexity) or "
  "rows (tasks); ~[min, max] the range over the run and its re-runs with every weight multiplied by "
  "(1 +- eps), random signs (numerics).\n\n"
)


def write_atomic(path: str, text: str) -> None:
  """Write `text` to `path` via a temporary file and os.replace (never a half-written file)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def columns(tasks: Sequence[str]) -> list[str]:
  return ["method", "sparsity", "measured_sparsity", "gflops", "ppl", *tasks, "avg"]


def _fmt(key: str, v) -> str:
  if isinstance(v, str):
    return v
  if key in TASKS or key == "avg":
    return f"{100 * v:.2f}"
  if key in ("sparsity", "measured_sparsity"):
    return f"{100 * v:.1f}%"
  return f"{v:.4g}" if key == "gflops" else f"{v:.3f}"


def _fmt_pair(key: str, pair, signed: bool = False) -> str:
  f = (
    (lambda v: f"{100 * v:+.2f}")
    if key != "ppl" and signed
    else (lambda v: f"{v:+.3f}")
    if signed
    else (lambda v: _fmt(key, v))
  )
  return f"[{f(pair[0])}, {f(pair[1])}]"


def _fmt_banded(key: str, r: dict) -> str:
  """A value with its bands where the row has them (`cell_bands`)."""
  text = _fmt(key, r[key])
  band = r.get("bands", {}).get(key)
  if band:
    text += " " + _fmt_pair(key, band["sampling"])
    if band["numerics"]:
      text += " ~" + _fmt_pair(key, (band["numerics"]["min"], band["numerics"]["max"]))
  return text


def markdown(rows: Sequence[dict], tasks: Sequence[str]) -> str:
  """The table: tasks in %, (acc_norm) marked where the task reports it; bands next to each value of the
  rows that carry them (`cell_bands`)."""
  head = [c if c not in TASKS else f"{c} ({TASKS[c].metric})" for c in columns(tasks)]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(_fmt_banded(c, r) for c in columns(tasks)) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def _runs(cell: dict, key: str, tasks: Sequence[str]) -> list[float]:
  """The metric over the unperturbed run and each perturbed re-run that scored it (avg recomputed from the
  tasks; re-runs may be perplexity only)."""
  runs = [cell["row"], *cell.get("numerics", {}).get("runs", [])]
  if key == "avg":
    return [sum(r[t] for t in tasks) / len(tasks) for r in runs if all(t in r for t in tasks)]
  return [r[key] for r in runs if key in r]


def _items(cell: dict, key: str) -> list:
  """Per-window mean NLLs (key 'ppl') or a task's per-row correctness of a sweep cell."""
  return cell["items"]["ppl_window_nll" if key == "ppl" else f"{key}/correct"]


def _compare_input(cell: dict, key: str, tasks: Sequence[str]) -> dict:
  """`bands.compare`'s input for one metric (ppl or a task) of one cell; 'runs' only with perturbed runs.
  Windows all have the sweep's length, so each weighs one token-count unit."""
  runs = _runs(cell, key, tasks)
  out = {"values": _items(cell, key), **({"runs": runs} if len(runs) > 1 else {})}
  if key == "ppl":
    out["tokens"] = [1] * len(out["values"])
  return out


def cell_bands(cell: dict, tasks: Sequence[str]) -> dict:
  """{metric: {'sampling': (lo, hi), 'numerics': `bands.numerics_band` or None}} for ppl, each task and avg
  of a sweep cell; {} for a cell without items (stored before bands existed)."""
  if "items" not in cell:
    return {}
  out = {}
  for key in ("ppl", *tasks, *(("avg",) if tasks else ())):
    if key == "ppl":
      sampling = B.bootstrap_ppl(_items(cell, "ppl"), [1] * len(_items(cell, "ppl")))
    elif key == "avg":
      sampling = B.bootstrap_avg([_items(cell, t) for t in tasks])
    else:
      sampling = B.bootstrap_mean(_items(cell, key))
    runs = _runs(cell, key, tasks)
    out[key] = {"sampling": sampling, "numerics": B.numerics_band(runs) if len(runs) > 1 else None}
  return out


def banded_rows(cells: Sequence[dict], tasks: Sequence[str]) -> list[dict]:
  """Each cell's row with its 'bands' (where the cell has items)."""
  out = []
  for c in cells:
    b = cell_bands(c, tasks)
    out.append({**c["row"], **({"bands": b} if b else {})})
  return out


def comparison_table(cells: Sequence[dict], tasks: Sequence[str], ref: str) -> str:
  """Markdown: per sparsity, every method's difference from `ref` (and `ref`'s from dense) on ppl and each
  task: b - a [paired 95 % bootstrap] ~[numerics range of the difference], and the verdict (real only
  outside both). '' when no pair has items."""
  by = {(c["row"]["method"], c["row"]["sparsity"]): c for c in cells if "items" in c}
  pairs = []
  for m, s in by:
    if m == ref and ("dense", 0.0) in by:
      pairs.append((("dense", 0.0), (m, s)))
    elif m not in (ref, "dense") and (ref, s) in by:
      pairs.append(((ref, s), (m, s)))
  if not pairs:
    return ""
  keys = ("ppl", *tasks)
  head = ["sparsity", "b", "a", *[f"{k}: b - a" for k in keys]]
  lines = []
  for a, b in sorted(pairs, key=lambda p: (p[1][1], p[1][0] != ref)):
    row = [f"{100 * b[1]:.0f}%", b[0], a[0]]
    for k in keys:
      c = B.compare(_compare_input(by[a], k, tasks), _compare_input(by[b], k, tasks))
      d = f"{c.diff:+.3f}" if k == "ppl" else f"{100 * c.diff:+.2f}"
      num = f" ~{_fmt_pair(k, c.numerics, signed=True)}" if c.numerics else ""
      row.append(f"{d} {_fmt_pair(k, c.sampling, signed=True)}{num} **{c.verdict}**")
    lines.append(row)
  out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  return "\n".join(out + ["| " + " | ".join(x) + " |" for x in lines]) + "\n"


def to_csv(rows: Sequence[dict], tasks: Sequence[str]) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, columns(tasks), extrasaction="ignore", lineterminator="\n")
  w.writeheader()
  w.writerows(rows)
  return buf.getvalue()


LOG_SPAN = 20.0  # a panel whose values span more than this factor gets a log y axis


def wants_log(values: Sequence[float]) -> bool:
  """Whether a panel of `values` needs a log axis: all positive and spanning more than LOG_SPAN x."""
  return bool(values) and min(values) > 0 and max(values) > LOG_SPAN * min(values)


def plot(rows: Sequence[dict], tasks: Sequence[str], path: str, key_label: Sequence[tuple[str, str]]) -> None:
  """One PNG with a panel per (key, label): that value vs measured (parameter-weighted) sparsity, a line
  per method, so methods compare at equal work (CATS masks only the MLP activation and lands far below its
  target); dense is drawn as a horizontal line; a panel spanning more than LOG_SPAN x is drawn on a log
  axis."""
  import matplotlib.pyplot as plt

  n = len(key_label)
  cols = min(n, 4)
  fig, axes = plt.subplots(
    (n + cols - 1) // cols, cols, figsize=(4 * cols, 3.2 * ((n + cols - 1) // cols)), squeeze=False
  )
  methods = list(dict.fromkeys(r["method"] for r in rows))
  for ax, (key, label) in zip(axes.flat, key_label):
    for m in methods:
      pts = sorted((r["measured_sparsity"], r[key]) for r in rows if r["method"] == m)
      if m == "dense":
        ax.axhline(pts[0][1], color="k", ls="--", lw=1, label="dense")
      else:
        ax.plot([100 * s for s, _ in pts], [v for _, v in pts], marker="o", label=m)
    wide = wants_log([r[key] for r in rows if r.get(key) is not None])
    if wide:  # e.g. a collapsed variant's perplexity beside the rest: a linear axis flattens the others
      ax.set_yscale("log")
    ax.set_title(label + (" (log scale)" if wide else ""))
    ax.set_xlabel("measured sparsity (%, parameter-weighted)")
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def continuations(cells: Sequence[dict]) -> str:
  """Markdown list of each cell's greedy continuation ('' when none has one)."""
  lines = [
    f"- {c['row']['method']} @ {100 * c['row']['sparsity']:.0f}%: {c['continuation']['prompt']!r} -> "
    f"{c['continuation']['text']!r}"
    for c in cells
    if "continuation" in c
  ]
  return "\n".join(lines) + "\n" if lines else ""


def write_all(
  cells: Sequence[dict], tasks: Sequence[str], out: str, header: str = "", compare_to: str = "teal"
) -> str:
  """table.md (bands, comparisons with `compare_to`, continuations), results.csv, results.json (rows with
  bands), accuracy.png and perplexity.png under `out`, from sweep cells; returns table.md's text."""
  rows = banded_rows(cells, tasks)
  text = header + (LEGEND if any("bands" in r for r in rows) else "") + markdown(rows, tasks)
  comp = comparison_table(cells, tasks, compare_to)
  if comp:
    text += (
      f"\nDifferences b - a on the same windows / rows ({compare_to} vs the other methods at each "
      f"sparsity, dense vs {compare_to}): value [paired 95 % bootstrap] ~[numerics range]; real only "
      f"when 0 lies outside both.\n\n" + comp
    )
  cont = continuations(cells)
  if cont:
    text += "\nGreedy continuations (prompt run dense, every new token sparse):\n\n" + cont
  write_atomic(os.path.join(out, "table.md"), text)
  write_atomic(os.path.join(out, "results.csv"), to_csv(rows, tasks))
  write_atomic(os.path.join(out, "results.json"), json.dumps(list(rows), indent=1, sort_keys=True) + "\n")
  plot(
    rows,
    tasks,
    os.path.join(out, "accuracy.png"),
    [("avg", "average accuracy")] + [(t, f"{t} ({TASKS[t].metric})") for t in tasks],
  )
  plot(rows, tasks, os.path.join(out, "perplexity.png"), [("ppl", "perplexity (held-out BoolQ)")])
  return text

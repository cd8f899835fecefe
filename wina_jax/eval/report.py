"""Sweep results -> a paper-style markdown table, CSV, JSON and PNG plots.

A row is a dict: method, sparsity (target), measured_sparsity, gflops, ppl, one column per task (the
task's reported metric, `wina_jax.eval.tasks.TASKS[t].metric`), and avg (mean over the tasks).
Rows come out in a fixed order (dense first, then by sparsity and the given method order), so the same
rows always give byte-identical files.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Sequence

from wina_jax.eval.tasks import TASKS


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


def markdown(rows: Sequence[dict], tasks: Sequence[str]) -> str:
  """The table: tasks in %, (acc_norm) marked where the task reports it."""
  head = [c if c not in TASKS else f"{c} ({TASKS[c].metric})" for c in columns(tasks)]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(_fmt(c, r[c]) for c in columns(tasks)) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[dict], tasks: Sequence[str]) -> str:
  buf = io.StringIO()
  w = csv.DictWriter(buf, columns(tasks), extrasaction="ignore", lineterminator="\n")
  w.writeheader()
  w.writerows(rows)
  return buf.getvalue()


def plot(rows: Sequence[dict], tasks: Sequence[str], path: str, key_label: Sequence[tuple[str, str]]) -> None:
  """One PNG with a panel per (key, label): that value vs target sparsity, a line per method; dense
  is drawn as a horizontal line."""
  import matplotlib.pyplot as plt
  n = len(key_label)
  cols = min(n, 4)
  fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4 * cols, 3.2 * ((n + cols - 1) // cols)),
                           squeeze=False)
  methods = list(dict.fromkeys(r["method"] for r in rows))
  for ax, (key, label) in zip(axes.flat, key_label):
    for m in methods:
      pts = sorted((r["sparsity"], r[key]) for r in rows if r["method"] == m)
      if m == "dense":
        ax.axhline(pts[0][1], color="k", ls="--", lw=1, label="dense")
      else:
        ax.plot([100 * s for s, _ in pts], [v for _, v in pts], marker="o", label=m)
    ax.set_title(label)
    ax.set_xlabel("target sparsity (%)")
  for ax in list(axes.flat)[n:]:
    ax.axis("off")
  axes.flat[0].legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def write_all(rows: Sequence[dict], tasks: Sequence[str], out: str, header: str = "") -> None:
  """table.md, results.csv, results.json, accuracy.png and perplexity.png under `out`."""
  write_atomic(os.path.join(out, "table.md"), header + markdown(rows, tasks))
  write_atomic(os.path.join(out, "results.csv"), to_csv(rows, tasks))
  write_atomic(os.path.join(out, "results.json"), json.dumps(list(rows), indent=1, sort_keys=True) + "\n")
  plot(rows, tasks, os.path.join(out, "accuracy.png"),
       [("avg", "average accuracy")] + [(t, f"{t} ({TASKS[t].metric})") for t in tasks])
  plot(rows, tasks, os.path.join(out, "perplexity.png"), [("ppl", "perplexity (held-out BoolQ)")])

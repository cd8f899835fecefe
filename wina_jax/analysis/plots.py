"""PNG plots of analysis rows (dicts with mode, method, sparsity, layer, proj and the error columns)."""

from __future__ import annotations

import matplotlib.pyplot as plt

_FLOOR = 1e-16  # log axes: round-off-level errors are drawn at this floor


def _select(rows: list[dict], **match) -> list[dict]:
  return [r for r in rows if all(r[k] == v for k, v in match.items())]


def error_per_layer(rows: list[dict], mode: str, sparsity: float, column: str, path: str) -> None:
  """One panel per projection: `column` against layer, a line per method, at one mode and sparsity
  (exact zeros, e.g. CATS outside down_proj in isolated mode, are not drawn)."""
  sel = [r for r in _select(rows, mode=mode, sparsity=sparsity) if r[column] > 0]  # skip exact zeros
  projs = list(dict.fromkeys(r["proj"] for r in sel))
  methods = list(dict.fromkeys(r["method"] for r in sel))
  cols = min(4, len(projs))
  nrows = -(-len(projs) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.0 * nrows), sharey=True, squeeze=False)
  for ax, proj in zip(axes.flat, projs):
    for m in methods:
      pts = sorted(
        (r["layer"], max(r[column], _FLOOR)) for r in sel if r["proj"] == proj and r["method"] == m
      )
      if pts:
        ax.plot(*zip(*pts), marker=".", label=m)
    ax.set_title(proj)
    ax.set_xlabel("layer")
    ax.set_yscale("log")
  for ax in list(axes.flat)[len(projs) :]:
    ax.axis("off")
  for row in axes:
    row[0].set_ylabel(f"{column} ({mode})")
  handles = {l: h for ax in axes.flat for h, l in zip(*ax.get_legend_handles_labels())}
  axes.flat[0].legend(handles.values(), handles.keys(), fontsize=7)
  fig.suptitle(f"{column} per layer, {mode} mode, sparsity {sparsity}")
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def bound_vs_actual(rows: list[dict], mode: str, methods: list[str], path: str) -> None:
  """Per method: Lemma 3.1 value (x) against the actual relative error (y), every site and sparsity."""
  fig, axes = plt.subplots(1, len(methods), figsize=(3.6 * len(methods), 3.6), squeeze=False)
  for ax, m in zip(axes[0], methods):
    sel = _select(rows, mode=mode, method=m)
    for proj in dict.fromkeys(r["proj"] for r in sel):
      pts = [(max(r["rel_lemma"], _FLOOR), max(r["rel_actual"], _FLOOR)) for r in sel if r["proj"] == proj]
      ax.scatter(*zip(*pts), s=6, label=proj)
    lo = min(min(r["rel_lemma"], r["rel_actual"]) for r in sel)
    hi = max(max(r["rel_lemma"], r["rel_actual"]) for r in sel)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title(m)
    ax.set_xlabel("Lemma 3.1 value (relative)")
  axes[0][0].set_ylabel(f"actual relative error ({mode})")
  axes[0][-1].legend(fontsize=7, markerscale=2)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def kl_vs_sparsity(kl_rows: list[dict], path: str) -> None:
  """Final-logit KL to dense against sparsity, a line per method (rows: method, sparsity, kl)."""
  fig, ax = plt.subplots(figsize=(4.5, 3.4))
  for m in dict.fromkeys(r["method"] for r in kl_rows):
    pts = sorted((r["sparsity"], r["kl"]) for r in kl_rows if r["method"] == m)
    ax.plot(*zip(*pts), marker="o", label=m)
  ax.set_xlabel("sparsity")
  ax.set_ylabel("KL(dense || sparse), nats/token")
  ax.set_yscale("log")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)

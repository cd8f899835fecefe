"""The fit behind `experiments/decode/decode_ceiling.py`: step time vs kept linear weight bytes of
`bench_decode` rows, the sparse kernels' rate, the step's fixed part and the ceilings (see that script)."""

from __future__ import annotations

from typing import Optional

import numpy as np


def copy_bound_x(fit: dict, sparsity):
  """Speed-up bound of any per-site kernel: dense / (rest + kept linear bytes at the copy rate); `fit` is
  a row of `analyse` with a rest and a copy bandwidth, sparsity a number or an array."""
  return fit["dense_ms"] / (fit["rest_ms"] + (1 - sparsity) * fit["linear_gb"] / fit["copy_gb_per_s"] * 1e3)


def analyse(
  rows: list[dict], method: str, targets: dict[float, float], copy_gb_per_s: Optional[float] = None
) -> list[dict]:
  """Per model in `rows` (bench_decode rows of one run): the fit and the ceilings of `method` at
  batch 1; `copy_gb_per_s` (the run's copy bandwidth) adds the copy-rate bound."""
  out = []
  att = lambda r: r.get("attention", "xla")  # runs before 2026-12-01 timed XLA attention only
  for model, attention in sorted({(r["model"], att(r)) for r in rows}):
    every = [r for r in rows if r["model"] == model and r["batch"] == 1]
    dense = min(r["ms_per_step"] for r in every if r["variant"] in ("dense", "dense_unfused"))
    one = [r for r in every if att(r) == attention]
    pts = sorted(
      (r["sparsity"], r["kept_weight_fraction"], r["ms_per_step"], r["bytes_per_step"])
      for r in one
      if r["variant"] == method
    )
    full = next((r["bytes_per_step"] for r in one if r["variant"] == "dense"), None)
    partial = [(k, by) for _, k, _, by in pts if k < 0.999]
    if len(pts) < 2 or full is None or not partial:
      continue
    k, by = partial[0]
    linear = (full - by) / (1 - k)  # bytes of all linear sites' weights
    kept = np.array([p[1] for p in pts]) * linear / 1e9  # GB of kept weights per step
    ms = np.array([p[2] for p in pts])
    b, a = np.polyfit(kept, ms, 1)
    rest = next((r["ms_per_step"] for r in one if r["variant"] == "no_linear"), None)
    row = {
      "model": model,
      "attention": attention,
      "method": method,
      "dense_ms": dense,
      "intercept_ms": float(a),
      "marginal_tb_per_s": float(1 / b) if b > 0 else None,
      "fit_max_err_ms": float(np.max(np.abs(a + b * kept - ms))),
      "rest_ms": rest,
      "targets": {},
      "ms_per_gb": float(b),
      "linear_gb": float(linear / 1e9),
      "copy_gb_per_s": copy_gb_per_s,
      "measured": [(float(p[0]), float(dense / p[2])) for p in pts],
    }
    if rest is not None:
      row["fixed_ms"] = float(a - rest)
    for s, goal in targets.items():
      gb = (1 - s) * linear / 1e9
      measured = next((p[2] for p in pts if abs(p[0] - s) < 1e-6), None)
      t = {
        "measured_x": dense / measured if measured else None,
        "target_x": goal,
        "intercept_needed_ms": float(dense / goal - b * gb),
      }
      if rest is not None:
        t["ceiling_x"] = float(dense / (rest + b * gb))
        if copy_gb_per_s:
          t["copy_bound_x"] = float(copy_bound_x(row, s))
      row["targets"][str(s)] = t
    out.append(row)
  return out


def plot(fits: list[dict], targets: dict[float, float], path: str) -> None:
  """One panel per model: measured speedup over dense vs sparsity per method, the bound of any per-site
  kernel dense / (R + kept bytes at the copy rate) where a `no_linear` row gave R, and the targets."""
  from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend (e.g. a notebook's) alone

  models = sorted({r["model"] for r in fits})
  fig = Figure(figsize=(5 * len(models), 3.8))
  axes = fig.subplots(1, len(models), squeeze=False)
  s = np.linspace(0, 0.9, 46)
  for ax, model in zip(axes[0], models):
    mine = [r for r in fits if r["model"] == model]
    for i, r in enumerate(mine):
      xs, ys = zip(*r["measured"])
      att = "" if r.get("attention", "xla") == "xla" else f", {r['attention']} attention"
      ax.plot(xs, ys, "o-", color=f"C{i}", label=f"{r['method']}{att} measured")
    r = next((r for r in mine if r["rest_ms"] is not None and r["copy_gb_per_s"]), None)
    if r is not None:  # the same for every method: rest + kept bytes at the copy rate
      ax.plot(s, copy_bound_x(r, s), "k:", label="bound of any per-site kernel")
    ax.plot(list(targets), list(targets.values()), "k*", markersize=12, label="targets")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set(title=model, xlabel="sparsity", ylabel="x our dense (batch 1)")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)

"""Layer-by-layer error analysis: actual error vs WINA's Lemma 3.1 value, isolated and propagated.

  python -m experiments.quality.analyze_errors                     # SmolLM2, 4 x 128 BoolQ tokens -> results/analysis
  python -m experiments.quality.analyze_errors --layers=3 --windows=1 --seq_len=32 --out=/tmp/analysis   # smoke
  python -m experiments.quality.analyze_errors --replot            # redraw the PNGs from the CSVs

For each method ('<m>-transform' runs <m> on the WINA-transformed params), sparsity, mode and linear
site: the relative output error, Lemma 3.1's value, their gap, the kernel's column-orthogonality defect
and (propagated mode) the drift against the dense model; the final-logit KL per method and sparsity;
the transform's shortcut cost. Writes errors.csv, kl.csv, summary.json, PNG plots and README.md.
"""

from __future__ import annotations

import csv
import json
import os

import jax.numpy as jnp
from absl import app, flags
from tqdm.auto import tqdm

from experiments import common
from wina_jax import analysis, checks, families, sparsity
from wina_jax import sites as S
from wina_jax.analysis import plots
from wina_jax.convert import load
from wina_jax.data.text import load_texts, token_windows
from wina_jax.tokenizer import load_tokenizer
from wina_jax.transform import shortcut_cost, transform

MODEL = common.check(
  flags.DEFINE_string("model", "smollm2-135m", "Name in wina_jax.assets.MODELS, GGUF file or HF folder."),
  common.MODEL_RULE,
)
TEXT = common.check(
  flags.DEFINE_string("text", "boolq:heldout", "'boolq:heldout', 'boolq:calibration' or a text file."),
  checks.text(),
)
SEQ_LEN = common.check(flags.DEFINE_integer("seq_len", 128, "Window length."), checks.count(2))
WINDOWS = common.check(flags.DEFINE_integer("windows", 4, "Number of windows (one batch)."), checks.count())
LAYERS = common.check(
  flags.DEFINE_integer("layers", 0, "Keep only the first N layers (0 = all; for smoke runs)."),
  checks.count(0),
)
METHODS = common.methods_flag(["dense", "teal", "teal-transform", "wina", "wina-transform", "cats"])
SPARSITIES = common.sparsities_flag()
MODES = flags.DEFINE_list("modes", ["isolated", "propagated"], "Analysis modes.")
BASIS = flags.DEFINE_enum("basis", "svd", ["svd", "axis"], "Null-space basis of the transform (bases.py).")
OUT = common.check(flags.DEFINE_string("out", "results/analysis", "Output folder."), checks.out_path())
REPLOT = flags.DEFINE_bool("replot", False, "Only redraw the PNGs from <out>/errors.csv and kl.csv.")

SUFFIX = "-transform"
KEY_PROJS = families.key_projections()  # sites the transform orthogonalises
FLOOR = 1e-10  # relative squared errors below this are float32 round-off (GQA k_proj: WINA drops zero rows)


def truncate(params: dict, cfg, layers: int):
  if not layers or layers >= cfg.num_hidden_layers:
    return params, cfg
  return {**params, "layers": {str(i): params["layers"][str(i)] for i in range(layers)}}, cfg.replace(
    num_hidden_layers=layers
  )


def cells(methods: list[str], sparsities: list[float]) -> list[tuple[str, float]]:
  return [(m, 0.0 if m == "dense" else s) for m in methods for s in ([0.0] if m == "dense" else sparsities)]


def checks(rows: list[dict]) -> dict:
  """Isolated mode at the orthogonalised sites: WINA-transform vs TEAL (transformed and original) and
  the largest |actual - lemma| / max(actual, FLOOR) of WINA-transform, per sparsity; `lossless_sites`
  counts sites where WINA's error is below FLOOR."""
  out = {}
  iso = [r for r in rows if r["mode"] == "isolated" and r["proj"] in KEY_PROJS]
  by = {(r["method"], r["sparsity"], r["site"]): r for r in iso}
  for s in sorted({r["sparsity"] for r in iso if r["method"] == "wina" + SUFFIX}):
    wina = [r for r in iso if r["method"] == "wina" + SUFFIX and r["sparsity"] == s]
    gaps = [abs(r["gap"]) / max(r["rel_actual"], FLOOR) for r in wina]
    entry = {
      "sites": len(wina),
      "max_rel_gap": max(gaps),
      "lossless_sites": sum(r["rel_actual"] < FLOOR for r in wina),
    }
    for teal in ("teal", "teal" + SUFFIX):
      other = [(r, by.get((teal, s, r["site"]))) for r in wina]
      if all(o is not None for _, o in other):
        entry[f"wina_le_{teal}"] = sum(r["rel_actual"] <= o["rel_actual"] for r, o in other)
        entry[f"mean_ratio_to_{teal}"] = sum(r["rel_actual"] / o["rel_actual"] for r, o in other) / len(other)
    out[str(s)] = entry
  return out


def write_csv(path: str, rows: list[dict]) -> None:
  """Rows as CSV, floats to 6 significant digits."""
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    w.writeheader()
    w.writerows([{k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows])


def readme(summary: dict) -> str:
  """README.md: the command, the declared numerics, the shortcut cost, WINA vs TEAL at the orthogonalised
  sites, and the KL table."""
  c = summary["shortcut_cost"]
  lines = [
    "# Layer-by-layer error analysis",
    "",
    "Produced by:",
    "",
    "```",
    summary["command"],
    "```",
    "",
    "Declared numerics: " + ", ".join(f"{k} `{v}`" for k, v in summary["declared_numerics"].items()) + ".",
    "",
    f"Tokens {summary['tokens']}, layers {summary['layers']}. Files: errors.csv (one row per mode, method,",
    "sparsity and linear site), kl.csv, summary.json, error_per_layer_*.png (isolated: actual error;",
    "propagated: drift against the dense model), bound_vs_actual.png, kl_vs_sparsity.png.",
    "",
    f"Shortcut rotations: {c['shortcuts']} of d x d, {c['flops']:,} FLOPs/token "
    f"({100 * c['flops_frac']:.2f}% of the linear layers), {c['bytes']:,} bytes "
    f"({100 * c['bytes_frac']:.2f}% of the transformed params); untying adds {c['untie_bytes']:,} bytes.",
    "",
    "Isolated mode at the orthogonalised sites (k_proj, gate_proj): WINA on the transformed model.",
    "",
    f"Errors below {FLOOR:g} are float32 round-off: at GQA k_proj (rank < d) the transformed kernel has",
    "d - rank zero rows, which WINA drops first, so WINA is lossless there up to sparsity 1 - rank / d.",
    "",
    "| sparsity | sites | lossless sites | max abs(actual - lemma) / max(actual, floor) "
    "| WINA <= TEAL-transform | mean WINA / TEAL-transform | WINA <= TEAL (original) "
    "| mean WINA / TEAL (original) |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for s, e in summary["isolated_checks"].items():
    lines.append(
      f"| {s} | {e['sites']} | {e['lossless_sites']} | {e['max_rel_gap']:.2e} | "
      f"{e.get('wina_le_teal' + SUFFIX, '-')} | "
      f"{e.get('mean_ratio_to_teal' + SUFFIX, float('nan')):.3f} | {e.get('wina_le_teal', '-')} | "
      f"{e.get('mean_ratio_to_teal', float('nan')):.3f} |"
    )
  lines += [
    "",
    "Final-logit KL(dense || sparse), nats/token (propagated mode):",
    "",
    "| method | " + " | ".join(str(s) for s in sorted({r["sparsity"] for r in summary["kl"]})) + " |",
  ]
  sps = sorted({r["sparsity"] for r in summary["kl"]})
  lines.append("|---" * (len(sps) + 1) + "|")
  for m in dict.fromkeys(r["method"] for r in summary["kl"]):
    vals = {r["sparsity"]: r["kl"] for r in summary["kl"] if r["method"] == m}
    lines.append(f"| {m} | " + " | ".join(f"{vals[s]:.4f}" if s in vals else "" for s in sps) + " |")
  return "\n".join(lines) + "\n"


def read_csv(path: str) -> list[dict]:
  """Rows written by `write_csv`, numbers parsed back (empty cells dropped)."""

  def parse(v: str):
    for cast in (int, float):
      try:
        return cast(v)
      except ValueError:
        pass
    return v

  with open(path, newline="") as f:
    return [{k: parse(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def draw(rows: list[dict], kl_rows: list[dict], out: str) -> None:
  """Every PNG: error per layer (isolated: actual; propagated: drift) per sparsity, bound vs actual, KL."""
  modes = {r["mode"] for r in rows}
  for s in sorted({r["sparsity"] for r in rows if r["sparsity"] > 0}):
    for mode, column in (("isolated", "rel_actual"), ("propagated", "rel_drift")):
      if mode in modes:
        plots.error_per_layer(rows, mode, s, column, os.path.join(out, f"error_per_layer_{mode}_s{s}.png"))
  if "isolated" in modes:
    shown = [m for m in dict.fromkeys(r["method"] for r in rows) if m not in ("dense", "cats")]
    plots.bound_vs_actual(rows, "isolated", shown, os.path.join(out, "bound_vs_actual.png"))
  if kl_rows:
    plots.kl_vs_sparsity([r for r in kl_rows if r["kl"] > 0], os.path.join(out, "kl_vs_sparsity.png"))


def main(_):
  declared = common.setup("float32")  # `load`'s params are float32
  out = OUT.value
  if REPLOT.value:
    draw(read_csv(os.path.join(out, "errors.csv")), read_csv(os.path.join(out, "kl.csv")), out)
    return
  common.preflight(MODEL.value, SEQ_LEN.value, forward=(WINDOWS.value, "--windows"))
  os.makedirs(out, exist_ok=True)
  params, cfg = truncate(*load(MODEL.value), LAYERS.value)
  tparams, tcfg = transform(params, cfg, basis=BASIS.value)
  models = {"": (params, cfg), SUFFIX: (tparams, tcfg)}
  tok = load_tokenizer(MODEL.value)
  tokens = jnp.asarray(token_windows(tok, load_texts(TEXT.value), SEQ_LEN.value, WINDOWS.value))
  dense = {k: analysis.dense_run(p, c, tokens) for k, (p, c) in models.items()}
  defects = {k: analysis.orthogonality_defects(p, c) for k, (p, c) in models.items()}
  rows, kl_rows = [], []
  todo = cells(METHODS.value, [float(s) for s in SPARSITIES.value])
  for method, s in tqdm(todo, desc="method x sparsity"):
    base, suffix = (method[: -len(SUFFIX)], SUFFIX) if method.endswith(SUFFIX) else (method, "")
    p, c = models[suffix]
    sp = sparsity.make(base, p, c, s)
    for mode in MODES.value:
      if mode == "isolated":
        errs = analysis.isolated(p, c, dense[suffix], sp)
      elif mode == "propagated":
        errs, kl = analysis.propagated(p, c, tokens, dense[suffix], sp)
        kl_rows.append({"method": method, "sparsity": s, "kl": kl})
      else:
        raise ValueError(f"unknown mode {mode!r}; choose from isolated, propagated")
      for site, e in errs.items():
        layer, block, proj = S.parse_site(site)
        rows.append(
          {
            "mode": mode,
            "method": method,
            "sparsity": s,
            "site": site,
            "layer": layer,
            "block": block,
            "proj": proj,
            "defect": defects[suffix][site],
            **e,
          }
        )
  write_csv(os.path.join(out, "errors.csv"), rows)
  write_csv(os.path.join(out, "kl.csv"), kl_rows)
  projs = S.block_sites(cfg, "self_attn") + S.block_sites(cfg, "mlp")
  summary = {
    "command": common.command_line("experiments.quality.analyze_errors"),
    "tokens": list(tokens.shape),
    "layers": cfg.num_hidden_layers,
    "declared_numerics": declared,
    "shortcut_cost": shortcut_cost(tparams, tcfg, cfg),
    "isolated_checks": checks(rows),
    "kl": kl_rows,
    "max_defect": {
      k or "original": {pr: max(v for site, v in d.items() if site.endswith(pr)) for pr in projs}
      for k, d in defects.items()
    },
  }
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  draw(rows, kl_rows, out)
  with open(os.path.join(out, "README.md"), "w") as f:
    f.write(readme(summary))
  print(readme(summary))


if __name__ == "__main__":
  app.run(main)

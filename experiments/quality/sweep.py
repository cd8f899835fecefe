"""The main job: a sparsity sweep of methods x target sparsities on perplexity, zero-shot tasks and FLOPs.

  python -m experiments.quality.sweep --quick                      # CPU demo: 3 cells, 8 rows per task
  python -m experiments.quality.sweep --limit=200 --methods=dense,teal,wina --sparsities=0.5
  python -m experiments.quality.sweep --out=results/sweep/full --batch_tokens=65536 --ppl_windows=128  # GPU

Each cell (method, sparsity) is written atomically to <out>/cells/ as it completes; a restarted sweep
with the same flags skips finished cells and ends with the same table.md / results.csv / results.json /
accuracy.png / perplexity.png. Cells are keyed by every flag that changes their numbers, so a changed
setting recomputes instead of mixing results. --quick uses calibrated thresholds (--mode=threshold):
on CPU, top-k's per-token sort at every site costs more than the matmuls it skips.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time

from absl import app, flags
from tqdm.auto import tqdm

from wina_jax.eval import report
from wina_jax.eval.tasks import TASKS

QUICK = dict(methods="dense,teal,wina", sparsities="0.5", tasks="piqa,winogrande,hellaswag,arc_challenge",
             limit=8, ppl_windows=4, seq_len=128, mode="threshold", calib_windows=4, batch_tokens=2048,
             ppl_batch=4)

MODEL = flags.DEFINE_string("model", "smollm2-135m", "Name in wina_jax.assets.MODELS, GGUF file or HF folder.")
METHODS = flags.DEFINE_list("methods", ["dense", "teal", "teal-transform", "cats", "wina", "wina-transform"],
                            "Methods; '<m>-transform' runs <m> on WINA-transformed params.")
SPARSITIES = flags.DEFINE_list("sparsities", ["0.25", "0.4", "0.5", "0.65"], "Target sparsities.")
TASK_LIST = flags.DEFINE_list("tasks", list(TASKS), f"Tasks among {list(TASKS)}; empty = perplexity only.")
LIMIT = flags.DEFINE_integer("limit", None, "Rows per task (first N); None = the whole validation set.")
ALLOCATION = flags.DEFINE_enum("allocation", "uniform", ["uniform", "greedy"], "Sparsity across sites.")
MODE = flags.DEFINE_enum("mode", "topk", ["topk", "threshold"], "Per-token top-k or calibrated thresholds.")
PREFILL = flags.DEFINE_string("prefill", "all", "Dense-prefix policy (wina_jax.sparsity.prefill).")
PPL_TEXT = flags.DEFINE_string("ppl_text", "boolq:heldout", "Perplexity text (disjoint from calibration).")
CALIB_TEXT = flags.DEFINE_string("calib_text", "boolq:calibration", "Calibration text.")
SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Perplexity / calibration window length.")
PPL_WINDOWS = flags.DEFINE_integer("ppl_windows", 32, "Perplexity windows.")
CALIB_WINDOWS = flags.DEFINE_integer("calib_windows", 16, "Calibration windows (threshold / greedy).")
UPSTREAM = flags.DEFINE_bool("upstream", True, "Threshold mode: calibrate each target under the sparse "
                             "upstream (lands on the target); --noupstream: dense statistics (overshoots).")
BATCH_TOKENS = flags.DEFINE_integer("batch_tokens", 4096, "Tokens per multiple-choice batch.")
BUCKETS = flags.DEFINE_list("buckets", None, "Padded lengths of multiple-choice rows (default: powers of two "
                            "from 64); fewer buckets = fewer compiles, e.g. 256,1024 on a GPU.")
PPL_BATCH = flags.DEFINE_integer("ppl_batch", 8, "Windows per perplexity batch.")
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Params dtype.")
OUT = flags.DEFINE_string("out", "results/sweep", "Output folder.")
BUNDLE = flags.DEFINE_string("bundle", "", "Pre-tokenised data (.npz): read if it exists, else written; lets "
                             "a machine without tokenizer or datasets run the sweep.")
ONLY_BUNDLE = flags.DEFINE_bool("only_bundle", False, "Write --bundle and exit (to carry the data elsewhere).")
REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Compute nothing: write the table of the finished cells.")
DEADLINE = flags.DEFINE_float("deadline_s", None, "Start no new cell after this many seconds (one always runs); rerun to resume.")
MAX_EFFECTIVE = flags.DEFINE_float("max_effective", None, "Greedy allocation: the effective sparsity its search "
                                   "climbs to (the path below it does not depend on it); default: the highest "
                                   "target + 0.05, at most 0.95.")
QUICK_FLAG = flags.DEFINE_bool("quick", False, f"CPU demo preset for flags not given: {QUICK}.")


def settings() -> dict:
  """Every flag that changes a cell's numbers (methods / sparsities lists excluded: they pick cells)."""
  model = "" if MODEL.value == "smollm2-135m" else MODEL.value   # '': the default, as committed cells hash it
  st = {"model": model, "tasks": list(TASK_LIST.value), "limit": LIMIT.value,
        "allocation": ALLOCATION.value, "mode": MODE.value, "prefill": PREFILL.value,
        "ppl_text": PPL_TEXT.value, "calib_text": CALIB_TEXT.value, "seq_len": SEQ_LEN.value,
        "ppl_windows": PPL_WINDOWS.value, "calib_windows": CALIB_WINDOWS.value, "dtype": DTYPE.value}
  if MODE.value == "threshold":       # only thresholds depend on it (top-k cells keep their keys)
    st["calibration"] = "upstream" if UPSTREAM.value else "dense"
  return st


def cell_list(methods: list[str], sparsities: list[float]) -> list[tuple[str, float]]:
  """Dense once at 0, then every other method at every sparsity, in table order."""
  dense = [("dense", 0.0)] if "dense" in methods else []
  return dense + [(m, s) for s in sparsities for m in methods if m != "dense"]


def cell_key(st: dict, method: str) -> str:
  """Hash of the settings a cell depends on (dense ignores the sparsifier's mode / allocation / calibration)."""
  if method == "dense":
    st = {k: v for k, v in st.items()
          if k not in ("mode", "allocation", "calib_text", "calib_windows", "calibration")}
  return hashlib.sha1(json.dumps(st, sort_keys=True).encode()).hexdigest()[:10]


def cell_path(out: str, method: str, s: float, key: str) -> str:
  return os.path.join(out, "cells", f"{method}@{s:g}-{key}.json")


DATA_KEYS = ("tasks", "limit", "ppl_text", "calib_text", "seq_len", "ppl_windows", "calib_windows")


def tokenizer_name(model: str) -> str:
  from wina_jax import assets
  return os.path.basename(model.rstrip("/")) if model else assets.SMOLLM2_GGUF


def data_meta(st: dict) -> dict:
  """The settings a bundle's data depends on (checked when a sweep reads it)."""
  return {**{k: st[k] for k in DATA_KEYS}, "tokenizer": tokenizer_name(st["model"])}


def tokenize_data(st: dict) -> tuple[dict, dict]:
  """Tasks and windows of the settings, tokenized -> ({task: Tokenized}, {'ppl', 'calib': [N, T]})."""
  from wina_jax import assets
  from wina_jax.data.text import load_texts, token_windows
  from wina_jax.eval.multiple_choice import tokenize
  from wina_jax.eval.tasks import load_task
  from wina_jax.tokenizer import load_tokenizer
  tok = load_tokenizer(st["model"] or assets.default_gguf())
  tasks = {t: tokenize(tok, load_task(t, st["limit"])) for t in tqdm(st["tasks"], desc="tokenize", leave=False)}
  windows = {k: token_windows(tok, load_texts(st[f"{k}_text"]), st["seq_len"], st[f"{k}_windows"])
             for k in ("ppl", "calib")}
  return tasks, windows


class Context:
  """What every cell shares: the model, the tokenized tasks and token windows (loaded once).

  bundle: a .npz path (`wina_jax.eval.bundle`); read if it exists, else written after tokenizing.
  max_effective: the ceiling of the greedy allocation's search."""

  def __init__(self, cfg_settings: dict, bundle_path: str = "", max_effective: float = 0.9):
    import jax.numpy as jnp

    from wina_jax.convert import load
    from wina_jax.eval import bundle
    st = cfg_settings
    want = data_meta(st)
    if bundle_path and os.path.exists(bundle_path):
      self.tasks, windows, meta = bundle.load(bundle_path)
      bundle.check_meta(meta, want, bundle_path)
    else:
      self.tasks, windows = tokenize_data(st)
      if bundle_path:
        bundle.save(bundle_path, self.tasks, windows, want)
    self.params, self.cfg = load(st["model"], getattr(jnp, st["dtype"]))
    self.ppl, self.calib = windows["ppl"], windows["calib"]
    self.settings = st
    self.max_effective = max_effective
    self.prepared = {}


def run_cell(ctx: Context, method: str, s: float) -> tuple[dict, dict]:
  """Evaluate one cell -> (its table row, its items). No timings: rows must not depend on the run. Items
  are what bootstrap bands resample: {'ppl_window_nll': [windows], '<task>/correct': [rows] (0/1 of the
  table's metric)}."""
  from wina_jax import sparsity
  from wina_jax.eval import flops, multiple_choice, perplexity, variants
  st = ctx.settings
  if method not in ctx.prepared:      # transform / calibration once per method, shared by its sparsities
    ctx.prepared[method] = variants.prepare(ctx.params, ctx.cfg, method, mode=st["mode"],
                                            allocation=st["allocation"], calib_windows=ctx.calib,
                                            max_effective=ctx.max_effective, progress=False,
                                            upstream=st.get("calibration") != "dense")
  v = variants.make(ctx.prepared[method], s)
  prefix = functools.partial(sparsity.resolve_prefill, st["prefill"])
  ppl = perplexity.perplexity(v.params, v.cfg, ctx.ppl, v.sparsifier, batch_size=PPL_BATCH.value,
                              dense_prefix=prefix(ctx.ppl.shape[1]), zero_frac=True, progress=False)
  zf = ppl["zero_frac"]
  row = {"method": method, "sparsity": s,
         "measured_sparsity": sparsity.parameter_weighted_sparsity(zf, v.cfg),
         "gflops": flops.gflops(v.cfg, sparsity.per_matrix_sparsity(zf, v.cfg),
                                shortcuts=v.info["shortcuts"]),
         "ppl": ppl["ppl"], "rotated_blocks": len(v.info["blocks"])}
  items = {"ppl_window_nll": ppl["window_nll"]}
  for t in st["tasks"]:
    res = multiple_choice.score(v.params, v.cfg, ctx.tasks[t], v.sparsifier, batch_tokens=BATCH_TOKENS.value,
                                buckets=[int(b) for b in BUCKETS.value or ()], dense_prefix=prefix,
                                progress=False)
    row[t] = res[TASKS[t].metric]
    row[f"{t}/acc"], row[f"{t}/acc_norm"], row[f"{t}/n"] = res["acc"], res["acc_norm"], res["n"]
    items[f"{t}/correct"] = res["correct_norm" if TASKS[t].metric == "acc_norm" else "correct"]
  row["avg"] = sum(row[t] for t in st["tasks"]) / len(st["tasks"]) if st["tasks"] else float("nan")
  return row, items


def main(argv):
  del argv
  if QUICK_FLAG.value:
    for k, val in QUICK.items():
      if not flags.FLAGS[k].present:
        flags.FLAGS[k].parse(str(val))
  bad = [t for t in TASK_LIST.value if t not in TASKS]
  if bad:
    raise app.UsageError(f"unknown tasks {bad}; choose from {list(TASKS)}")
  sps = [float(x) for x in SPARSITIES.value]
  st = settings()
  if ONLY_BUNDLE.value:
    if not BUNDLE.value:
      raise app.UsageError("--only_bundle needs --bundle=PATH")
    from wina_jax.eval import bundle
    bundle.save(BUNDLE.value, *tokenize_data(st), data_meta(st))
    print(f"wrote {BUNDLE.value} ({os.path.getsize(BUNDLE.value) / 2**20:.1f} MiB)")
    return
  cells = cell_list(list(METHODS.value), sps)
  paths = {c: cell_path(OUT.value, *c, cell_key(st, c[0])) for c in cells}
  todo = [c for c in cells if not os.path.exists(paths[c])]
  print(f"{len(cells)} cells, {len(cells) - len(todo)} already done -> {OUT.value}")
  from wina_jax.eval import variants
  for m in METHODS.value:
    variants.parse(m)
  if REPORT_ONLY.value:
    todo = []
  max_eff = MAX_EFFECTIVE.value or min(0.95, round(max(sps, default=0.0) + 0.05, 2))
  ctx = Context(st, BUNDLE.value, max_eff) if todo else None
  t_start = time.time()
  for i, (method, s) in enumerate(tqdm(todo, desc="sweep")):
    if i and DEADLINE.value is not None and time.time() - t_start > DEADLINE.value:
      break
    t0 = time.time()
    row, items = run_cell(ctx, method, s)
    report.write_atomic(paths[(method, s)], json.dumps({"row": row, "settings": st, "seconds": time.time() - t0,
                                                        "items": items}, indent=1))
    tqdm.write(f"{method} @ {s:g}: ppl {row['ppl']:.3f} avg {100 * row['avg']:.2f} "
               f"measured sparsity {100 * row['measured_sparsity']:.1f}% ({time.time() - t0:.0f}s)")
  rows = []
  for c in cells:
    if os.path.exists(paths[c]):
      with open(paths[c]) as f:
        rows.append(json.load(f)["row"])
  if len(rows) < len(cells):
    print(f"{len(cells) - len(rows)} of {len(cells)} cells left (deadline or --report_only); rerun the "
          f"same command to finish them. The table below has the finished cells only.")
  header = (f"Sweep on {os.path.basename(st['model']) or 'SmolLM2-135M-Instruct'} ({st['allocation']} allocation, "
            f"{st['mode']} mode, prefill {st['prefill']}); rows per task: {st['limit'] or 'all'}; "
            f"perplexity on {st['ppl_text']} ({st['ppl_windows']} x {st['seq_len']} tokens). "
            f"GFLOPs per token from measured per-matrix sparsity.\n\n")
  report.write_all(rows, st["tasks"], OUT.value, header)
  print(report.markdown(rows, st["tasks"]))


if __name__ == "__main__":
  app.run(main)

"""The main job: a sparsity sweep of methods x target sparsities on perplexity, zero-shot tasks and FLOPs.

  python -m experiments.quality.sweep --demo                       # CPU demo (make demo): dense / TEAL / WINA at 50 %
  python -m experiments.quality.sweep --smoke                      # pipeline check: 3 cells, 8 rows per task
  python -m experiments.quality.sweep --limit=200 --methods=dense,teal,wina --sparsities=0.5
  python -m experiments.quality.sweep --out=results/sweep/full --batch_tokens=65536 --ppl_windows=128  # GPU

Each cell (method, sparsity) is written atomically to <out>/cells/ as it completes; a restarted sweep
with the same flags skips finished cells and ends with the same table.md / results.csv / results.json /
accuracy.png / perplexity.png. Cells are keyed by every flag that changes their numbers, so a changed
setting recomputes instead of mixing results. --demo and --smoke use calibrated thresholds
(--mode=threshold): on CPU, top-k's per-token sort at every site costs more than the matmuls it skips.

Noise bands (`wina_jax.eval.bands`): every cell stores its items, per-window NLLs and per-row correctness
(the sampling band: a bootstrap over windows / rows) and re-runs its variant --seeds times with every weight
multiplied by (1 +- --eps) (the numerics band; thresholds and transforms are not recomputed, the forward
passes are). table.md prints both bands next to each number and marks every method's difference from
--compare_to at the same sparsity (and --compare_to's from dense) as real or within noise. A finished cell
with fewer seeds, or without items (older cells), gets only what is missing on a rerun.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from typing import Optional

import numpy as np
from absl import app, flags
from tqdm.auto import tqdm

from experiments import common
from wina_jax import checks, numerics
from wina_jax.eval import report
from wina_jax.eval.tasks import TASKS

SMOKE = dict(
  methods="dense,teal,wina",
  sparsities="0.5",
  tasks="piqa,winogrande,hellaswag,arc_challenge",
  limit=8,
  ppl_windows=4,
  seq_len=128,
  mode="threshold",
  calib_windows=4,
  batch_tokens=2048,
  ppl_batch=4,
  seeds=0,
)
DEMO = dict(
  methods="dense,teal,wina",
  sparsities="0.5",
  tasks="piqa",
  limit=100,
  ppl_windows=16,
  seq_len=256,
  mode="threshold",
  calib_windows=8,
  batch_tokens=4096,
  ppl_batch=8,
  seeds=2,
  seed_tasks=False,
  continuation="The capital of France is",
)

MODEL = common.check(
  flags.DEFINE_string("model", "smollm2-135m", "Name in wina_jax.assets.MODELS, GGUF file or HF folder."),
  common.MODEL_RULE,
)
METHODS = common.methods_flag(["dense", "teal", "teal-transform", "cats", "wina", "wina-transform"])
SPARSITIES = common.sparsities_flag()
TASK_LIST = flags.DEFINE_list("tasks", list(TASKS), f"Tasks among {list(TASKS)}; empty = perplexity only.")
LIMIT = common.check(
  flags.DEFINE_integer("limit", None, "Rows per task (first N); None = the whole validation set."),
  checks.count(none=True),
)
ALLOCATION = flags.DEFINE_enum("allocation", "uniform", ["uniform", "greedy"], "Sparsity across sites.")
MODE = flags.DEFINE_enum("mode", "topk", ["topk", "threshold"], "Per-token top-k or calibrated thresholds.")
PREFILL = flags.DEFINE_string("prefill", "all", "Dense-prefix policy (wina_jax.sparsity.prefill).")
PPL_TEXT = common.check(
  flags.DEFINE_string("ppl_text", "boolq:heldout", "Perplexity text (disjoint from calibration)."),
  checks.text(),
)
CALIB_TEXT = common.check(
  flags.DEFINE_string("calib_text", "boolq:calibration", "Calibration text."), checks.text()
)
SEQ_LEN = common.check(
  flags.DEFINE_integer("seq_len", 256, "Perplexity / calibration window length."), checks.count(2)
)
PPL_WINDOWS = common.check(flags.DEFINE_integer("ppl_windows", 32, "Perplexity windows."), checks.count())
CALIB_WINDOWS = common.check(
  flags.DEFINE_integer("calib_windows", 16, "Calibration windows (threshold / greedy)."), checks.count()
)
UPSTREAM = flags.DEFINE_bool(
  "upstream",
  True,
  "Threshold mode: calibrate each target under the sparse "
  "upstream (lands on the target); --noupstream: dense statistics (overshoots).",
)
BATCH_TOKENS = common.check(
  flags.DEFINE_integer("batch_tokens", 4096, "Tokens per multiple-choice batch."), checks.count()
)
BUCKETS = common.check(
  flags.DEFINE_list(
    "buckets",
    None,
    "Padded lengths of multiple-choice rows (default: powers of two "
    "from 64); fewer buckets = fewer compiles, e.g. 256,1024 on a GPU.",
  ),
  checks.each(checks.count(), int),
)
PPL_BATCH = common.check(
  flags.DEFINE_integer("ppl_batch", 8, "Windows per perplexity batch."), checks.count()
)
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Params dtype.")
OUT = common.check(flags.DEFINE_string("out", "results/sweep", "Output folder."), checks.out_path())
BUNDLE = common.check(
  flags.DEFINE_string(
    "bundle",
    "",
    "Pre-tokenised data (.npz): read if it exists, else written; lets "
    "a machine without tokenizer or datasets run the sweep.",
  ),
  checks.npz_file(missing=True),
)
ONLY_BUNDLE = flags.DEFINE_bool(
  "only_bundle", False, "Write --bundle and exit (to carry the data elsewhere)."
)
REPORT_ONLY = flags.DEFINE_bool(
  "report_only", False, "Compute nothing: write the table of the finished cells."
)
DEADLINE = common.check(
  flags.DEFINE_float(
    "deadline_s", None, "Start no new cell after this many seconds (one always runs); rerun to resume."
  ),
  checks.real(0.0, none=True),
)
MAX_EFFECTIVE = common.check(
  flags.DEFINE_float(
    "max_effective",
    None,
    "Greedy allocation: the effective sparsity its search "
    "climbs to (the path below it does not depend on it); default: the highest "
    "target + 0.05, at most 0.95.",
  ),
  checks.real(0.0, 1.0, hi_open=True, none=True),
)
SEEDS = common.check(
  flags.DEFINE_integer("seeds", 2, "Perturbed re-runs per cell for the numerics band (0: none)."),
  checks.count(0),
)
SEED_TASKS = flags.DEFINE_bool(
  "seed_tasks",
  True,
  "Perturbed re-runs score the tasks too (else perplexity "
  "only: the tasks get their bootstrap band alone, at a fraction of the cost).",
)
EPS = common.check(
  flags.DEFINE_float("eps", 6e-8, "Relative weight perturbation of the numerics band (~1 float32 ulp)."),
  checks.real(0.0, 1.0, hi_open=True),
)
COMPARE_TO = flags.DEFINE_string("compare_to", "teal", "Method the others are compared with, per sparsity.")
CONTINUATION = flags.DEFINE_string("continuation", "", "Greedy continuation prompt per cell ('' = none).")
CONTINUATION_TOKENS = common.check(
  flags.DEFINE_integer("continuation_tokens", 24, "Tokens of that continuation."), checks.count()
)
SMOKE_FLAG = flags.DEFINE_bool("smoke", False, f"Quick pipeline check, preset for flags not given: {SMOKE}.")
DEMO_FLAG = flags.DEFINE_bool("demo", False, f"CPU demo (a few minutes), preset for flags not given: {DEMO}.")


def settings() -> dict:
  """Every flag that changes a cell's numbers (methods / sparsities lists excluded: they pick cells)."""
  model = "" if MODEL.value == "smollm2-135m" else MODEL.value  # '': the default, as committed cells hash it
  st = {
    "model": model,
    "tasks": list(TASK_LIST.value),
    "limit": LIMIT.value,
    "allocation": ALLOCATION.value,
    "mode": MODE.value,
    "prefill": PREFILL.value,
    "ppl_text": PPL_TEXT.value,
    "calib_text": CALIB_TEXT.value,
    "seq_len": SEQ_LEN.value,
    "ppl_windows": PPL_WINDOWS.value,
    "calib_windows": CALIB_WINDOWS.value,
    "dtype": DTYPE.value,
    "precision": common.PRECISION.value,
  }
  if MODE.value == "threshold":  # only thresholds depend on it (top-k cells keep their keys)
    st["calibration"] = "upstream" if UPSTREAM.value else "dense"
  return st


def cell_list(methods: list[str], sparsities: list[float]) -> list[tuple[str, float]]:
  """Dense once at 0, then every other method at every sparsity, in table order."""
  dense = [("dense", 0.0)] if "dense" in methods else []
  return dense + [(m, s) for s in sparsities for m in methods if m != "dense"]


def cell_key(st: dict, method: str) -> str:
  """Hash of the settings a cell depends on (dense ignores the sparsifier's mode / allocation / calibration).
  float32 precision is left out of the hash: every cell written before precision was declared ran float32
  products (the CPU's only kind), so their keys stay."""
  if st.get("precision") == "float32":
    st = {k: v for k, v in st.items() if k != "precision"}
  if method == "dense":
    st = {
      k: v
      for k, v in st.items()
      if k not in ("mode", "allocation", "calib_text", "calib_windows", "calibration")
    }
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
  from wina_jax.data.text import load_texts, token_windows
  from wina_jax.eval.multiple_choice import tokenize
  from wina_jax.eval.tasks import load_task
  from wina_jax.tokenizer import load_tokenizer

  tok = load_tokenizer(st["model"])  # '' is the default model
  tasks = {
    t: tokenize(tok, load_task(t, st["limit"])) for t in tqdm(st["tasks"], desc="tokenize", leave=False)
  }
  windows = {
    k: token_windows(tok, load_texts(st[f"{k}_text"]), st["seq_len"], st[f"{k}_windows"])
    for k in ("ppl", "calib")
  }
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
    self._tokenizer = None

  @property
  def tokenizer(self):
    """The model's tokenizer, loaded on first use (continuations only: cells run from token ids)."""
    if self._tokenizer is None:
      from wina_jax.tokenizer import load_tokenizer

      self._tokenizer = load_tokenizer(self.settings["model"])
    return self._tokenizer

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.tokenizer(text, return_tensors="np")["input_ids"][0], np.int32)

  def decode(self, ids) -> str:
    return self.tokenizer.decode(ids)


def metrics(ctx: Context, v, params: dict, tasks: bool = True) -> tuple[dict, dict, dict]:
  """Perplexity and (if `tasks`) task scores of variant `v` run with `params` -> (metrics {'ppl', task:
  value}, items {'ppl_window_nll': per-window mean NLLs, '<task>/correct': per-row correctness (0 / 1) of
  the table's metric}, zero_frac {site: fraction})."""
  from wina_jax import sparsity
  from wina_jax.eval import multiple_choice, perplexity

  st = ctx.settings
  prefix = functools.partial(sparsity.resolve_prefill, st["prefill"])
  ppl = perplexity.perplexity(
    params,
    v.cfg,
    ctx.ppl,
    v.sparsifier,
    batch_size=PPL_BATCH.value,
    dense_prefix=prefix(ctx.ppl.shape[1]),
    zero_frac=True,
    progress=False,
  )
  out = {"ppl": ppl["ppl"]}
  items = {"ppl_window_nll": ppl["window_nll"]}
  for t in st["tasks"] if tasks else ():
    res = multiple_choice.score(
      params,
      v.cfg,
      ctx.tasks[t],
      v.sparsifier,
      batch_tokens=BATCH_TOKENS.value,
      buckets=[int(b) for b in BUCKETS.value or ()],
      dense_prefix=prefix,
      progress=False,
    )
    out[t] = res[TASKS[t].metric]
    out[f"{t}/acc"], out[f"{t}/acc_norm"], out[f"{t}/n"] = res["acc"], res["acc_norm"], res["n"]
    items[f"{t}/correct"] = res["correct_norm" if TASKS[t].metric == "acc_norm" else "correct"]
  return out, items, ppl["zero_frac"]


def complete(cell: Optional[dict], seeds: int, eps: float, prompt: str) -> bool:
  """Whether a stored cell has everything asked for: items, >= seeds perturbed runs at eps, the prompt's
  continuation."""
  if cell is None or "items" not in cell:
    return False
  num = cell.get("numerics", {"eps": eps, "runs": []})
  if seeds and (num["eps"] != eps or len(num["runs"]) < seeds):
    return False
  return not prompt or cell.get("continuation", {}).get("prompt") == prompt


def run_cell(ctx: Context, method: str, s: float, cell: Optional[dict] = None) -> dict:
  """Evaluate one cell, or what a stored `cell` lacks -> {'row' (no timings: rows must not depend on the
  run), 'items', 'numerics' {'eps', 'runs': [metrics of each perturbed run]}, 'continuation'}."""
  from wina_jax import sparsity
  from wina_jax.eval import bands, flops, variants

  st = ctx.settings
  if method not in ctx.prepared:  # transform / calibration once per method, shared by its sparsities
    ctx.prepared[method] = variants.prepare(
      ctx.params,
      ctx.cfg,
      method,
      mode=st["mode"],
      allocation=st["allocation"],
      calib_windows=ctx.calib,
      max_effective=ctx.max_effective,
      progress=False,
      upstream=st.get("calibration") != "dense",
    )
  v = variants.make(ctx.prepared[method], s)
  cell = dict(cell or {})
  if "items" not in cell:
    out, items, zf = metrics(ctx, v, v.params)
    row = {
      "method": method,
      "sparsity": s,
      "measured_sparsity": sparsity.parameter_weighted_sparsity(zf, v.cfg),
      "gflops": flops.gflops(v.cfg, sparsity.per_matrix_sparsity(zf, v.cfg), shortcuts=v.info["shortcuts"]),
      "ppl": out.pop("ppl"),
      "rotated_blocks": len(v.info["blocks"]),
      **out,
    }
    row["avg"] = sum(row[t] for t in st["tasks"]) / len(st["tasks"]) if st["tasks"] else float("nan")
    cell.update(row=row, items=items)
  runs = cell["numerics"]["runs"] if cell.get("numerics", {}).get("eps") == EPS.value else []
  for seed in range(len(runs) + 1, SEEDS.value + 1):
    runs.append(metrics(ctx, v, bands.perturb(v.params, seed, EPS.value), tasks=SEED_TASKS.value)[0])
  cell["numerics"] = {"eps": EPS.value, "runs": runs}
  if CONTINUATION.value and cell.get("continuation", {}).get("prompt") != CONTINUATION.value:
    from wina_jax.generate import greedy_decode

    ids = greedy_decode(
      v.params,
      v.cfg,
      ctx.encode(CONTINUATION.value)[None],
      CONTINUATION_TOKENS.value,
      v.sparsifier,
      eos_id=ctx.tokenizer.eos_token_id,
    )
    cell["continuation"] = {"prompt": CONTINUATION.value, "text": ctx.decode(ids[0])}
  return cell


def load_cell(path: str) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


DECLARED = {}  # what common.setup() applied, recorded in every cell


def main(argv):
  DECLARED.update(common.setup(), dtype=DTYPE.value)
  del argv
  if SMOKE_FLAG.value and DEMO_FLAG.value:
    raise app.UsageError("--smoke and --demo are two presets; pick one")
  for on, preset in ((SMOKE_FLAG.value, SMOKE), (DEMO_FLAG.value, DEMO)):
    for k, val in preset.items() if on else ():
      if not flags.FLAGS[k].present:
        flags.FLAGS[k].parse(str(val))
  bad = [t for t in TASK_LIST.value if t not in TASKS]
  if bad:
    raise app.UsageError(f"unknown tasks {bad}; choose from {list(TASKS)}")
  sps = [float(x) for x in SPARSITIES.value]
  st = settings()
  from wina_jax.eval import variants

  specs = [variants.parse(m) for m in METHODS.value]
  if not REPORT_ONLY.value:
    threshold = MODE.value == "threshold" or ALLOCATION.value == "greedy"
    common.preflight(
      MODEL.value,
      SEQ_LEN.value,
      forward=(PPL_BATCH.value, "--ppl_batch"),
      calibration=(CALIB_WINDOWS.value, "--calib_windows") if threshold else None,
      transform=any(spec.transformed for spec in specs),
      dtype_bytes=2 if DTYPE.value == "bfloat16" else 4,
    )
  if ONLY_BUNDLE.value:
    if not BUNDLE.value:
      raise app.UsageError("--only_bundle needs --bundle=PATH")
    from wina_jax.eval import bundle

    bundle.save(BUNDLE.value, *tokenize_data(st), data_meta(st))
    print(f"wrote {BUNDLE.value} ({os.path.getsize(BUNDLE.value) / 2**20:.1f} MiB)")
    return
  cells = cell_list(list(METHODS.value), sps)
  paths = {c: cell_path(OUT.value, *c, cell_key(st, c[0])) for c in cells}
  stored = {c: load_cell(paths[c]) for c in cells}
  todo = [c for c in cells if not complete(stored[c], SEEDS.value, EPS.value, CONTINUATION.value)]
  print(f"{len(cells)} cells, {len(cells) - len(todo)} already done -> {OUT.value}")
  if REPORT_ONLY.value:
    todo = []
  max_eff = MAX_EFFECTIVE.value or min(0.95, round(max(sps, default=0.0) + 0.05, 2))
  ctx = Context(st, BUNDLE.value, max_eff) if todo else None
  t_start = time.time()
  for i, (method, s) in enumerate(tqdm(todo, desc="sweep")):
    if i and DEADLINE.value is not None and time.time() - t_start > DEADLINE.value:
      break
    t0 = time.time()
    old = stored[(method, s)]
    cell = run_cell(ctx, method, s, old)
    kept = old["seconds"] if old and "items" in old else 0.0  # time of the parts reused from `old`
    cell.update(settings=st, seconds=kept + time.time() - t0, declared_numerics=DECLARED)
    report.write_atomic(paths[(method, s)], json.dumps(cell, indent=1))
    stored[(method, s)] = cell
    row = cell["row"]
    tqdm.write(
      f"{method} @ {s:g}: ppl {row['ppl']:.3f} avg {100 * row['avg']:.2f} "
      f"measured sparsity {100 * row['measured_sparsity']:.1f}% ({time.time() - t0:.0f}s)"
    )
  done = [stored[c] for c in cells if stored[c] is not None]
  if len(done) < len(cells):
    print(
      f"{len(cells) - len(done)} of {len(cells)} cells left (deadline or --report_only); rerun the "
      f"same command to finish them. The table below has the finished cells only."
    )
  backends = sorted({c.get("declared_numerics", {}).get("backend", "an unrecorded backend") for c in done})
  header = (
    f"Sweep on {os.path.basename(st['model']) or 'SmolLM2-135M-Instruct'} ({st['allocation']} allocation, "
    f"{st['mode']} mode, prefill {st['prefill']}); rows per task: {st['limit'] or 'all'}; "
    f"perplexity on {st['ppl_text']} ({st['ppl_windows']} x {st['seq_len']} tokens); {st['dtype']} params, "
    f"{st['precision']} matmuls ({numerics.PRECISIONS[st['precision']]}) on {'/'.join(backends)}. "
    f"GFLOPs per token from measured per-matrix sparsity.\n\n"
  )
  text = report.write_all(done, st["tasks"], OUT.value, header, compare_to=COMPARE_TO.value)
  print(text)


if __name__ == "__main__":
  app.run(main)

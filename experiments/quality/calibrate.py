"""Calibrate a sparsification method: per-site score statistics (+ optional greedy allocation paths),
saved as a versioned thresholds file, and a held-out check of the sparsity thresholds achieve.

  python -m experiments.quality.calibrate                                   # recommended method, SmolLM2, 0.5
  python -m experiments.quality.calibrate --method=teal --sparsity=0.4 --allocation=greedy --out=runs/teal.npz
  python -m experiments.quality.calibrate --method=cats --text=my_corpus.txt --max_windows=64 --seq_len=512
"""

import time

import numpy as np
from absl import app, flags

from experiments import common
from wina_jax import checks
from wina_jax import sparsity as sp
from wina_jax.convert import load
from wina_jax.data.text import load_texts
from wina_jax.eval import variants
from wina_jax.eval.recommended import recommended
from wina_jax.sparsity import layerwise
from wina_jax.tokenizer import load_tokenizer

MODEL = common.check(
  flags.DEFINE_string("model", "smollm2-135m", "Name in wina_jax.assets.MODELS, GGUF file or HF folder."),
  common.MODEL_RULE,
)
METHOD = common.check(
  flags.DEFINE_string(
    "method",
    "",
    "Registered method name (wina_jax.sparsity.known_methods); '' = the "
    "recommended one for --sparsity (wina_jax.eval.recommended).",
  ),
  common.method_rule,
)
C_SITES = flags.DEFINE_enum(
  "c_sites", "official", ["official", "all"], "wina only: sites that use column norms."
)
SPARSITY = common.check(
  flags.DEFINE_float("sparsity", 0.5, "Target (effective) sparsity in [0, 1)."), checks.fraction()
)
ALLOCATION = flags.DEFINE_enum("allocation", "uniform", list(sp.ALLOCATIONS), "Per-site allocation.")
GREEDY_MAX = common.check(
  flags.DEFINE_float("greedy_max", -1.0, "Greedy path end (effective); < 0: sparsity + 0.05."),
  checks.real(hi=1.0, hi_open=True),
)
GREEDY_WINDOWS = common.check(
  flags.DEFINE_integer("greedy_windows", 4, "Calibration windows the greedy search uses."), checks.count()
)
TEXT = common.check(
  flags.DEFINE_string("text", "boolq:calibration", "Calibration text: 'boolq:calibration' or a file."),
  checks.text(),
)
HELDOUT = common.check(
  flags.DEFINE_string("heldout", "boolq:heldout", "Held-out text for the achieved-sparsity check."),
  checks.text(),
)
SEQ_LEN = common.check(flags.DEFINE_integer("seq_len", 256, "Window length."), checks.count())
MAX_WINDOWS = common.check(flags.DEFINE_integer("max_windows", 16, "Calibration windows."), checks.count())
CHECK_WINDOWS = common.check(
  flags.DEFINE_integer("check_windows", 4, "Held-out windows for the check (0: skip)."), checks.count(0)
)
UPSTREAM = flags.DEFINE_bool(
  "upstream",
  True,
  "Calibrate each site under the sparse upstream at the "
  "target (exact for this target); false: dense statistics (TEAL), any target.",
)
OUT = common.check(
  flags.DEFINE_string("out", "", "Thresholds file; '' = runs/calibration/<method>.npz."), checks.out_path()
)


def main(_):
  declared = common.setup("float32")  # `load`'s params are float32
  common.preflight(MODEL.value, SEQ_LEN.value, calibration=(MAX_WINDOWS.value, "--max_windows"))
  params, cfg = load(MODEL.value)
  tok = load_tokenizer(MODEL.value)
  sp.check_sparsity(SPARSITY.value)
  spec = variants.parse(METHOD.value or recommended(SPARSITY.value).spec)
  if spec.transformed:
    raise app.UsageError(
      f"{spec.spec!r} needs transformed params; calibrate its base method on them in Python "
      "(wina_jax.eval.variants.prepare)"
    )
  settings = {"c_sites": C_SITES.value} if spec.name == "wina" else {}
  method = sp.get_method(spec.name, **{**settings, **dict(spec.settings)})
  windows = sp.windows_from_text(tok, load_texts(TEXT.value), SEQ_LEN.value, MAX_WINDOWS.value)
  t0 = time.time()
  target = SPARSITY.value
  paths = None
  if ALLOCATION.value == "greedy":  # greedy search on dense statistics, then recalibrate for its choice
    dense = sp.calibrate(params, cfg, method, windows)
    end = GREEDY_MAX.value if GREEDY_MAX.value >= 0 else min(SPARSITY.value + 0.05, 0.95)
    paths = sp.greedy(params, cfg, dense, windows[: GREEDY_WINDOWS.value], max_effective=end)
    target = sp.pick(paths, SPARSITY.value)
  calib = sp.calibrate(params, cfg, method, windows, upstream=target if UPSTREAM.value else None)
  calib.paths = paths
  print(f"calibrated {method} on {calib.tokens} tokens in {time.time() - t0:.0f}s")
  path = sp.save(OUT.value or f"runs/calibration/{spec.name}.npz", calib, declared)
  print(f"saved {path}")
  if CHECK_WINDOWS.value:
    held = sp.windows_from_text(tok, load_texts(HELDOUT.value), SEQ_LEN.value, CHECK_WINDOWS.value)
    spars = sp.make(
      method, params, cfg, SPARSITY.value, mode="threshold", calibration=calib, allocation=ALLOCATION.value
    )
    zf = layerwise.zero_frac(
      params, cfg, spars, held
    )  # = forward(collect=("zero_frac",)), one layer compiled
    per_site = np.asarray([zf[s] for s in method.sites(cfg)])
    print(
      f"held-out ({HELDOUT.value}, {held.size} tokens): parameter-weighted sparsity "
      f"{sp.parameter_weighted_sparsity(zf, cfg):.4f} (target {SPARSITY.value}); per-site zero fraction "
      f"mean {per_site.mean():.4f}, range [{per_site.min():.4f}, {per_site.max():.4f}]"
    )


if __name__ == "__main__":
  app.run(main)

"""Reproduce the official WINA repository's TEAL numbers on SmolLM2 (issue 16): Pride and Prejudice from
r-cran-janeaustenr, 8192 tokens in 16 windows of 512, TEAL top-k on all 7 projections of every token.

  PYTHONPATH=. nice -n 10 .venv/bin/python -m experiments.quality.reproduce_reference \
      --out=results/reference/smollm2_pride.json
  # quick: 2 windows, dense and 50 % only
  PYTHONPATH=. .venv/bin/python -m experiments.quality.reproduce_reference --windows=2 --levels=0.5 \
      --seeds= --out=runs/reference_quick.json

Writes per-window mean NLLs for dense, each level, and an ensemble over weight perturbations
(every weight times 1 +- eps, random signs, one seed each) at --ensemble_levels, with the official
figures beside them. Resumable: runs already in --out (same protocol and declared numerics) are skipped.
"""

import json
import os
import time

import numpy as np
from absl import app, flags

from experiments import common
from wina_jax import assets, checks, sparsity
from wina_jax.convert.load import load_default
from wina_jax.data import austen
from wina_jax.eval import bands
from wina_jax.eval import reference as R
from wina_jax.eval.perplexity import perplexity
from wina_jax.tokenizer import load_tokenizer

OUT = common.check(
  flags.DEFINE_string("out", "results/reference/smollm2_pride.json", "Result JSON (resumed if present)."),
  checks.out_path(),
)
LEVELS = common.check(
  flags.DEFINE_list("levels", ["0.25", "0.4", "0.5", "0.65"], "TEAL top-k sparsities."),
  checks.each(checks.fraction()),
)
K_RULE = flags.DEFINE_enum(
  "k_rule",
  "floor",
  sparsity.base.K_RULES,
  "k per token: 'floor' = official int(d * (1 - s)); 'round' = the project's default.",
)
WINDOWS = common.check(
  flags.DEFINE_integer("windows", 16, "Windows of 512 to score (the protocol: 16)."), checks.count(1, 16)
)
SEEDS = common.check(
  flags.DEFINE_list("seeds", ["1", "2", "3", "4", "5"], "Perturbation seeds for the ensemble."),
  checks.each(checks.count(0), int),
)
ENSEMBLE_LEVELS = common.check(
  flags.DEFINE_list("ensemble_levels", ["0.5", "0.65"], "Levels with a perturbation ensemble."),
  checks.each(checks.fraction()),
)
ENSEMBLE_WINDOWS = common.check(
  flags.DEFINE_integer(
    "ensemble_windows",
    16,
    "Windows scored by each perturbed run (the "
    "first n: per-window spreads when the full ensemble is too slow).",
  ),
  checks.count(1, 16),
)
EPS = common.check(
  flags.DEFINE_float("eps", bands.EPS, "Relative weight perturbation of the ensemble."),
  checks.real(0.0, 1.0, hi_open=True),
)
BATCH = common.check(flags.DEFINE_integer("batch_size", 2, "Windows per forward."), checks.count())


def summary(nlls: list[float], level: float) -> dict:
  out = {"ppl": R.ppl(nlls), "window_nll": nlls}
  if level in R.OFFICIAL_PPL and len(nlls) == 16:
    out["official_ppl"] = R.OFFICIAL_PPL[level]
  return out


def save(res: dict) -> None:
  os.makedirs(os.path.dirname(OUT.value) or ".", exist_ok=True)
  with open(OUT.value + ".tmp", "w") as f:
    json.dump(res, f, indent=1)
  os.replace(OUT.value + ".tmp", OUT.value)


def report(res: dict, n: int) -> None:
  """Print each level against the official figure, the paired per-window comparison at 50 % and the
  perturbation ensembles' per-window spread."""
  runs = res["runs"]
  for key, r in runs.items():
    if "/seed" not in key:
      print(
        f"{key:10s} ppl {r['ppl']:9.4f} over {len(r['window_nll'])} windows; official "
        f"{r.get('official_ppl', '-')}"
      )
  ours = runs.get("teal@0.5", {}).get("window_nll", [])
  if ours:
    d = np.asarray(ours) - np.asarray(R.OFFICIAL_WINDOW_NLL_50[: len(ours)])
    se = np.std(d, ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    print(
      f"50 %: per-window NLL, project - official over {len(d)} windows: mean {d.mean():+.5f}, "
      f"sd {np.std(d, ddof=1):.5f}, standard error of the mean {se:.5f} (t = {d.mean() / se:+.2f}); "
      f"ppl ratio exp(mean) = {np.exp(d.mean()):.4f}"
    )
  for level in [float(s) for s in ENSEMBLE_LEVELS.value]:
    seeds = [np.asarray(r["window_nll"]) for k, r in runs.items() if k.startswith(f"teal@{level:g}/seed")]
    base = runs.get(f"teal@{level:g}", {}).get("window_nll", [])
    m = min([len(x) for x in seeds] + [len(base)]) if seeds else 0
    if m:
      stack = np.stack([x[:m] for x in seeds] + [np.asarray(base[:m])])  # [seeds + 1, m]
      sd = np.std(stack, axis=0, ddof=1)
      print(
        f"teal@{level:g}: per-window NLL sd over {len(stack)} runs (unperturbed + {len(seeds)} seeds) on "
        f"windows 0..{m - 1}: {np.round(sd, 5).tolist()}, rms {np.sqrt(np.mean(sd**2)):.5f} -> band "
        f"of a {n}-window mean (independent windows): +-{np.sqrt(np.mean(sd**2) / n):.5f} in log ppl"
      )


def main(_):
  declared = common.setup("float32")  # `load_default`'s params are float32
  params, cfg = load_default()
  windows = austen.protocol_windows(load_tokenizer(assets.default_gguf()))[: WINDOWS.value]
  res = {
    "protocol": {
      "text": f"{austen.PACKAGE} {austen.VERSION} prideprejudice",
      "start_char": austen.START_CHAR,
      "windows": len(windows),
      "window": austen.WINDOW,
      "k_rule": K_RULE.value,
      "ids_sha256": austen.ids_digest(windows.ravel()),
    },
    "declared_numerics": declared,
    "official": {
      "ppl": {str(k): v for k, v in R.OFFICIAL_PPL.items()},
      "window_nll_50": R.OFFICIAL_WINDOW_NLL_50,
      "perturbed_ppl": {str(k): v for k, v in R.OFFICIAL_PERTURBED_PPL.items()},
    },
    "runs": {},
  }
  if os.path.isfile(OUT.value):
    with open(OUT.value) as f:
      old = json.load(f)
    if old.get("protocol") == res["protocol"] and old.get("declared_numerics") == declared:
      res["runs"] = old["runs"]
  ensemble = [float(s) for s in ENSEMBLE_LEVELS.value]
  jobs = []  # each ensemble level, its seeds, the other levels, then dense (known to match: last)
  for level in ensemble + [float(s) for s in LEVELS.value if float(s) not in ensemble]:
    jobs += [(level, None)] + [(level, int(seed)) for seed in SEEDS.value if seed and level in ensemble]
  for level, seed in jobs + [(0.0, None)]:
    key = ("dense" if level == 0 else f"teal@{level:g}") + ("" if seed is None else f"/seed{seed}")
    done = res["runs"].get(key, {}).get("window_nll", [])
    n = len(windows) if seed is None else min(len(windows), ENSEMBLE_WINDOWS.value)
    if len(done) >= n:
      continue
    p = params if seed is None else bands.perturb(params, seed, EPS.value)
    sp = sparsity.make("dense" if level == 0 else "teal", p, cfg, level, k_rule=K_RULE.value)
    t0 = time.time()
    for i in range(len(done), n, BATCH.value):  # resumable per batch of windows
      batch = windows[i : min(n, i + BATCH.value)]
      done = done + perplexity(p, cfg, batch, sp, batch_size=BATCH.value, progress=False)["window_nll"]
      extra = {} if seed is None else {"seed": seed, "eps": EPS.value}
      res["runs"][key] = dict(summary(done, level), **extra)
      save(res)
    print(f"{key}: ppl {res['runs'][key]['ppl']:.4f} ({time.time() - t0:.0f} s)", flush=True)
  report(res, len(windows))


if __name__ == "__main__":
  app.run(main)

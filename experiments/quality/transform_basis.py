"""WINA-Transform's free null-space basis (`transform(..., basis=)`) measured on SmolLM2 at top-k sparsity.

  # held-out BoolQ passages (the first measurement, docs/transform_basis.md)
  PYTHONPATH=. python -m experiments.quality.transform_basis \
      --out=results/transform_basis/smollm2_heldout.json          # ~20 min on a busy 2-core CPU
  # the paper's protocol: Pride and Prejudice, 16 x 512, official k, ulp-perturbation bands (seeds 1, 2)
  PYTHONPATH=. nice -n 10 python -m experiments.quality.transform_basis --ppl_text=pride --ppl_windows=16 \
      --k_rule=floor --seeds=1,2 --out=results/transform_basis/smollm2_pride.json

Perplexity (every token sparse, per-token top-k at every site) of the dense model, the untransformed
method (and --baselines, e.g. TEAL), and the method on params transformed with each basis. The learned
basis is fitted on calibration text (disjoint from the perplexity text). Dense logits of every transformed
model are checked against the original (max relative difference, recorded).

--ppl_text=pride scores the reference protocol's windows (`wina_jax.data.austen.protocol_windows`: Pride and
Prejudice from r-cran-janeaustenr, the model's tokenizer, no special tokens, the first --ppl_windows x
--seq_len ids; the protocol is 16 x 512). With SmolLM2's tokenizer the ids are checked against the
reference's sha256; other tokenizers give other ids (recorded, not checked).

Bands (`wina_jax.eval.bands`): every --seeds entry re-runs each sparse variant on `perturb(params, seed)`
(the original params perturbed by ~1 ulp, then transformed: the learned basis is re-fitted), the numerics
band of a variant being its perplexity over the unperturbed run and its seeds; the sampling band is the
window bootstrap of the unperturbed run; `compare` gives paired verdicts (real only outside both). Rows
are (variant, seed) and written as each finishes; a re-run with the same settings and declared numerics
skips the rows done (and may add --baselines, --bases or --seeds).
Order: the unperturbed rows, then the seeds of the transformed variants, then those of the baselines.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

from experiments import common
from wina_jax import checks
from wina_jax.sparsity.base import K_RULES

MODEL = common.check(
  flags.DEFINE_string("model", "", "GGUF file or HF folder; '' = the embedded SmolLM2."), common.MODEL_RULE
)
METHOD = common.check(
  flags.DEFINE_string("method", "wina", "Sparsity method run on the transformed params."), common.method_rule
)
BASELINES = common.methods_flag(
  [], "Further untransformed methods to score (e.g. teal).", name="baselines", nonempty=False
)
SPARSITY = common.check(
  flags.DEFINE_float("sparsity", 0.5, "Top-k sparsity at every site (also the learned basis' fit)."),
  checks.fraction(),
)
K_RULE = flags.DEFINE_enum(
  "k_rule", "round", K_RULES, "k per token: 'round' (the project's default) or 'floor' (official)."
)
BASES = flags.DEFINE_list("bases", ["svd", "axis", "learned"], "Bases to compare.")
PPL_TEXT = common.check(
  flags.DEFINE_string(
    "ppl_text",
    "boolq:heldout",
    "Perplexity text: a `load_texts` source, or 'pride' (the reference protocol).",
  ),
  checks.text(also=("pride",)),
)
CALIB_TEXT = common.check(
  flags.DEFINE_string("calib_text", "boolq:calibration", "Text the learned basis is fitted on."),
  checks.text(),
)
SEQ_LEN = common.check(flags.DEFINE_integer("seq_len", 512, "Window length."), checks.count(2))
PPL_WINDOWS = common.check(flags.DEFINE_integer("ppl_windows", 4, "Perplexity windows."), checks.count())
FIT_WINDOWS = common.check(
  flags.DEFINE_integer("fit_windows", 1, "Calibration windows for the learned basis."), checks.count()
)
SEEDS = common.check(
  flags.DEFINE_list("seeds", [], "Weight-perturbation seeds: each sparse variant's numerics band."),
  checks.each(checks.count(0), int),
)
EPS = common.check(
  flags.DEFINE_float("eps", 6e-8, "Relative weight perturbation (`bands.perturb`)."),
  checks.real(0.0, 1.0, hi_open=True),
)
BATCH = common.check(flags.DEFINE_integer("batch_size", 4, "Windows per forward."), checks.count())
OUT = common.check(
  flags.DEFINE_string("out", "results/transform_basis/smollm2_heldout.json", "Results JSON."),
  checks.out_path(),
)


def ppl_windows(tok, source: str, seq_len: int, n: int) -> tuple[np.ndarray, dict]:
  """[n, seq_len] perplexity windows and what describes them ('pride': the protocol, checked against the
  reference's ids when the tokenizer gives its first ids)."""
  from wina_jax.data import austen
  from wina_jax.data.text import load_texts, token_windows

  if source != "pride":
    return token_windows(tok, load_texts(source), seq_len, n), {}
  text = austen.pride_and_prejudice()
  windows = austen.protocol_windows(tok, text, n_tokens=n * seq_len, window=seq_len, check=False)
  reference_tokenizer = tuple(int(i) for i in windows.ravel()[: len(austen.FIRST_IDS)]) == austen.FIRST_IDS
  if reference_tokenizer:  # SmolLM2's: the full 8192 ids must be the reference's (raises otherwise)
    austen.protocol_windows(tok, text, check=True)
  return windows, {
    "text": f"{austen.PACKAGE} {austen.VERSION} prideprejudice",
    "start_char": austen.protocol_start(text),
    "ids_sha256": austen.ids_digest(windows.ravel()),
    "reference_ids_checked": reference_tokenizer,
  }


def summarize(rows: list[dict], variants: list[str]) -> dict:
  """Per sparse variant: ppl, its runs, numerics band and bootstrap band; paired comparisons."""
  from wina_jax.eval import bands as B

  by = {}
  for r in rows:
    by.setdefault(r["variant"], {})[r["seed"]] = r
  out, inputs = {"variants": {}, "comparisons": []}, {}
  for v in variants:
    base = by.get(v, {}).get(None)
    if base is None:
      continue
    runs = [r["ppl"] for _, r in sorted(by[v].items(), key=lambda kv: -1 if kv[0] is None else kv[0])]
    inputs[v] = {
      "values": base["window_nll"],
      "tokens": base["tokens"],
      **({"runs": runs} if len(runs) > 1 else {}),
    }
    out["variants"][v] = {
      "ppl": base["ppl"],
      "runs": runs,
      "numerics": B.numerics_band(runs) if len(runs) > 1 else None,
      "bootstrap": B.bootstrap_ppl(base["window_nll"], base["tokens"]),
    }
  method = METHOD.value
  transformed = [v for v in variants if v.startswith(f"{method}-transform")]
  pairs = [("dense", method)] + [(b, method) for b in BASELINES.value]
  pairs += [(method, t) for t in transformed]
  pairs += [(a, b) for i, a in enumerate(transformed) for b in transformed[i + 1 :]]
  for a, b in pairs:
    if a in inputs and b in inputs:
      c = B.compare(inputs[a], inputs[b])
      out["comparisons"].append(
        {"a": a, "b": b, "diff": c.diff, "sampling": c.sampling, "numerics": c.numerics, "verdict": c.verdict}
      )
  return out


def report(summary: dict) -> None:
  for v, s in summary["variants"].items():
    nb = s["numerics"]
    num = f"numerics {nb['min']:.3f}..{nb['max']:.3f} (sd {nb['std']:.3f}, n {nb['n']})" if nb else "no seeds"
    lo, hi = s["bootstrap"]
    print(f"{v:34s} ppl {s['ppl']:9.3f}  bootstrap [{lo:.3f}, {hi:.3f}]  {num}")
  for c in summary["comparisons"]:
    num = "" if c["numerics"] is None else f" ~[{c['numerics'][0]:+.3f}, {c['numerics'][1]:+.3f}]"
    lo, hi = c["sampling"]
    print(f"{c['b']} - {c['a']}: {c['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]{num}: {c['verdict']}")


def main(argv):
  declared = common.setup("float32")  # `load`'s params are float32
  del argv
  import jax.numpy as jnp

  from wina_jax import assets, sparsity
  from wina_jax import sites as S
  from wina_jax.convert import load
  from wina_jax.data.text import load_texts, token_windows
  from wina_jax.eval import bands
  from wina_jax.eval.perplexity import perplexity
  from wina_jax.model import forward
  from wina_jax.tokenizer import load_tokenizer
  from wina_jax.transform import transform

  common.preflight(MODEL.value, SEQ_LEN.value, forward=(BATCH.value, "--batch_size"), transform=True)
  params, cfg = load(MODEL.value)
  tok = load_tokenizer(MODEL.value)
  ppl_w, text_meta = ppl_windows(tok, PPL_TEXT.value, SEQ_LEN.value, PPL_WINDOWS.value)
  fit_w = token_windows(tok, load_texts(CALIB_TEXT.value), SEQ_LEN.value, FIT_WINDOWS.value)
  probe = jnp.asarray(ppl_w[:1, :64])
  s, method = SPARSITY.value, METHOD.value

  meta = {
    "model": MODEL.value or assets.SMOLLM2_GGUF,
    "method": method,
    "baselines": BASELINES.value,
    "sparsity": s,
    "mode": "topk",
    "k_rule": K_RULE.value,
    "ppl_text": PPL_TEXT.value,
    **({"protocol": text_meta} if text_meta else {}),
    "seq_len": SEQ_LEN.value,
    "ppl_windows": PPL_WINDOWS.value,
    "calib_text": CALIB_TEXT.value,
    "fit_windows": FIT_WINDOWS.value,
    "eps": EPS.value,
    "dense_prefix": 0,
  }
  rows = []
  if os.path.isfile(OUT.value):  # resume: keep the rows of a run with the same settings
    with open(OUT.value) as f:
      old = json.load(f)
    same = lambda st: {k: v for k, v in st.items() if k != "baselines"}  # which rows run, not their numbers
    if same(old.get("settings", {})) == same(meta) and old.get("declared_numerics") == declared:
      rows = [r for r in old["rows"] if len(r.get("window_nll", [])) == len(ppl_w)]
  os.makedirs(os.path.dirname(OUT.value) or ".", exist_ok=True)

  transformed = [f"{method}-transform[basis={b}]" for b in BASES.value]
  variants = ["dense", method, *BASELINES.value, *transformed]

  def write():  # after every row: a slow run leaves what it measured
    with open(OUT.value + ".tmp", "w") as f:
      json.dump(
        {"settings": meta, "declared_numerics": declared, "rows": rows, "summary": summarize(rows, variants)},
        f,
        indent=1,
      )
    os.replace(OUT.value + ".tmp", OUT.value)

  seeds = [int(x) for x in SEEDS.value if x]
  untransformed = [method, *BASELINES.value]
  jobs = [(v, None) for v in variants]
  jobs += [(v, seed) for seed in seeds for v in transformed] + [
    (v, seed) for seed in seeds for v in untransformed
  ]
  done = {(r["variant"], r["seed"]) for r in rows}
  ref = {}  # seed -> dense logits of the (perturbed) original on the probe
  for variant, seed in jobs:
    if (variant, seed) in done:
      continue
    t0 = time.time()
    p = params if seed is None else bands.perturb(params, seed, EPS.value)
    row = {"variant": variant, "seed": seed}
    if variant in transformed:
      basis = BASES.value[transformed.index(variant)]
      if seed not in ref:
        ref[seed] = np.asarray(forward(p, probe, cfg).logits)
      p, c = transform(p, cfg, basis=basis, calib_windows=fit_w, basis_sparsity=s)
      got = np.asarray(forward(p, probe, c).logits)
      row["basis"] = basis
      row["dense_logit_rel_diff"] = float(np.abs(got - ref[seed]).max() / np.abs(ref[seed]).max())
      row["transform_s"] = round(time.time() - t0, 1)
      name = method
    else:
      c, name = cfg, variant
    sp = S.dense if name == "dense" else sparsity.make(name, p, c, s, k_rule=K_RULE.value)
    res = perplexity(p, c, ppl_w, sp, batch_size=BATCH.value, progress=False)
    row.update(
      ppl=res["ppl"],
      window_nll=[float(x) for x in res["window_nll"]],
      tokens=[int(ppl_w.shape[1] - 1)] * len(ppl_w),
      wall_s=round(time.time() - t0, 1),
    )
    rows.append(row)
    print({k: v for k, v in row.items() if k not in ("window_nll", "tokens")}, flush=True)
    write()
  write()
  report(summarize(rows, variants))
  print(f"wrote {OUT.value}")


if __name__ == "__main__":
  app.run(main)

"""WINA-Transform's free null-space basis (`transform(..., basis=)`) measured on SmolLM2 at top-k sparsity.

  PYTHONPATH=. python -m experiments.quality.transform_basis \
      --out=results/transform_basis/smollm2_heldout.json          # ~20 min on a busy 2-core CPU

Perplexity on held-out text (every token sparse, per-token top-k at every site) of the dense model, the
untransformed method, and the method on params transformed with each basis. The learned basis is fitted on
calibration text (disjoint from the perplexity text). Dense logits of every transformed model are checked
against the original (max relative difference, recorded).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app, flags

MODEL = flags.DEFINE_string("model", "", "GGUF file or HF folder; '' = the embedded SmolLM2.")
METHOD = flags.DEFINE_string("method", "wina", "Sparsity method run on the transformed params.")
SPARSITY = flags.DEFINE_float("sparsity", 0.5, "Top-k sparsity at every site (also the learned basis' fit).")
BASES = flags.DEFINE_list("bases", ["svd", "axis", "learned"], "Bases to compare.")
PPL_TEXT = flags.DEFINE_string("ppl_text", "boolq:heldout", "Perplexity text.")
CALIB_TEXT = flags.DEFINE_string("calib_text", "boolq:calibration", "Text the learned basis is fitted on.")
SEQ_LEN = flags.DEFINE_integer("seq_len", 512, "Window length.")
PPL_WINDOWS = flags.DEFINE_integer("ppl_windows", 4, "Perplexity windows.")
FIT_WINDOWS = flags.DEFINE_integer("fit_windows", 1, "Calibration windows for the learned basis.")
OUT = flags.DEFINE_string("out", "results/transform_basis/smollm2_heldout.json", "Results JSON.")


def main(argv):
  del argv
  import jax.numpy as jnp

  from wina_jax import assets, sparsity
  from wina_jax import sites as S
  from wina_jax.convert import load
  from wina_jax.data.text import load_texts, token_windows
  from wina_jax.eval.perplexity import perplexity
  from wina_jax.model import forward
  from wina_jax.tokenizer import load_tokenizer
  from wina_jax.transform import transform

  params, cfg = load(MODEL.value)
  tok = load_tokenizer(MODEL.value)
  ppl_w = token_windows(tok, load_texts(PPL_TEXT.value), SEQ_LEN.value, PPL_WINDOWS.value)
  fit_w = token_windows(tok, load_texts(CALIB_TEXT.value), SEQ_LEN.value, FIT_WINDOWS.value)
  probe = jnp.asarray(ppl_w[:1, :64])
  ref = np.asarray(forward(params, probe, cfg).logits)
  s = SPARSITY.value

  def ppl(p, c, target):
    sp = sparsity.make(METHOD.value, p, c, target) if target else S.dense
    return perplexity(p, c, ppl_w, sp, batch_size=4, progress=False)["ppl"]

  meta = {
    "model": MODEL.value or assets.SMOLLM2_GGUF,
    "method": METHOD.value,
    "sparsity": s,
    "mode": "topk",
    "ppl_text": PPL_TEXT.value,
    "seq_len": SEQ_LEN.value,
    "ppl_windows": PPL_WINDOWS.value,
    "calib_text": CALIB_TEXT.value,
    "fit_windows": FIT_WINDOWS.value,
    "dense_prefix": 0,
  }
  os.makedirs(os.path.dirname(OUT.value) or ".", exist_ok=True)

  def write(rows):  # after every row: a slow run leaves what it measured
    with open(OUT.value, "w") as f:
      json.dump({"settings": meta, "rows": rows}, f, indent=1)

  rows = [
    {"variant": "dense", "ppl": ppl(params, cfg, 0.0)},
    {"variant": METHOD.value, "ppl": ppl(params, cfg, s)},
  ]
  print(rows, flush=True)
  write(rows)
  for basis in BASES.value:
    t0 = time.time()
    tp, tcfg = transform(params, cfg, basis=basis, calib_windows=fit_w, basis_sparsity=s)
    t_fit = time.time() - t0
    got = np.asarray(forward(tp, probe, tcfg).logits)
    row = {
      "variant": f"{METHOD.value}-transform[basis={basis}]",
      "basis": basis,
      "ppl": ppl(tp, tcfg, s),
      "dense_logit_rel_diff": float(np.abs(got - ref).max() / np.abs(ref).max()),
      "transform_s": round(t_fit, 1),
    }
    rows.append(row)
    print(row, flush=True)
    write(rows)
  print(f"wrote {OUT.value}")


if __name__ == "__main__":
  app.run(main)

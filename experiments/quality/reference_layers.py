"""Where the project's TEAL and the torch reference part ways: one protocol window, layer by layer.

  PYTHONPATH=. .venv/bin/python -m experiments.quality.reference_layers --sparsity=0.5
  PYTHONPATH=. .venv/bin/python -m experiments.quality.reference_layers --sparsity=0.5 --dtype=float64

Runs transformers' own GGUF load (forward pre-hooks: per-token top-k of |x|, k = int(d * (1 - s))) and the
project's `teal` top-k (k_rule='floor') on window --window, both in --dtype, and prints the window's mean
NLL on each side, then per layer: the largest relative difference of the inputs at each site and the
fraction of mask bits that differ, plus the k-th/(k+1)-th score gap (ties) on the torch side.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from wina_jax import assets, checks, sparsity
from wina_jax.convert.load import load_default
from wina_jax.data import austen
from wina_jax.eval import reference as R
from wina_jax.model import forward
from wina_jax.tokenizer import load_tokenizer

SPARSITY = common.check(flags.DEFINE_float("sparsity", 0.5, "TEAL top-k sparsity."), checks.fraction())
WINDOW = common.check(flags.DEFINE_integer("window", 0, "Protocol window (0..15)."), checks.count(0, 15))
DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float64"], "Both sides' dtype.")
EVERY = common.check(flags.DEFINE_integer("every", 1, "Print every n-th layer."), checks.count())


def main(_):
  declared = common.setup(DTYPE.value)
  print(f"declared numerics: {declared}")
  if DTYPE.value == "float64":
    jax.config.update("jax_enable_x64", True)
  params, cfg = load_default(getattr(jnp, DTYPE.value))
  gguf = assets.default_gguf()
  windows = austen.protocol_windows(load_tokenizer(gguf))[WINDOW.value : WINDOW.value + 1]
  model = R.torch_model(gguf, DTYPE.value)
  s = SPARSITY.value
  seen = {}
  t_nll = R.torch_window_nlls(model, windows, s, collect=seen)[0]
  seen = {site: (x[0], keep[0]) for site, (x, keep) in seen.items()}  # the one window
  sp = sparsity.make("teal", params, cfg, s, k_rule="floor")
  out = jax.jit(lambda p, t: forward(p, t, cfg, sp, collect=("inputs",)))(params, jnp.asarray(windows))
  j_nll = float(np.asarray(R.window_nll(out.logits, jnp.asarray(windows)))[0]) / (windows.shape[1] - 1)
  print(
    f"window {WINDOW.value}, TEAL {s:g}, {DTYPE.value}: torch NLL {t_nll:.6f}, project NLL {j_nll:.6f}, "
    f"diff {j_nll - t_nll:+.6f}"
  )
  print("layer  " + "  ".join(f"{n:>18s}" for n in R.TORCH_SITES))
  print("       (each: largest relative input difference, fraction of mask bits differing)")
  for layer in range(0, cfg.num_hidden_layers, EVERY.value):
    cells = []
    for block, names in (("self_attn", R.TORCH_SITES[:4]), ("mlp", R.TORCH_SITES[4:])):
      for n in names:
        site = f"layers.{layer}.{block}.{n}"
        tx, tkeep = seen[site]
        jx = np.asarray(out.aux["inputs"][site][0], np.float64)
        jkeep = np.asarray(sp.mask(site, out.aux["inputs"][site]))[0]
        rel = np.max(np.abs(jx - tx)) / np.max(np.abs(tx))
        cells.append(f"{rel:9.1e} {np.mean(jkeep != tkeep):7.3%}")
    print(f"{layer:5d}  " + "  ".join(cells))
  # Teacher-forced: the project's model with torch's masks imposed at every site. If the two models are the
  # same function, the NLLs agree to rounding and the inputs stay ~1e-6 apart in every layer.
  forced = R.FixedMasks({site: jnp.asarray(keep[None]) for site, (_, keep) in seen.items()})
  run = jax.jit(lambda p, t, m: forward(p, t, cfg, m, collect=("inputs",)))
  fout = run(params, jnp.asarray(windows), forced)
  f_nll = float(np.asarray(R.window_nll(fout.logits, jnp.asarray(windows)))[0]) / (windows.shape[1] - 1)
  worst = max(
    np.max(np.abs(np.asarray(fout.aux["inputs"][site][0], np.float64) - tx)) / np.max(np.abs(tx))
    for site, (tx, _) in seen.items()
  )
  print(
    f"with torch's masks imposed: project NLL {f_nll:.6f} (torch {t_nll:.6f}, "
    f"diff {f_nll - t_nll:+.2e}); "
    f"largest relative input difference over all sites {worst:.1e}"
  )
  ties = []
  for tx, _ in seen.values():
    a = -np.sort(-np.abs(tx), axis=-1)
    k = int(tx.shape[-1] * (1 - s))
    ties.append(np.mean(a[:, k - 1] == a[:, k]))
  print(
    f"tokens whose k-th and (k+1)-th |x| are equal (ties at the cut), torch side, mean over sites: "
    f"{np.mean(ties):.4%}"
  )


if __name__ == "__main__":
  app.run(main)

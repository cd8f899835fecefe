"""The reference reproduction (issue 16): per-window NLLs, ulp-level weight perturbations, and the official
WINA repository's TEAL figures on SmolLM2-135M-Instruct under the Pride and Prejudice protocol
(`wina_jax.data.austen`: 16 windows of 512, each scored on its 511 next-token predictions).

`torch_window_nlls` is the independent check: transformers' own GGUF load with forward pre-hooks doing
per-token top-k of |x| on the q, k, v, o, gate, up, down inputs, k = int(d * (1 - s)) (the official rule).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from wina_jax import sites as S

# Official TEAL top-k (all 7 projections, every token) perplexities, and dense, on the protocol.
OFFICIAL_PPL = {0.0: 25.8784, 0.25: 27.128168574425427, 0.4: 32.164, 0.5: 42.85452980865065, 0.65: 158.10}
OFFICIAL_WINDOW_NLL_50 = (
  3.74261,
  4.17968,
  3.66247,
  3.76424,
  4.01361,
  3.73015,
  3.55228,
  3.67029,
  3.88942,
  3.92044,
  3.77649,
  3.66895,
  3.51219,
  3.61808,
  3.83815,
  3.58591,
)
# torch TEAL ppl with every weight scaled by (1 +- 6e-8), random signs, three seeds (issue 16, point 2).
OFFICIAL_PERTURBED_PPL = {0.5: (42.772, 42.534, 42.270), 0.65: (157.66, 158.53, 158.37)}


def ppl(nlls) -> float:
  """exp(mean of per-window mean NLLs): the protocol's perplexity (windows have equal lengths)."""
  return float(np.exp(np.mean(nlls)))


@struct.dataclass
class FixedMasks:
  """A sparsifier applying given keep-masks {site: [B, T, d] bool} (e.g. the reference's, to check that
  the two models are the same function once the masks agree). A pytree: traced under jit."""

  masks: dict

  def __call__(self, site: str, x: jax.Array, kernel: Optional[jax.Array]) -> jax.Array:
    del kernel
    m = self.masks.get(site)
    return x if m is None else jnp.where(m, x, jnp.zeros((), x.dtype))


def torch_model(gguf_path: str, dtype: str = "float32"):
  """transformers' own load of a GGUF file (eval mode, on CPU) in `dtype` ('float32' | 'float64')."""
  import os

  import torch
  import transformers

  folder, name = os.path.split(gguf_path)
  model = transformers.AutoModelForCausalLM.from_pretrained(
    folder or ".", gguf_file=name, torch_dtype=torch.float32
  )
  return model.to(getattr(torch, dtype)).eval()


TORCH_SITES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def torch_window_nlls(
  model, windows: np.ndarray, sparsity: float = 0.0, *, collect: Optional[dict] = None
) -> np.ndarray:
  """Per-window mean NLL [N] from a transformers model, with TEAL top-k of |x| at every projection input
  (k = int(d * (1 - s)), ties by torch.topk) when sparsity > 0.

  collect: a dict to fill with {site: (input [N, T, d] float64, kept-mask [N, T, d] bool)}.
  """
  import torch

  handles = []
  if sparsity > 0 or collect is not None:
    for li, layer in enumerate(model.model.layers):
      for block, names in (("self_attn", TORCH_SITES[:4]), ("mlp", TORCH_SITES[4:])):
        for n in names:
          mod = getattr(getattr(layer, block), n)
          hook = _teal_hook(S.site_name(li, block, n), sparsity, collect)
          handles.append(mod.register_forward_pre_hook(hook))
  out = []
  try:
    with torch.no_grad():
      for w in np.asarray(windows):
        ids = torch.as_tensor(w[None].astype(np.int64))
        logits = model(ids).logits[0, :-1].double()
        out.append(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))
  finally:
    for h in handles:
      h.remove()
  if collect is not None:
    for site, seen in collect.items():
      collect[site] = (np.stack([x for x, _ in seen]), np.stack([k for _, k in seen]))
  return np.asarray(out)


def _teal_hook(site: str, sparsity: float, collect: Optional[dict]):
  import torch

  def hook(module, args):
    x = args[0]
    d = x.shape[-1]
    if sparsity > 0:
      k = int(d * (1 - sparsity))
      idx = torch.topk(x.abs(), k, dim=-1).indices
      keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)
    else:
      keep = torch.ones_like(x, dtype=torch.bool)
    if collect is not None:
      collect.setdefault(site, []).append((x[0].detach().double().numpy(), keep[0].numpy()))
    return (x * keep,) + tuple(args[1:]) if sparsity > 0 else None

  return hook

"""Analytic forward FLOPs per token, as in the WINA paper's Table 5.

A matmul of a [1, n] input with an [n, m] kernel costs 2 n m FLOPs (multiply + add). Per token:

  FLOPs(s) = sum over linear sites j of 2 (1 - s_j) d_in(j) d_out(j)        (the sparsified block linears)
           + 2 d V                                                         (lm_head, always dense)
           + [transformed] 2 d^2 (2 L - 1)                                 (the transform's residual
                                     rotations: two per layer, the last layer's identity omitted; dense;
                                     2 L input rotations with post-block norms; a partial transform has
                                     fewer: `shortcuts=`)
           + [context > 0] 4 H hd * sum_l min(context, window_l)           (QK^T and AV scores, dense;
                                     window_l the layer's sliding window, `cfg.layer_config`)

with s_j the sparsity of site j's input (one float for all, or a dict by site), d the hidden size,
V the vocabulary, L the layers, H hd the query width. Norms (Gemma's q/k and post-block norms too), RoPE,
biases and the softmax are omitted (O(d) per token). The paper's four models are built from their HF configs
(no weights): `PAPER_CONFIGS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Union

from wina_jax import families
from wina_jax import sites as S
from wina_jax.config import ModelConfig

Sparsity = Union[float, Mapping[str, float]]

# The HF config.json fields that shape the forward of the WINA paper's four models.
PAPER_CONFIGS = {
  "Qwen-2.5-7B": dict(
    model_type="qwen2",
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=131072,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
    tie_word_embeddings=False,
  ),
  "Llama-2-7B": dict(
    model_type="llama",
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
  ),
  "Llama-3-8B": dict(
    model_type="llama",
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=False,
  ),
  "Phi-4-14B": dict(
    model_type="phi3",
    vocab_size=100352,
    hidden_size=5120,
    intermediate_size=17920,
    num_hidden_layers=40,
    num_attention_heads=40,
    num_key_value_heads=10,
    max_position_embeddings=16384,
    rms_norm_eps=1e-5,
    rope_theta=250000.0,
    tie_word_embeddings=False,
    pad_token_id=100349,
  ),
}


def paper_config(name: str) -> ModelConfig:
  """`ModelConfig` of one of the paper's models, through the strict HF config converter."""
  from wina_jax.convert.hf_config import from_hf_config

  if name not in PAPER_CONFIGS:
    raise ValueError(f"unknown paper model {name!r}; choose from {sorted(PAPER_CONFIGS)}")
  return from_hf_config(PAPER_CONFIGS[name])


def _site_sparsity(sparsity: Sparsity, site: str) -> float:
  s = sparsity if isinstance(sparsity, (int, float)) else sparsity.get(site, 0.0)
  if not 0.0 <= s <= 1.0:
    raise ValueError(f"sparsity {s} at {site} is outside [0, 1]")
  return float(s)


def flops_per_token(
  cfg: ModelConfig,
  sparsity: Sparsity = 0.0,
  *,
  transformed: bool = False,
  shortcuts: Optional[int] = None,
  context: int = 0,
) -> float:
  """Forward FLOPs of one token (formula in the module docstring). A dict `sparsity` maps linear sites
  ('layers.3.mlp.down_proj') to their input sparsity; missing sites count as dense. `shortcuts`: the
  number of [d, d] residual (or input) rotations if not the full transform's 2 L - 1 (2 L with post-block
  norms; a partial transform; count them with `wina_jax.transform.shortcut_cost`)."""
  if not isinstance(sparsity, (int, float)):
    unknown = set(sparsity) - set(S.linear_sites(cfg)) - set(S.act_sites(cfg))
    if unknown:
      raise ValueError(f"sparsity names sites the model lacks: {sorted(unknown)[:5]}")
  linears = sum(2.0 * (1.0 - _site_sparsity(sparsity, s)) * n for s, n in S.site_param_counts(cfg).items())
  head = 2.0 * cfg.hidden_size * cfg.vocab_size
  if shortcuts is None:
    full = 2 * cfg.num_hidden_layers - (0 if families.get(cfg.model_type).post_norms else 1)
    shortcuts = full if transformed else 0
  shortcut = 2.0 * cfg.hidden_size**2 * shortcuts
  seen = [min(context, cfg.layer_config(l).sliding_window or context) for l in range(cfg.num_hidden_layers)]
  scores = 4.0 * cfg.q_dim * sum(seen)
  return linears + head + shortcut + scores


def gflops(cfg: ModelConfig, sparsity: Sparsity = 0.0, **kw) -> float:
  """`flops_per_token` in GFLOPs."""
  return flops_per_token(cfg, sparsity, **kw) / 1e9


def paper_table(sparsities=(0.0, 0.25, 0.4, 0.5, 0.65)) -> list[dict]:
  """Rows {'model', 'sparsity', 'gflops', 'gflops_transformed'} for the paper's four models."""
  rows = []
  for name in PAPER_CONFIGS:
    cfg = paper_config(name)
    for s in sparsities:
      rows.append(
        {
          "model": name,
          "sparsity": s,
          "gflops": gflops(cfg, s),
          "gflops_transformed": gflops(cfg, s, transformed=s > 0),
        }
      )
  return rows


def paper_markdown() -> str:
  """`paper_table` as markdown: GFLOPs per token, plain and with the transform's shortcuts."""
  lines = ["| model | sparsity | GFLOPs/token | GFLOPs/token (transformed) |", "|---|---|---|---|"]
  lines += [
    f"| {r['model']} | {100 * r['sparsity']:.0f}% | {r['gflops']:.2f} | {r['gflops_transformed']:.2f} |"
    for r in paper_table()
  ]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  print(paper_markdown(), end="")

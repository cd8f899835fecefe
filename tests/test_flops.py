"""Analytic FLOPs: the paper's four configs, linearity in sparsity, and the transform's shortcut cost."""

import numpy as np
import pytest
from conftest import make_hf_model

from wina_jax import sites as S
from wina_jax.convert.load import expected_shapes, from_transformers
from wina_jax.eval import flops

# Published parameter counts of the four models (their HF model cards / safetensors indexes).
PUBLISHED = {
  "Qwen-2.5-7B": 7_615_616_512,
  "Llama-2-7B": 6_738_415_616,
  "Llama-3-8B": 8_030_261_248,
  "Phi-4-14B": 14_659_507_200,
}


@pytest.mark.parametrize("name", sorted(flops.PAPER_CONFIGS))
def test_paper_configs(name):
  cfg = flops.paper_config(name)
  shapes = expected_shapes(cfg)
  assert sum(int(np.prod(s)) for s in shapes.values()) == PUBLISHED[name]
  # dense: every kernel (and the untied lm_head) is used once per token, 2 FLOPs per weight
  kernels = sum(int(np.prod(s)) for k, s in shapes.items() if k.endswith("/kernel"))
  assert flops.flops_per_token(cfg) == 2 * kernels
  dense, head = flops.flops_per_token(cfg), 2 * cfg.hidden_size * cfg.vocab_size
  for s in (0.25, 0.4, 0.5, 0.65):
    assert flops.flops_per_token(cfg, s) == pytest.approx(head + (1 - s) * (dense - head), rel=1e-12)
    per_site = {site: s for site in S.linear_sites(cfg)}
    assert flops.flops_per_token(cfg, per_site) == pytest.approx(flops.flops_per_token(cfg, s), rel=1e-12)
  # GFLOPs shrink with sparsity but never below the dense lm_head
  table = [r for r in flops.paper_table() if r["model"] == name]
  g = [r["gflops"] for r in table]
  assert g == sorted(g, reverse=True) and g[-1] > head / 1e9


def test_per_site_sparsity_and_attention_context():
  cfg = flops.paper_config("Llama-3-8B")
  only_down = {S.site_name(l, "mlp", "down_proj"): 0.5 for l in range(cfg.num_hidden_layers)}
  saved = flops.flops_per_token(cfg) - flops.flops_per_token(cfg, only_down)
  assert saved == cfg.num_hidden_layers * cfg.intermediate_size * cfg.hidden_size  # 2 * 0.5 * I * d per layer
  ctx = flops.flops_per_token(cfg, context=100) - flops.flops_per_token(cfg)
  assert ctx == 4 * cfg.num_hidden_layers * cfg.q_dim * 100
  with pytest.raises(ValueError, match="lacks"):
    flops.flops_per_token(cfg, {"layers.99.mlp.down_proj": 0.5})
  with pytest.raises(ValueError, match="outside"):
    flops.flops_per_token(cfg, 1.5)


@pytest.mark.parametrize("name", ["llama_mha", "gemma3"])  # residual shortcuts; input rotations
def test_shortcut_overhead_matches_the_transformed_params(name):
  from wina_jax.transform import shortcut_cost, transform

  params, cfg = from_transformers(make_hf_model(name))
  tparams, tcfg = transform(params, cfg)
  extra = flops.flops_per_token(tcfg, 0.5, transformed=True) - flops.flops_per_token(tcfg, 0.5)
  assert extra == shortcut_cost(tparams, tcfg)["flops"]


def test_local_layers_attend_to_their_window_only():
  """gemma3's tiny config: layers 0 and 2 slide over 4 positions, layer 1 sees the whole context."""
  cfg = from_transformers(make_hf_model("gemma3"))[1]
  ctx = flops.flops_per_token(cfg, context=100) - flops.flops_per_token(cfg)
  assert ctx == 4 * cfg.q_dim * (4 + 100 + 4)

"""Model families: the registry covers every family, and each family's `proj_shapes` matches transformers."""

import numpy as np
import pytest
from conftest import TINY, TINY_CONFIGS, make_hf_model

from wina_jax import families, sharding
from wina_jax import sites as S
from wina_jax.convert.hf_config import from_hf_config
from wina_jax.convert.load import expected_shapes, from_transformers
from wina_jax.decode import fuse_projections, fused_site_shapes
from wina_jax.transform import key_kernel


def _model_type(name):
  return make_hf_model(name).config.model_type


def test_registry_covers_every_family_and_each_has_a_parity_config():
  assert set(families.known()) == {"llama", "mistral", "qwen2", "phi3", "gemma3_text"}
  assert {_model_type(n) for n in TINY_CONFIGS} == set(families.known())
  for name in families.known():
    assert families.get(name).name == name
  with pytest.raises(ValueError, match=r"gpt2.*wina_jax/families/<name>\.py"):
    families.get("gpt2")
  assert families.for_gguf_arch("llama") is families.get("llama")
  assert families.for_gguf_arch("qwen2") is families.get("qwen2")
  assert families.for_gguf_arch("gemma3") is families.get("gemma3_text")
  with pytest.raises(ValueError, match="GGUF architecture 'falcon' is not supported"):
    families.for_gguf_arch("falcon")
  # the name tables derived from the families (WINA's official c sites, calibration's input groups)
  assert families.key_projections() == {"k_proj", "gate_proj", "qkv_proj", "gate_up_proj"}
  projs = (
    "q_proj",
    "k_proj",
    "v_proj",
    "qkv_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "gate_up_proj",
    "down_proj",
  )
  assert {p: families.input_group(p) for p in projs} == {
    "q_proj": "q_proj",
    "k_proj": "q_proj",
    "v_proj": "q_proj",
    "qkv_proj": "q_proj",
    "o_proj": "o_proj",
    "gate_proj": "gate_proj",
    "up_proj": "gate_proj",
    "gate_up_proj": "gate_proj",
    "down_proj": "down_proj",
  }


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_proj_shapes_match_transformers_and_converted_params(name):
  hf = make_hf_model(name)
  params, cfg = from_transformers(hf)
  shapes = families.proj_shapes(cfg)
  for block, projs in shapes.items():
    mod = getattr(hf.model.layers[0], block)
    hf_projs = {n: tuple(reversed(m.weight.shape)) for n, m in mod.named_children() if n.endswith("_proj")}
    assert hf_projs == projs  # names and [in, out], fused ones included
    for layer in range(cfg.num_hidden_layers):
      for proj, s in projs.items():
        assert params["layers"][str(layer)][block][proj]["kernel"].shape == s
    assert S.block_sites(cfg, block) == tuple(projs)
  flat = expected_shapes(cfg)
  layer_kernels = sum(
    int(np.prod(s)) for k, s in flat.items() if k.startswith("layers/") and k.endswith("/kernel")
  )
  assert layer_kernels == sum(S.site_param_counts(cfg).values())
  # every parameter has a partition rule of its family
  mesh = sharding.make_mesh("model:1")
  for path, s in flat.items():
    sharding.spec_for(path, s, cfg, mesh)


@pytest.mark.parametrize("name", ["llama_gqa_tied", "qwen2_bias", "mistral"])
def test_fused_layout_locates_the_unfused_parts(name):
  """`fuse_projections` + `Family.locate` give back the unfused kernels (the transform's key slice)."""
  params, cfg = from_transformers(make_hf_model(name))
  fparams, fcfg = fuse_projections(params, cfg)
  family = families.get(cfg.model_type)
  for block, projs in family.layout(cfg).items():
    for proj in projs:
      stored, cols = family.locate(fcfg, block, proj)
      np.testing.assert_array_equal(
        fparams["layers"]["0"][block][stored]["kernel"][:, cols], params["layers"]["0"][block][proj]["kernel"]
      )
    np.testing.assert_array_equal(
      key_kernel(fparams["layers"]["1"], fcfg, block), key_kernel(params["layers"]["1"], cfg, block)
    )
  assert [(d_in, sum(w)) for d_in, w in fused_site_shapes(cfg)] == [
    s for projs in families.proj_shapes(fcfg).values() for s in projs.values()
  ]


def test_family_config_fields_are_family_specific():
  """A field one family maps is refused for a family that lacks it (the per-family whitelist)."""
  base = {k: v for k, v in TINY.items() if k != "initializer_range"}
  assert from_hf_config({"model_type": "qwen2", **base}).attention_bias
  assert from_hf_config({"model_type": "mistral", **base, "sliding_window": 8}).sliding_window == 8
  with pytest.raises(ValueError, match=r"\['sliding_window'\].*wina_jax/families/llama\.py"):
    from_hf_config({"model_type": "llama", **base, "sliding_window": 8})
  with pytest.raises(ValueError, match="rope_type 'llama3' is not supported for model_type 'qwen2'"):
    from_hf_config(
      {
        "model_type": "qwen2",
        **base,
        "rope_parameters": dict(
          rope_type="llama3",
          rope_theta=5e5,
          factor=8.0,
          low_freq_factor=1.0,
          high_freq_factor=4.0,
          original_max_position_embeddings=32,
        ),
      }
    )


def test_gemma3_features_come_from_the_family_declarations():
  """gemma3's config turns on the generic features; layer_config resolves each layer's window and rope;
  config fields gemma3 cannot reproduce are refused by name."""
  hf = make_hf_model("gemma3")
  cfg = from_transformers(hf)[1]
  fam = families.get(cfg.model_type)
  assert fam.post_norms and not families.get("llama").post_norms
  assert fam.source == "wina_jax/families/gemma3.py"
  assert (cfg.hidden_act, cfg.norm_offset, cfg.qk_norm) == ("gelu_pytorch_tanh", 1.0, True)
  assert cfg.embed_scale == 8.0 and cfg.attn_scale == 24**-0.5
  local, full = cfg.layer_config(0), cfg.layer_config(1)
  assert (local.sliding_window, local.rope_theta, local.rope_scaling) == (4, 100.0, None)
  assert (full.sliding_window, full.rope_theta, full.rope_scaling.kind) == (None, 1e4, "linear")
  assert cfg.layer_config(2) == local
  flat = expected_shapes(cfg)
  assert flat["layers/0/self_attn/q_norm/scale"] == (cfg.head_dim,)
  assert {k.split("/")[2] for k in flat if k.startswith("layers/0/") and k.endswith("layernorm/scale")} == {
    "input_layernorm",
    "post_attention_layernorm",
    "pre_feedforward_layernorm",
    "post_feedforward_layernorm",
  }
  d = {k: v for k, v in hf.config.to_dict().items() if k not in ("architectures", "dtype")}
  for field, value in (("final_logit_softcapping", 30.0), ("attn_logit_softcapping", 50.0)):
    with pytest.raises(ValueError, match=f"{field}=.*not supported"):
      from_hf_config({**d, field: value})
  with pytest.raises(ValueError, match="hidden_activation 'silu' is not supported"):
    from_hf_config({**d, "hidden_activation": "silu"})
  with pytest.raises(ValueError, match=r"\['query_pre_attn_scalar'\].*wina_jax/families/llama\.py"):
    from_hf_config({"model_type": "llama", **{k: v for k, v in TINY.items()}, "query_pre_attn_scalar": 3})

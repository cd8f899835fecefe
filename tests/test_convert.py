"""Checkpoint folders, GGUF q/k un-permutation, and the strict config whitelist."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY, make_hf_model

from wina_jax.convert import from_hf_checkpoint, from_hf_config, from_transformers
from wina_jax.convert.load import check_shapes, load, unpermute_qk
from wina_jax.model import forward


@pytest.mark.parametrize("shard", [False, True])
def test_safetensors_folder_roundtrip(tmp_path, shard, rng):
  model = make_hf_model("qwen2_bias")
  model.save_pretrained(tmp_path, max_shard_size="20KB" if shard else "1GB")
  assert (tmp_path / "model.safetensors.index.json").exists() == shard
  params, cfg = from_hf_checkpoint(str(tmp_path))
  ref, _ = from_transformers(model)
  tokens = jnp.asarray(rng.randint(0, cfg.vocab_size, (1, 9)))
  np.testing.assert_array_equal(forward(params, tokens, cfg).logits, forward(ref, tokens, cfg).logits)


def test_pickle_checkpoints_are_refused(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", **TINY}))
  torch.save({}, tmp_path / "pytorch_model.bin")
  with pytest.raises(FileNotFoundError, match="pickle"):
    from_hf_checkpoint(str(tmp_path))


def test_unpermute_inverts_llama_cpp_permutation(rng):
  n_heads, head_dim, d_in = 3, 8, 5
  w = rng.randn(n_heads * head_dim, d_in)
  # llama.cpp's convert script: reshape(n_head, 2, hd/2, d_in).swapaxes(1, 2)
  permuted = w.reshape(n_heads, 2, head_dim // 2, d_in).swapaxes(1, 2).reshape(w.shape)
  np.testing.assert_array_equal(unpermute_qk(permuted, n_heads), w)


def test_unknown_config_field_is_named():
  with pytest.raises(ValueError, match="frobnicate"):
    from_hf_config({"model_type": "llama", **TINY, "frobnicate": 3})


def test_unsupported_settings_raise():
  with pytest.raises(ValueError, match="hidden_act"):
    from_hf_config({"model_type": "llama", **TINY, "hidden_act": "gelu"})
  with pytest.raises(ValueError, match="rope_type 'yarn'"):
    from_hf_config({"model_type": "llama", **TINY, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
  with pytest.raises(ValueError, match="model_type 'gpt2'"):
    from_hf_config({"model_type": "gpt2"})


def test_quantization_other_than_gguf_raises_naming_it():
  bnb = {"quant_method": "bitsandbytes", "load_in_4bit": True}
  with pytest.raises(ValueError, match="quantization_config \\(quant_method 'bitsandbytes'\\)"):
    from_hf_config({"model_type": "llama", **TINY, "quantization_config": bnb})
  gguf = {"quant_method": "gguf", "gguf_file": "m.gguf", "dequantize": False}
  cfg = from_hf_config(
    {
      "model_type": "llama",
      **TINY,
      "quantization_config": gguf,
      "unk_token_id": 0,
      "_model_name_or_path": "SmolLM2",
    }
  )
  assert cfg == from_hf_config({"model_type": "llama", **TINY})


def test_default_valued_fields_are_accepted():
  cfg = from_hf_config({"model_type": "llama", **TINY, "pretraining_tp": 1, "use_cache": False})
  assert cfg.hidden_size == TINY["hidden_size"]


def test_mismatched_param_shapes_raise():
  params, cfg = from_transformers(make_hf_model("llama_mha"))
  from flax import traverse_util

  flat = traverse_util.flatten_dict(params, sep="/")
  check_shapes(flat, cfg)  # the real params pass
  flat["layers/1/mlp/up_proj/kernel"] = np.zeros((cfg.intermediate_size, cfg.hidden_size))
  with pytest.raises(
    ValueError,
    match=r"layers/1/mlp/up_proj/kernel: shape \(96, 64\) but the config "
    r"implies \(64, 96\)",
  ):
    check_shapes(flat, cfg)


def test_missing_model_file_says_how_to_fetch(tmp_path):
  known = "absent.gguf.*Known names:\n  smollm2-135m: .*\n  qwen2.5-coder"
  with pytest.raises(FileNotFoundError, match=known):
    load(str(tmp_path / "absent.gguf"))
  from wina_jax import assets

  with pytest.raises(FileNotFoundError, match="make setup"):
    assets.package_dir("surely_not_installed_pkg", "x==1")
  assert assets.model_path("") == assets.model_path("smollm2-135m") == assets.default_gguf()
  assert assets.model_path(str(tmp_path)) == str(tmp_path)  # an existing path is taken as it is


def test_sequence_longer_than_max_positions_raises():
  params, cfg = from_transformers(make_hf_model("llama_mha"))
  with pytest.raises(ValueError, match="max_position_embeddings"):
    forward(params, jnp.zeros((1, cfg.max_position_embeddings + 1), jnp.int32), cfg)

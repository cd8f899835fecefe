"""The GGUF path end to end on tiny llama / qwen2 models written with gguf.GGUFWriter (llama.cpp names,
llama's q/k permutation, quantised types gguf-py can write), plus the conversion cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import make_hf_model

from wina_jax.convert import from_gguf, from_transformers
from wina_jax.model import forward

GGUF_NAMES = {
  "self_attn.q_proj": "attn_q",
  "self_attn.k_proj": "attn_k",
  "self_attn.v_proj": "attn_v",
  "self_attn.o_proj": "attn_output",
  "mlp.gate_proj": "ffn_gate",
  "mlp.up_proj": "ffn_up",
  "mlp.down_proj": "ffn_down",
  "input_layernorm": "attn_norm",
  "post_attention_layernorm": "ffn_norm",
}


def _permute(w, n_heads):  # what llama.cpp's converter does to q/k rows
  return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, path, arch="llama", qtype=None):
  """Write `model` as llama.cpp would: q/k rows permuted for llama only; 2-D weights as `qtype` if given."""
  import gguf

  c = model.config
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_vocab_size(c.vocab_size)
  for name, t in model.state_dict().items():
    a = t.detach().numpy().astype(np.float32)
    if name == "model.embed_tokens.weight":
      out = "token_embd.weight"
    elif name == "model.norm.weight":
      out = "output_norm.weight"
    elif name == "lm_head.weight":
      if c.tie_word_embeddings:
        continue
      out = "output.weight"
    else:
      _, _, layer, rest = name.split(".", 3)
      key, kind = rest.rsplit(".", 1)
      out = f"blk.{layer}.{GGUF_NAMES[key]}.{kind}"
      if arch == "llama" and key == "self_attn.q_proj":
        a = _permute(a, c.num_attention_heads)
      elif arch == "llama" and key == "self_attn.k_proj":
        a = _permute(a, c.num_key_value_heads)
    if qtype is not None and a.ndim == 2:
      w.add_tensor(out, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    else:
      w.add_tensor(out, a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.mark.parametrize("name", ["llama_gqa_tied", "llama_mha"])
def test_gguf_matches_transformers(name, tmp_path, monkeypatch, rng):
  monkeypatch.setenv("WINA_JAX_CACHE", str(tmp_path / "cache"))
  model = make_hf_model(name)
  write_tiny_gguf(model, tmp_path / "tiny.gguf")
  params, cfg = from_gguf(str(tmp_path / "tiny.gguf"))
  ref_params, ref_cfg = from_transformers(model)
  assert cfg.tie_word_embeddings == ref_cfg.tie_word_embeddings
  tokens = rng.randint(0, cfg.vocab_size, (1, 11))
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(forward(params, jnp.asarray(tokens), cfg).logits, ref, atol=1e-4)
  # second load comes from the cache and is identical
  assert any((tmp_path / "cache").iterdir())
  cached, cached_cfg = from_gguf(str(tmp_path / "tiny.gguf"))
  assert cached_cfg == cfg
  for a, b in zip(jax.tree.leaves(cached), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0"])
def test_qwen2_gguf_roundtrip(qtype, tmp_path, monkeypatch, rng):
  """qwen2 (q/k/v biases, untied lm_head, no q/k permutation): config and params equal the HF model's with
  its 2-D weights replaced by their quantise -> dequantise round trip; logits match torch."""
  import gguf

  monkeypatch.setenv("WINA_JAX_CACHE", "off")
  model = make_hf_model("qwen2_bias")
  qt = gguf.GGMLQuantizationType[qtype]
  write_tiny_gguf(model, tmp_path / "tiny.gguf", arch="qwen2", qtype=qt)
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 2:
        p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), qt), qt)))
  params, cfg = from_gguf(str(tmp_path / "tiny.gguf"))
  ref_params, ref_cfg = from_transformers(model)
  assert cfg.replace(rms_norm_eps=ref_cfg.rms_norm_eps) == ref_cfg  # GGUF stores eps as float32
  assert np.float32(cfg.rms_norm_eps) == np.float32(ref_cfg.rms_norm_eps)
  assert cfg.model_type == "qwen2" and cfg.attention_bias and not cfg.tie_word_embeddings
  assert "bias" in params["layers"]["1"]["self_attn"]["k_proj"]
  jax.tree.map(np.testing.assert_array_equal, params, ref_params)
  tokens = rng.randint(0, cfg.vocab_size, (1, 11))
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(forward(params, jnp.asarray(tokens), cfg).logits, ref, atol=1e-4)


def test_unhandled_gguf_metadata_is_named(tmp_path, monkeypatch):
  import gguf

  monkeypatch.setenv("WINA_JAX_CACHE", "off")
  path = tmp_path / "odd.gguf"
  w = gguf.GGUFWriter(str(path), "llama")
  w.add_float32("llama.rope.scaling.factor", 4.0)
  w.add_block_count(2)
  w.add_tensor("token_embd.weight", np.zeros((97, 64), np.float32))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  with pytest.raises(ValueError, match="llama.rope.scaling.factor"):
    from_gguf(str(path))

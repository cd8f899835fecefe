"""Load params from a live `transformers` model, an HF checkpoint folder (safetensors) or a GGUF file.

All loaders return `(params, cfg)`; params follow the layout in `wina_jax.model` ([in, out] kernels).
Pickle checkpoints (`*.bin`, `*.pt`) are never loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from wina_jax import assets, families
from wina_jax.config import ModelConfig
from wina_jax.convert import cache, names
from wina_jax.convert.gguf_config import gguf_hf_config
from wina_jax.convert.hf_config import from_hf_config


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """Flat {'layers/0/mlp/up_proj/kernel': shape} for every parameter `cfg` implies (kernels from
  `families.proj_shapes`, norms from the family's `norms`; q/k/v biases with `attention_bias`, o_proj's with
  `o_bias`, the MLP's with `mlp_bias`; q/k norms with `qk_norm`)."""
  d = cfg.hidden_size
  out = {"embed_tokens/embedding": (cfg.vocab_size, d), "norm/scale": (d,)}
  if not cfg.tie_word_embeddings:
    out["lm_head/kernel"] = (d, cfg.vocab_size)
  biased = lambda block, proj: (
    cfg.mlp_bias if block == "mlp" else cfg.o_bias if proj == "o_proj" else cfg.attention_bias
  )
  shapes = families.proj_shapes(cfg)
  norms = [n for pair in families.get(cfg.model_type).norms.values() for n in pair if n is not None]
  for l in range(cfg.num_hidden_layers):
    p = f"layers/{l}"
    for n in norms:
      out[f"{p}/{n}/scale"] = (d,)
    if cfg.qk_norm:
      out[f"{p}/self_attn/q_norm/scale"] = out[f"{p}/self_attn/k_norm/scale"] = (cfg.head_dim,)
    for block, projs in shapes.items():
      for n, s in projs.items():
        out[f"{p}/{block}/{n}/kernel"] = s
        if biased(block, n):
          out[f"{p}/{block}/{n}/bias"] = (s[1],)
  return out


def check_shapes(flat: Mapping[str, np.ndarray], cfg: ModelConfig) -> None:
  """Raise a ValueError naming every missing, unexpected or mis-shaped tensor."""
  want = expected_shapes(cfg)
  problems = [
    f"{k}: shape {tuple(v.shape)} but the config implies {want[k]}"
    for k, v in flat.items()
    if k in want and tuple(v.shape) != want[k]
  ]
  problems += [f"unexpected {k} {tuple(v.shape)}" for k, v in flat.items() if k not in want]
  problems += [f"missing {k} {s}" for k, s in want.items() if k not in flat]
  if problems:
    raise ValueError(
      "params do not match the config:\n  "
      + "\n  ".join(problems[:20])
      + ("\n  ..." if len(problems) > 20 else "")
    )


def _to_params(flat: dict[str, np.ndarray], cfg: ModelConfig, dtype) -> dict:
  """Nested jax params from `flat`, which is consumed (one tensor at a time: peak ~ one model copy)."""
  check_shapes(flat, cfg)
  return traverse_util.unflatten_dict({k: jnp.asarray(flat.pop(k), dtype) for k in list(flat)}, sep="/")


def _convert(tensors: dict[str, np.ndarray], cfg: ModelConfig, dtype) -> dict:
  """`from_state_dict` on a dict it may consume: each source array is dropped once converted."""
  flat, family = {}, families.get(cfg.model_type)
  for name in list(tensors):
    arr = tensors.pop(name)
    target = names.hf_target(name, family)
    if target is None:
      continue
    path, hook = target
    if path == "lm_head/kernel" and cfg.tie_word_embeddings:
      continue  # HF state dicts repeat the tied embedding as lm_head.weight
    flat[path] = names.HOOKS[hook](np.asarray(arr, np.float32))
  return _to_params(flat, cfg, dtype)


def from_state_dict(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, dtype=jnp.float32) -> dict:
  """Params from HF-named [out, in] torch-layout arrays (numpy)."""
  return _convert(dict(tensors), cfg, dtype)


def from_transformers(model, dtype=jnp.float32) -> tuple[dict, ModelConfig]:
  """Params and config from a live `transformers` causal LM (torch)."""
  cfg = from_hf_config(model.config)
  sd = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
  return _convert(sd, cfg, dtype), cfg


def _safetensors_files(path: str) -> list[str]:
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    with open(index) as f:
      return sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(single):
    return [single]
  pickles = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
  hint = (
    (
      f" It holds pickle files {pickles}, which wina_jax never loads: re-save the model with "
      "`model.save_pretrained(dir, safe_serialization=True)`."
    )
    if pickles
    else ""
  )
  raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}.{hint}")


def from_hf_checkpoint(path: str, dtype=jnp.float32) -> tuple[dict, ModelConfig]:
  """Params and config from an HF folder: config.json + model.safetensors (sharded index included)."""
  from safetensors import safe_open

  cfg_file = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_file):
    raise FileNotFoundError(f"{cfg_file} not found; an HF checkpoint folder needs config.json")
  with open(cfg_file) as f:
    cfg = from_hf_config(json.load(f))
  tensors = {}
  for file in _safetensors_files(path):
    with safe_open(file, framework="flax") as f:
      for k in f.keys():
        tensors[k] = np.asarray(f.get_tensor(k).astype(jnp.float32))
  return _convert(tensors, cfg, dtype), cfg


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's interleaving of q/k rows: [out, in] torch layout in and out."""
  d_out, d_in = w.shape
  return w.reshape(n_heads, d_out // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(d_out, d_in)


def _dequantize(t, rows_per_chunk: int = 8192) -> np.ndarray:
  """float32 [out, in] array of a GGUF tensor, dequantised in row chunks (bounded temporaries)."""
  import gguf

  shape = tuple(int(n) for n in reversed(t.shape))
  data = t.data.reshape(shape[0], -1) if len(shape) == 2 else t.data
  if len(shape) == 1:
    return gguf.quants.dequantize(data, t.tensor_type).astype(np.float32).reshape(shape)
  out = np.empty(shape, np.float32)
  for i in range(0, shape[0], rows_per_chunk):
    out[i : i + rows_per_chunk] = gguf.quants.dequantize(data[i : i + rows_per_chunk], t.tensor_type)
  return out


def _gguf_tensors(path: str) -> tuple[dict[str, np.ndarray], ModelConfig]:
  """HF-named [out, in] float32 arrays and the config of a GGUF file (the slow part: ~15 s for SmolLM2)."""
  from wina_jax.convert.gguf_file import open_gguf

  reader = open_gguf(path)
  cfg = from_hf_config(gguf_hf_config(reader))
  family = families.get(cfg.model_type)
  tensors = {}
  for t in reader.tensors:
    name = names.gguf_to_hf(t.name, family)
    if name is None:
      continue
    w = _dequantize(t)
    if family.gguf_norm_shift and name.endswith("norm.weight"):
      w = w - np.float32(family.gguf_norm_shift)
    if family.gguf_permuted_qk and name.endswith("q_proj.weight"):
      w = unpermute_qk(w, cfg.num_attention_heads)
    elif family.gguf_permuted_qk and name.endswith("k_proj.weight"):
      w = unpermute_qk(w, cfg.num_key_value_heads)
    tensors[name] = w
  return tensors, cfg


def from_gguf(path: str, dtype=jnp.float32, use_cache: bool = True) -> tuple[dict, ModelConfig]:
  """Params and config from a llama / qwen2 / gemma3 GGUF file, dequantised tensor by tensor with numpy
  (`gguf`).

  use_cache: reuse the dequantised arrays from `wina_jax.convert.cache` (keyed by the file's identity).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file {path} not found. For the default model, {assets.FETCH_HINT}")
  build = lambda: _gguf_tensors(path)
  tensors, cfg = cache.cached_arrays(path, build) if use_cache else build()
  return _convert(tensors, cfg, dtype), cfg


def read_config(name_or_path: str = "") -> ModelConfig:
  """The config of what `load` would load, without its weights: from the GGUF header (checked complete:
  `gguf_file.open_gguf`, ~2 s for SmolLM2; from the cache entry when one exists) or config.json."""
  path = assets.model_path(name_or_path)
  if os.path.isdir(path):
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
      raise FileNotFoundError(f"{cfg_file} not found; an HF checkpoint folder needs config.json")
    with open(cfg_file) as f:
      return from_hf_config(json.load(f))
  if not path.endswith(".gguf"):
    raise ValueError(f"model file {path!r} is not a .gguf file; pass a GGUF file or an HF checkpoint folder")
  if (cfg := cache.cached_config(path)) is not None:
    return cfg
  from wina_jax.convert.gguf_file import open_gguf

  return from_hf_config(gguf_hf_config(open_gguf(path)))


def load_default(dtype=jnp.float32) -> tuple[dict, ModelConfig]:
  """The embedded default model: SmolLM2-135M-Instruct from the bundled GGUF."""
  return from_gguf(assets.default_gguf(), dtype)


def load(name_or_path: str = "", dtype=jnp.float32) -> tuple[dict, ModelConfig]:
  """Params and config of a model in `assets.MODELS` ('' = 'smollm2-135m'; 'qwen2.5-coder-1.5b',
  'gemma3-270m'), a .gguf
  file or an HF checkpoint folder (config.json + safetensors)."""
  path = assets.model_path(name_or_path)
  if os.path.isdir(path):
    return from_hf_checkpoint(path, dtype)
  if not path.endswith(".gguf"):
    raise ValueError(
      f"model file {path!r} is not a .gguf file; pass a GGUF file, an HF checkpoint folder "
      f"or one of {sorted(assets.MODELS)}"
    )
  return from_gguf(path, dtype)

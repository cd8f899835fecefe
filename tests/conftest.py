"""Shared fixtures: float32 matmuls at full precision, tiny HF models, the real SmolLM2, transformers' cached
references for the real GGUF models."""

import gc
import hashlib
import os

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_configure(config):
  """One JAX compilation cache per test session, shared by both xdist workers and by every process they
  start (notebook kernels, scripts run as subprocesses): the same jitted step compiled in one is read back by
  the others. The controller makes the folder before the workers start, so they inherit it through the
  environment; a session's cache starts empty and ends with it, so no test reads a stale executable."""
  if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="wina_jax_test_xla_cache_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update(
    "jax_persistent_cache_min_compile_time_secs",
    float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")),
  )


def pytest_collection_modifyitems(config, items):
  """Tests marked `slow` run first (stable order otherwise): under `pytest -n 2` the long ones then overlap
  the many short ones instead of leaving one worker idle at the end. Mark no test whose module fixture its
  neighbours share (test_inputs' `walked`): moved apart, the two workers would each build it."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def once_per_session(tmp_path_factory, name: str, build):
  """build() -> a JSON value, computed by one process per test session: under xdist the first worker to ask
  builds it while the other waits on a lock, then reads the stored result (a module fixture split across the
  two workers would otherwise be built twice). Without xdist it is simply built."""
  if "PYTEST_XDIST_WORKER" not in os.environ:
    return build()
  import fcntl
  import json

  shared = tmp_path_factory.getbasetemp().parent  # one folder per session, above each worker's own
  with open(shared / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    done = shared / f"{name}.json"
    if done.is_file():
      return json.loads(done.read_text())
    value = build()
    tmp = shared / f"{name}.json.tmp"
    tmp.write_text(json.dumps(value))
    tmp.replace(done)
    return json.loads(done.read_text())  # the same types the waiting worker gets (tuples become lists)


TINY = dict(
  vocab_size=97,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=4,
  max_position_embeddings=128,
  initializer_range=0.1,
)

# name -> (config class name, overrides): MHA, GQA + tied, llama3 rope, qwen2 biases, mistral, phi3.
TINY_CONFIGS = {
  "llama_mha": ("LlamaConfig", {}),
  "llama_gqa_tied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True)),
  "llama3_rope": (
    "LlamaConfig",
    dict(
      num_key_value_heads=1,
      rope_parameters=dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=32,
      ),
    ),
  ),
  "qwen2_bias": ("Qwen2Config", dict(num_key_value_heads=2)),
  "mistral": ("MistralConfig", dict(num_key_value_heads=2, sliding_window=8)),
  "phi3_fused": ("Phi3Config", dict(num_key_value_heads=2, pad_token_id=0, eos_token_id=1)),
  # local (window 4, rope base 100) / global (linear-scaled rope 1e4) layers, q/k norms, sandwich norms,
  # GeGLU, a score scale apart from head_dim's; 3 layers so both kinds and a repeat are covered
  "gemma3": (
    "Gemma3TextConfig",
    dict(
      num_hidden_layers=3,
      num_key_value_heads=2,
      head_dim=16,
      query_pre_attn_scalar=24,
      sliding_window=4,
      layer_types=["sliding_attention", "full_attention", "sliding_attention"],
      rope_parameters=dict(
        full_attention=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
        sliding_attention=dict(rope_type="default", rope_theta=100.0),
      ),
    ),
  ),
}


def make_hf_model(name: str, seed: int = 0):
  """A random-weight transformers model for one of TINY_CONFIGS (eager attention, eval mode)."""
  import torch
  import transformers

  cls, overrides = TINY_CONFIGS[name]
  cfg = getattr(transformers, cls)(**{**TINY, **overrides})
  cfg._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
  with torch.no_grad():  # (1 + w) norms start at w = 0: random gains, so the convention is exercised
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") and not p.any():
        p.normal_(0.0, 0.5)
  return model


@pytest.fixture(scope="session")
def smollm2():
  """(params, cfg) of the real SmolLM2-135M-Instruct, loaded from the bundled GGUF."""
  from wina_jax.convert import load_default

  return load_default()


@pytest.fixture(scope="session")
def smollm2_tokenizer():
  from wina_jax import assets
  from wina_jax.tokenizer import load_tokenizer

  return load_tokenizer(assets.default_gguf())


@pytest.fixture
def rng():
  return np.random.RandomState(0)


def gguf_reference(tag: str, path: str, sha256: str, ids: np.ndarray, gen: int, model_type: str):
  """(transformers' float32 logits [1, T, vocab] of `ids` [1, T], its greedy `gen` tokens) for the GGUF at
  `path` (sha256 `sha256`), loaded by transformers itself (minutes on 2 cores), cached in the cache root as
  `{tag}-reference-{key}.npz`, key: the file's sha256, the transformers version and the tokens (a machine pays
  for it once)."""
  import torch
  import transformers

  from wina_jax import assets

  key = hashlib.sha1(f"{sha256}|{transformers.__version__}|{ids.tobytes().hex()}".encode()).hexdigest()[:16]
  cached = os.path.join(assets.cache_root(), f"{tag}-reference-{key}.npz")
  if os.path.isfile(cached):
    with np.load(cached) as z:
      return z["logits"], z["gen"]
  folder, name = os.path.split(path)
  hf = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
  assert hf.config.model_type == model_type, hf.config.model_type
  with torch.no_grad():
    logits = hf(torch.tensor(ids)).logits.numpy()
    out = hf.generate(torch.tensor(ids), max_new_tokens=gen, do_sample=False)[0, ids.shape[1] :].numpy()
  del hf
  gc.collect()
  tmp = cached + f".{os.getpid()}.npz"
  np.savez(tmp, logits=logits, gen=out)
  os.replace(tmp, cached)
  return logits, out

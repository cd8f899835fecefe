"""Run one computation in a fresh process and print its peak resident memory above the start (JSON): the
peak (VmHWM) is reset after the imports, so it is the run's own.

  python tests/memory_probe.py forward|calibration|transform BATCH_OR_WINDOWS SEQ_LEN
The config is `CFG` below (random float32 params); used by tests/test_memory.py.
"""

import json
import sys

import jax
import numpy as np

from wina_jax.config import ModelConfig

CFG = ModelConfig(
  model_type="llama",
  vocab_size=8000,
  hidden_size=256,
  intermediate_size=1024,
  num_hidden_layers=2,
  num_attention_heads=8,
  num_key_value_heads=4,
  head_dim=32,
  max_position_embeddings=8192,
)


def status_kib(key: str) -> int:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def reset_peak() -> int:
  """Reset the peak resident size (VmHWM) to the current one (Linux: /proc/self/clear_refs '5'); -> bytes
  resident now."""
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  return status_kib("VmRSS") * 1024


def peak() -> int:
  return status_kib("VmHWM") * 1024


def main(kind: str, n: int, t: int) -> None:
  import jax.numpy as jnp

  from wina_jax import sparsity, transform
  from wina_jax.eval.perplexity import perplexity

  base = reset_peak()  # after jax's import: its own high-water mark is not the run's
  from wina_jax.testing import random_params

  params = random_params(CFG, 0, jnp.float32)
  windows = np.random.default_rng(0).integers(0, CFG.vocab_size, (n, t)).astype(np.int32)
  if kind == "forward":
    perplexity(params, CFG, windows, batch_size=n, progress=False)
  elif kind == "calibration":
    sparsity.calibrate(params, CFG, "teal", windows, progress=False)
  else:
    jax.block_until_ready(transform.transform(params, CFG))
  print(json.dumps({"peak": peak() - base, "base": base}))


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))

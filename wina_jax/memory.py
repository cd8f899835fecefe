"""Peak memory of a run, estimated from the config and shapes before anything is allocated.

  forward(cfg, batch, seq_len)            full forward + the log-softmax of the logits (perplexity)
  calibration(cfg, windows, seq_len)      `sparsity.calibrate`: every window's hidden state, one layer at a time
  transform(cfg)                          `wina_jax.transform`: both param copies, the bases and shortcuts

Each returns {part: bytes} (sum = the estimate); `check(parts, what, advice)` refuses a run whose estimate
exceeds the memory available (the accelerator's free memory, else the host's MemAvailable; the
environment variable WINA_JAX_MEMORY, e.g. '8G', caps it), naming the estimate and the flags to change.

The model: params + the largest set of arrays live at once. In a layer that is the attention scores and
their softmax ([B, H, T, T] float32, twice) or the MLP's gate, up and product ([B, T, I], three times),
with the residual stream; after the last layer the logits and their log-softmax ([B, T, V] float32, twice).
Measured against the peak resident memory of CPU runs (`tests/test_memory.py`, docs/memory.md): within
MEASURED_ERROR of the measured peak at two sizes.
"""

from __future__ import annotations

import math
import os

from wina_jax.config import ModelConfig
from wina_jax.convert.load import expected_shapes

GIB = 1 << 30
MEASURED_ERROR = 0.25  # |estimate - measured| / measured bound, from tests/test_memory.py
F32 = 4
RUNTIME = 128 << 20  # XLA's compiler and runtime working set beyond jax's import (measured on CPU)


def param_bytes(cfg: ModelConfig, dtype_bytes: int = F32) -> int:
  return sum(math.prod(s) for s in expected_shapes(cfg).values()) * dtype_bytes


def layer_peak(
  cfg: ModelConfig, batch: int, seq_len: int, act_bytes: int = F32, copies: float = 4
) -> dict[str, int]:
  """{part: bytes} of one decoder layer's largest live set on [batch, seq_len] inputs: `copies` float32
  [B, H, T, T] arrays in the attention (scores, masked, exp, probs) or the MLP's [B, T, I] gate, up and
  product, with the residual stream."""
  b, t = batch, seq_len
  attn = int(copies * b * cfg.num_attention_heads * t * t * F32)
  mlp = 3 * b * t * cfg.intermediate_size * act_bytes
  return {
    "attention" if attn >= mlp else "mlp": max(attn, mlp),
    "residual": 4 * b * t * cfg.hidden_size * act_bytes,
  }


def forward(cfg: ModelConfig, batch: int, seq_len: int, dtype_bytes: int = F32) -> dict[str, int]:
  """{part: bytes} of a full forward on [batch, seq_len] tokens and the log-softmax of its logits
  (`eval.perplexity`): the larger of a layer and 4 float32 [B, T, V] arrays (logits, their shifted
  float32 copy, log-softmax, exp)."""
  layer = layer_peak(cfg, batch, seq_len, dtype_bytes)
  logits = {"logits": 4 * batch * seq_len * cfg.vocab_size * F32}
  top = max(layer, logits, key=lambda d: sum(d.values()))
  return {"runtime": RUNTIME, "params": param_bytes(cfg, dtype_bytes), **top}


def calibration(cfg: ModelConfig, windows: int, seq_len: int, batch_size: int = 4) -> dict[str, int]:
  """{part: bytes} of `sparsity.calibrate` on `windows` windows of `seq_len` tokens, `batch_size` at a time:
  every window's hidden state (the current and the next layer's), one batch's layer (one compiled layer
  keeps fewer attention copies than the whole forward: 2.5 measured) and the site inputs it collects."""
  b = min(batch_size, windows)
  padded = math.ceil(windows / b) * b
  d, i = cfg.hidden_size, cfg.intermediate_size
  return {
    "runtime": RUNTIME,
    "params": param_bytes(cfg),
    "hidden states": 2 * padded * seq_len * d * F32,
    **layer_peak(cfg, b, seq_len, copies=2.5),
    "site inputs": b * seq_len * (4 * d + i) * F32,
  }


def transform(cfg: ModelConfig) -> dict[str, int]:
  """{part: bytes} of `wina_jax.transform`: the old and new params, the float64 bases and float32
  shortcuts of every block, and one SVD's temporaries."""
  d, n = cfg.hidden_size, max(cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim)
  blocks = 2 * cfg.num_hidden_layers
  return {
    "runtime": RUNTIME,
    "params": 2 * param_bytes(cfg),
    "bases and shortcuts": blocks * d * d * (8 + F32),
    "svd": (2 * d * n + 2 * d * d) * 8,
  }


def available() -> tuple[int, str]:
  """(bytes, where): WINA_JAX_MEMORY when set, else the default accelerator's free memory, else the
  host's MemAvailable."""
  cap = os.environ.get("WINA_JAX_MEMORY", "")
  if cap:
    return parse_size(cap), "WINA_JAX_MEMORY"
  import jax

  dev = jax.devices()[0]
  stats = dev.platform != "cpu" and dev.memory_stats()
  if stats and "bytes_limit" in stats:
    return stats["bytes_limit"] - stats.get("bytes_in_use", 0), f"{dev.device_kind} free memory"
  with open("/proc/meminfo") as f:
    info = dict(line.split(":", 1) for line in f)
  return int(info["MemAvailable"].split()[0]) * 1024, "the host's available memory"


def parse_size(text: str) -> int:
  """'8G', '512M', '1.5T' or a byte count -> bytes."""
  units = {"K": 1 << 10, "M": 1 << 20, "G": GIB, "T": 1 << 40}
  s = text.strip().upper().rstrip("B").rstrip("I")
  try:
    return int(float(s[:-1]) * units[s[-1]]) if s and s[-1] in units else int(float(s))
  except ValueError:
    raise ValueError(f"memory size {text!r} is not a size like '8G', '512M' or a byte count") from None


def describe(parts: dict[str, int]) -> str:
  """'721.2 GiB (attention 720.0 GiB, params 0.5 GiB, ...)', largest parts first."""
  parts = sorted(parts.items(), key=lambda kv: -kv[1])
  return (
    f"{sum(v for _, v in parts) / GIB:.1f} GiB (" + ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts) + ")"
  )


def check(parts: dict[str, int], what: str, advice: str) -> int:
  """Raise MemoryError when the estimate `parts` exceeds the memory available; returns the estimate.

  what: the computation ('calibration on 2 x 100000 tokens'); advice: what shrinks it ('lower --seq_len')."""
  need = sum(parts.values())
  have, where = available()
  if need > have:
    raise MemoryError(
      f"{what} needs an estimated {describe(parts)}, more than {where} ({have / GIB:.1f} GiB); {advice}"
    )
  return need

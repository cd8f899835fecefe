"""On-disk cache of converted models and tokenizers, keyed by the source file's identity.

Parsing and dequantising a GGUF file takes ~15 s; the cached float32 arrays load in ~1 s. The key is
(absolute path, size, mtime, CACHE_VERSION), so a changed file or a changed loader misses the cache.
Location: $WINA_JAX_CACHE, else ~/.cache/wina_jax. Set WINA_JAX_CACHE=off to disable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from typing import Optional

import numpy as np

from wina_jax import assets
from wina_jax.config import ModelConfig, RopeScaling

CACHE_VERSION = 1


def cache_dir() -> Optional[str]:
  return None if os.environ.get("WINA_JAX_CACHE", "").lower() == "off" else assets.cache_root()


def file_key(path: str, kind: str) -> Optional[str]:
  """Cache folder for `kind` ('params' | 'tokenizer') of `path`, or None when caching is off."""
  root = cache_dir()
  if root is None:
    return None
  st = os.stat(path)
  ident = f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}|{CACHE_VERSION}|{kind}"
  return os.path.join(
    root, f"{os.path.basename(path)}-{kind}-{hashlib.sha1(ident.encode()).hexdigest()[:16]}"
  )


def cfg_from_json(d: dict) -> ModelConfig:
  rs = d.pop("rope_scaling")
  return ModelConfig(**d, rope_scaling=None if rs is None else RopeScaling(**rs))


def cached_arrays(path: str, build: Callable[[], tuple[dict, ModelConfig]]) -> tuple[dict, ModelConfig]:
  """Flat {name: float32 array} and config from the cache, else from `build()` (then stored)."""
  folder = file_key(path, "params")
  if folder and os.path.isfile(os.path.join(folder, "config.json")):
    with open(os.path.join(folder, "config.json")) as f:
      cfg = cfg_from_json(json.load(f))
    with np.load(os.path.join(folder, "arrays.npz")) as z:
      return {k: z[k] for k in z.files}, cfg
  flat, cfg = build()
  if folder:
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(dir=os.path.dirname(folder))
    np.savez(os.path.join(tmp, "arrays.npz"), **flat)
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(dataclasses.asdict(cfg), f)
    try:
      os.replace(tmp, folder)  # atomic: concurrent writers leave one complete copy
    except OSError:
      pass
  return flat, cfg

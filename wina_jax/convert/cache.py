"""On-disk cache of converted models and tokenizers, keyed by the source file's identity.

Parsing and dequantising a GGUF file takes ~15 s; the cached float32 arrays load in ~1 s. The key is
(absolute path, size, mtime, CACHE_VERSION), so a changed file or a changed loader misses the cache.
Location: $WINA_JAX_CACHE, else ~/.cache/wina_jax. Set WINA_JAX_CACHE=off to disable.

Each entry is a folder written whole into a temporary folder `.tmp-<pid>-*` and renamed into place, with
`manifest.json` ({file: {size, sha256}}) written last. An entry whose files do not match their manifest
(cut short, damaged, or from before manifests) is removed and rebuilt, with a one-line notice on stderr.
Concurrent writers leave one complete entry; the loser removes its temporary folder, and temporary
folders of processes no longer running are removed by the next writer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable
from typing import Optional

import numpy as np

from wina_jax import assets
from wina_jax.config import ModelConfig, RopeScaling

CACHE_VERSION = 1
MANIFEST = "manifest.json"


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


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      h.update(chunk)
  return h.hexdigest()


def _files(folder: str) -> list[str]:
  return sorted(
    os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs if f != MANIFEST
  )


def damage(folder: str) -> Optional[str]:
  """Why the entry `folder` cannot be trusted (a file missing, of the wrong size or checksum; no
  manifest), or None when every file matches its manifest."""
  try:
    with open(os.path.join(folder, MANIFEST)) as f:
      manifest = json.load(f)
  except (OSError, ValueError):
    return "no readable manifest"
  for name, want in manifest.items():
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      return f"{name} is missing"
    if (size := os.path.getsize(path)) != want["size"]:
      return f"{name} has {size} bytes, its manifest says {want['size']}"
    if _sha256(path) != want["sha256"]:
      return f"{name} fails its sha256 checksum"
  return None


def store(folder: str, write: Callable[[str], None]) -> None:
  """Write an entry: `write(tmp)` fills a temporary folder, the manifest is added, then one rename.
  When another process completed `folder` first, its entry stays and ours is discarded."""
  root = os.path.dirname(folder)
  os.makedirs(root, exist_ok=True)
  assets.remove_stale_temps(root)
  tmp = tempfile.mkdtemp(dir=root, prefix=f"{assets.TMP_PREFIX}{os.getpid()}-")
  try:
    write(tmp)
    paths = {name: os.path.join(tmp, name) for name in _files(tmp)}
    manifest = {name: {"size": os.path.getsize(p), "sha256": _sha256(p)} for name, p in paths.items()}
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
    try:
      os.replace(tmp, folder)  # atomic; fails when a concurrent writer's entry is already there
    except OSError:
      if damage(folder) is not None:  # theirs is unusable: take its place
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):  # a third writer completed it meanwhile
          os.replace(tmp, folder)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def usable(folder: Optional[str]) -> bool:
  """True when the entry exists and matches its manifest; a damaged entry is removed (with a notice)."""
  if not folder or not os.path.isdir(folder):
    return False
  why = damage(folder)
  if why is None:
    return True
  print(f"wina_jax: cache entry {folder} is damaged ({why}); removed, rebuilding it", file=sys.stderr)
  shutil.rmtree(folder, ignore_errors=True)
  return False


def cached_config(path: str) -> Optional[ModelConfig]:
  """The config stored with `path`'s converted arrays, when a complete entry exists (no checksum pass)."""
  folder = file_key(path, "params")
  if folder is None or not os.path.isfile(os.path.join(folder, MANIFEST)):
    return None
  try:
    with open(os.path.join(folder, "config.json")) as f:
      return cfg_from_json(json.load(f))
  except (OSError, ValueError, TypeError):
    return None


def _write_arrays(tmp: str, flat: dict, cfg: ModelConfig) -> None:
  np.savez(os.path.join(tmp, "arrays.npz"), **flat)
  with open(os.path.join(tmp, "config.json"), "w") as f:
    json.dump(dataclasses.asdict(cfg), f)


def cached_arrays(path: str, build: Callable[[], tuple[dict, ModelConfig]]) -> tuple[dict, ModelConfig]:
  """Flat {name: float32 array} and config from the cache, else from `build()` (then stored)."""
  folder = file_key(path, "params")
  if usable(folder):
    try:
      with open(os.path.join(folder, "config.json")) as f:
        cfg = cfg_from_json(json.load(f))
      with np.load(os.path.join(folder, "arrays.npz")) as z:
        return {k: z[k] for k in z.files}, cfg
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:  # changed since the check
      print(f"wina_jax: cache entry {folder} is unreadable ({e}); removed, rebuilding it", file=sys.stderr)
      shutil.rmtree(folder, ignore_errors=True)
  flat, cfg = build()
  if folder:
    store(folder, lambda tmp: _write_arrays(tmp, flat, cfg))
  return flat, cfg

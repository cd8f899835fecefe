"""Save / load a `Calibration` (with optional greedy allocation paths) as a versioned npz file.

The file records the model fingerprint (config + param checksum); loading it for other params raises. It may
also record the numerics the calibration ran at (JSON under 'declared_numerics'; `load` does not read it).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from wina_jax.config import ModelConfig
from wina_jax.sparsity.registry import get_method
from wina_jax.sparsity.thresholds import Calibration, GreedyPath, fingerprint

KIND = "wina_jax.sparsity.calibration"
FORMAT_VERSION = 1


def save(path: str, calib: Calibration, declared_numerics: dict | None = None) -> str:
  """Write `calib` (and `declared_numerics`, e.g. `numerics.describe()`, when given) to `path` (.npz
  appended if missing); returns the file name."""
  path = path if path.endswith(".npz") else path + ".npz"
  sites = sorted(calib.quantiles)
  arrays = {
    "kind": np.asarray(KIND),
    "format_version": np.asarray(FORMAT_VERSION),
    "method": np.asarray(calib.method.name),
    "method_settings": np.asarray(json.dumps(dataclasses.asdict(calib.method), sort_keys=True)),
    "fingerprint": np.asarray(calib.fingerprint),
    "tokens": np.asarray(calib.tokens),
    "levels": calib.levels,
    "sites": np.asarray(sites),
    "quantiles": np.stack([calib.quantiles[s] for s in sites]) if sites else np.zeros((0, len(calib.levels))),
  }
  if declared_numerics is not None:
    arrays["declared_numerics"] = np.asarray(json.dumps(declared_numerics))
  for layer, p in (calib.paths or {}).items():
    for field in dataclasses.fields(GreedyPath):
      arrays[f"path.{layer}.{field.name}"] = np.asarray(getattr(p, field.name))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, **arrays)
  return path


def load(path: str, params: dict, cfg: ModelConfig) -> Calibration:
  """Read a file written by `save`, checking its format version and that it belongs to these params."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"thresholds file {path} not found; create it with experiments/quality/calibrate.py"
    )
  with np.load(path, allow_pickle=False) as f:
    z = {k: f[k] for k in f.files}
  if str(z.get("kind", "")) != KIND:
    raise ValueError(f"{path} is not a wina_jax calibration file (kind={z.get('kind')!r})")
  if int(z["format_version"]) != FORMAT_VERSION:
    raise ValueError(
      f"{path} has format version {int(z['format_version'])}, this code reads "
      f"{FORMAT_VERSION}; recalibrate with experiments/quality/calibrate.py"
    )
  want = fingerprint(params, cfg)
  if str(z["fingerprint"]) != want:
    raise ValueError(
      f"thresholds file {path} was calibrated for another model (fingerprint "
      f"{z['fingerprint']}, these params have {want}): recalibrate for this model "
      "(and after any params transform) with experiments/quality/calibrate.py"
    )
  method = get_method(str(z["method"]), **json.loads(str(z["method_settings"])))
  sites = [str(s) for s in z["sites"]]
  paths = {}
  for key in z:
    if key.startswith("path.") and key.endswith(".sites"):
      layer = int(key.split(".")[1])
      paths[layer] = GreedyPath(
        **{f.name: z[f"path.{layer}.{f.name}"] for f in dataclasses.fields(GreedyPath)}
      )
      paths[layer] = dataclasses.replace(paths[layer], sites=tuple(str(s) for s in paths[layer].sites))
  return Calibration(
    method, want, z["levels"], dict(zip(sites, z["quantiles"])), int(z["tokens"]), paths or None
  )

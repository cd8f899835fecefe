"""Params checkpoints with Orbax: a folder with the params pytree (`params/`, Orbax's standard format,
one tensorstore array per leaf, no pickle) and the `ModelConfig` as `config.json`.

  checkpoint.save_params("ckpt/smollm2_wina", params, cfg)       # e.g. after `transform`
  params, cfg = checkpoint.restore_params("ckpt/smollm2_wina")
  params, cfg = checkpoint.restore_params(path, target=sharded)  # restored onto `sharded`'s shardings

Works for the params of either path (`convert` loaders, `transform`, `nn.CausalLM.init`): they are one tree.
Calibration state stays in the versioned npz store (`wina_jax.sparsity.store`): it is a few kilobytes of
per-site score quantiles plus a method spec and greedy-allocation paths, one file that is easy to ship
with a sweep's results, and the store checks its format version and that the thresholds were calibrated
on these very params (`fingerprint`), which an Orbax tree would not do by itself.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import orbax.checkpoint as ocp

from wina_jax.config import ModelConfig
from wina_jax.convert.cache import cfg_from_json


def save_params(path: str, params: dict, cfg: ModelConfig, *, force: bool = False) -> str:
  """Write `params` and `cfg` to the folder `path` (absolute path returned); force=True overwrites."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not force:
    raise FileExistsError(f"checkpoint {path} exists; pass force=True to overwrite it or choose a new path")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), params, force=force)
    ckptr.wait_until_finished()
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=1)
  return path


def restore_params(path: str, target: Optional[Any] = None) -> tuple[dict, ModelConfig]:
  """(params, cfg) from a folder written by `save_params`. target: a params tree (arrays or
  `jax.ShapeDtypeStruct`s with shardings) whose shapes, dtypes and shardings the restored arrays take."""
  path = os.path.abspath(path)
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise FileNotFoundError(
      f"no params checkpoint at {path} (config.json missing); write one with wina_jax.checkpoint.save_params"
    )
  with open(os.path.join(path, "config.json")) as f:
    cfg = cfg_from_json(json.load(f))
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(path, "params"), target)
  return params, cfg

"""A model variant to evaluate: a method spec + target sparsity -> (params, cfg, sparsifier).

Spec grammar: a registered method (`wina_jax.sparsity.known_methods()`: dense, teal, wina, cats, ...),
optionally suffixed '-transform' to run it on WINA-transformed params (`wina_jax.transform`): e.g.
'teal-transform' is the paper's TEAL-T. Threshold mode and greedy allocation calibrate on
`calib_windows` (dense score statistics; greedy paths for greedy allocation).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from wina_jax.config import ModelConfig

SUFFIX = "-transform"


@dataclasses.dataclass
class Prepared:
  """What every sparsity of one spec shares: (transformed) params and, if needed, the calibration."""
  params: dict
  cfg: ModelConfig
  spec: str
  base: str
  transformed: bool
  calibration: Any = None


@dataclasses.dataclass
class Variant:
  params: dict
  cfg: ModelConfig
  sparsifier: Any
  transformed: bool
  method: str


def parse(spec: str) -> tuple[str, bool]:
  """'teal-transform' -> ('teal', True); validates the method name."""
  from wina_jax import sparsity
  base, transformed = (spec[:-len(SUFFIX)], True) if spec.endswith(SUFFIX) else (spec, False)
  if base not in sparsity.known_methods():
    raise ValueError(f"unknown method {spec!r}; use one of {sparsity.known_methods()}, optionally with "
                     f"the suffix {SUFFIX!r}")
  return base, transformed


def prepare(params: dict, cfg: ModelConfig, spec: str, *, mode: str = "topk", allocation: str = "uniform",
            calib_windows: Optional[np.ndarray] = None, max_effective: float = 0.9,
            progress: bool = True) -> Prepared:
  """Transform if the spec asks, and calibrate (thresholds; greedy paths up to `max_effective`) if the
  mode or allocation needs it."""
  from wina_jax import sparsity
  base, transformed = parse(spec)
  if transformed:
    from wina_jax.transform import transform
    params, cfg = transform(params, cfg)
  calibration = None
  if base != "dense" and (mode == "threshold" or allocation == "greedy"):
    if calib_windows is None:
      raise ValueError(f"mode={mode!r} / allocation={allocation!r} need calibration windows")
    calibration = sparsity.calibrate(params, cfg, sparsity.get_method(base), calib_windows, progress=progress)
    if allocation == "greedy":
      from wina_jax.sparsity.allocation import greedy
      calibration.paths = greedy(params, cfg, calibration, calib_windows, max_effective=max_effective,
                                 progress=progress)
  return Prepared(params, cfg, spec, base, transformed, calibration)


def make(prep: Prepared, target: float, *, mode: str = "topk", allocation: str = "uniform") -> Variant:
  """The variant at `target` sparsity (dense when target == 0 or the method is 'dense')."""
  from wina_jax import sparsity
  dense = prep.base == "dense" or target == 0
  sp = sparsity.make(prep.base, prep.params, prep.cfg, 0.0 if dense else target,
                     mode="topk" if dense else mode,   # nothing to threshold: no calibration needed
                     calibration=prep.calibration, allocation="uniform" if dense else allocation)
  return Variant(prep.params, prep.cfg, sp, prep.transformed, prep.spec)


def build(params: dict, cfg: ModelConfig, spec: str, target: float, *, mode: str = "topk",
          allocation: str = "uniform", calib_windows: Optional[np.ndarray] = None,
          progress: bool = True) -> Variant:
  """`prepare` + `make` for one target sparsity."""
  prep = prepare(params, cfg, spec, mode=mode, allocation=allocation, calib_windows=calib_windows,
                 max_effective=max(0.9, target), progress=progress)
  return make(prep, target, mode=mode, allocation=allocation)

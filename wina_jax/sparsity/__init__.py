"""Training-free activation sparsity: methods, the registry, calibration, allocation and measurement.

  from wina_jax import sparsity
  sp = sparsity.make("wina", params, cfg, sparsity=0.5)                           # top-k at run time
  calib = sparsity.calibrate(params, cfg, sparsity.get_method("wina"), windows)   # dense statistics
  calib.paths = sparsity.greedy(params, cfg, calib, windows)                      # optional allocation
  sparsity.save("wina.npz", calib); calib = sparsity.load("wina.npz", params, cfg)
  sp = sparsity.make("wina", params, cfg, 0.5, mode="threshold", calibration=calib, allocation="greedy")

Two layers (tests/test_layering.py): pure modules that never import the model (`base`: Method,
ScoreSparsifier, masks; `methods`; `registry`; `plugins`: methods from your own modules and installed
packages; `fastpath`: what the fast decode kernels compute for a method; `measure`; `prefill`;
`thresholds`: Calibration, greedy paths, pick; `store`) and the modules that run it
(`calibration.calibrate`, `allocation.greedy`, `layerwise`). This package re-exports both.
"""

from wina_jax.sparsity import methods as _builtins  # noqa: F401  (registers dense/teal/wina/cats)
from wina_jax.sparsity.allocation import greedy
from wina_jax.sparsity.base import MODES, Method, ScoreSparsifier, check_sparsity, keep_count, topk_mask
from wina_jax.sparsity.calibration import calibrate, windows_from_text
from wina_jax.sparsity.fastpath import FastPathError, FastScale, fast_state
from wina_jax.sparsity.measure import (
  parameter_weighted_sparsity,
  per_matrix_sparsity,
  site_weights,
  target_sparsity,
)
from wina_jax.sparsity.methods import column_norms
from wina_jax.sparsity.plugins import MethodsModuleError
from wina_jax.sparsity.prefill import resolve_prefill
from wina_jax.sparsity.registry import (
  ALLOCATIONS,
  get_method,
  known_methods,
  load_modules,
  make,
  register,
  site_sparsities,
  site_width,
  uniform,
)
from wina_jax.sparsity.store import load, save
from wina_jax.sparsity.thresholds import Calibration, GreedyPath, fingerprint, pick

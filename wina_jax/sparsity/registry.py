"""Method registry and the `make` factory that turns a method name + targets into a sparsifier.

Add a method in one file:

  @register("mine")
  @dataclasses.dataclass(frozen=True)
  class Mine(Method):
    def score(self, site, x, state): ...

then `make("mine", params, cfg, sparsity=0.5)` selects it. A method in your own module reaches the
scripts with `--methods_module=my_pkg.mine` and the lm-eval model with `methods_module=my_pkg.mine`
(`load_modules`); an installed package's entry points (`plugins.GROUP`) need no flag: `get_method` imports
the one it is asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Optional, Union

import jax.numpy as jnp

from wina_jax import sites as S
from wina_jax.config import ModelConfig
from wina_jax.sparsity import plugins, select
from wina_jax.sparsity.base import MODES, Method, ScoreSparsifier, check_sparsity, keep_count
from wina_jax.sparsity.thresholds import pick

_METHODS: dict[str, type] = {}
ALLOCATIONS = ("uniform", "greedy")
Sparsities = Union[float, Mapping[str, float]]


def register(name: str):
  """Class decorator adding a `Method` subclass to the registry under `name`."""

  def deco(cls):
    if not (isinstance(cls, type) and issubclass(cls, Method)):
      raise TypeError(f"@register({name!r}) needs a Method subclass, got {cls!r}")
    old = _METHODS.get(name)
    redefined = old is not None and (old.__module__, old.__qualname__) == (cls.__module__, cls.__qualname__)
    if old is not None and old is not cls and not redefined:  # re-running a notebook cell redefines
      raise ValueError(f"method {name!r} is already registered by {_METHODS[name].__qualname__}")
    cls.name = name
    _METHODS[name] = cls
    return cls

  return deco


def known_methods() -> list[str]:
  """Registered methods and those installed packages provide (`plugins.GROUP`, imported when asked for)."""
  return sorted(set(_METHODS) | set(plugins.installed()))


def load_modules(modules, origin: str = "--methods_module") -> dict[str, list[str]]:
  """Import the modules that register methods (a list, or one ';'-separated string) -> {module: the
  methods it registered}. Raises `plugins.MethodsModuleError` for a module that fails to import (naming it
  and the methods it was to add) or that, imported here for the first time, registers no method."""
  out = {}
  for module in plugins.split(modules):
    before = dict(_METHODS)
    fresh = plugins.import_module(module, origin)
    out[module] = sorted(n for n, cls in _METHODS.items() if before.get(n) is not cls)  # new or redefined
    if fresh and not out[module]:
      raise plugins.MethodsModuleError(
        f"methods module {module!r} (from {origin}) imported but registered no method; decorate its "
        "Method subclasses with @wina_jax.sparsity.register('name'), or name the module that does"
      )
  return out


def _load_installed(name: str) -> None:
  """Register method `name` from the installed entry point of that name, if there is one."""
  ep = plugins.installed().get(name)
  if ep is None:
    return
  obj = plugins.load_entry_point(ep)
  if name not in _METHODS and isinstance(obj, type) and issubclass(obj, Method):
    register(name)(obj)
  if name not in _METHODS:
    raise plugins.MethodsModuleError(
      f"entry point '{ep.name} = {ep.value}' (group {plugins.GROUP}) imported but registered no method "
      f"{name!r}; its module must run @register({name!r}), or the entry point name the Method class"
    )


def get_method(name: str, **settings) -> Method:
  """The registered method `name` with its settings (e.g. `get_method('wina', c_sites='all')`); a name
  only an installed package provides is imported from its entry point first."""
  if name not in _METHODS:
    _load_installed(name)
  if name not in _METHODS:
    raise ValueError(
      f"unknown sparsification method {name!r}; known methods: {known_methods()}. A method defined in "
      "your own module: pass --methods_module=your.module (scripts), methods_module=your.module "
      "(lm-eval model_args), or import the module first (Python)"
    )
  cls = _METHODS[name]
  fields = [f.name for f in dataclasses.fields(cls)]
  bad = sorted(set(settings) - set(fields))
  if bad:
    raise ValueError(f"method {name!r} has no setting(s) {bad}; its settings are {fields}")
  return cls(**settings)


def site_width(cfg: ModelConfig, site: str) -> int:
  """d_in of a site: the input width of its linear layer, or intermediate_size at `act`."""
  _, block, proj = S.parse_site(site)
  if proj == S.ACT:
    return cfg.intermediate_size
  return cfg.q_dim if proj == "o_proj" else cfg.intermediate_size if proj == "down_proj" else cfg.hidden_size


def site_sparsities(method: Method, cfg: ModelConfig, sparsity: Sparsities) -> dict[str, float]:
  """{site: s} over the method's sites from one float (uniform) or a per-site mapping (missing = 0)."""
  sites = method.sites(cfg)
  if isinstance(sparsity, Mapping):
    extra = sorted(set(sparsity) - set(sites))
    if extra:
      raise ValueError(f"method {method.name!r} does not mask sites {extra[:5]}; it masks e.g. {sites[:3]}")
    return {s: check_sparsity(sparsity.get(s, 0.0), f"sparsity[{s!r}]") for s in sites}
  s = check_sparsity(sparsity)
  return {site: s for site in sites}


def uniform(method: Method, cfg: ModelConfig, sparsity: float) -> dict[str, float]:
  """{site: sparsity} for every site the method masks (uniform allocation)."""
  return site_sparsities(method, cfg, sparsity)


def make(
  name: Union[str, Method],
  params: dict,
  cfg: ModelConfig,
  sparsity: Sparsities = 0.5,
  *,
  mode: str = "topk",
  calibration=None,
  allocation: str = "uniform",
  k_rule: str = "round",
  impl: Optional[str] = None,
  **settings,
) -> ScoreSparsifier:
  """Build a sparsifier for method `name` (or a `Method` instance) at target `sparsity`.

  sparsity: one float in [0, 1) for every site, or {site: s} (e.g. from `thresholds.pick`).
  mode: 'topk' (exact k per token, at run time) or 'threshold' (needs `calibration`, a
    `wina_jax.sparsity.thresholds.Calibration` of the same method on these params).
  allocation: 'uniform', or 'greedy' to spread a float `sparsity` over sites along the greedy paths
    stored in `calibration.paths` (`wina_jax.sparsity.allocation.greedy`).
  k_rule: top-k mode's k per site: 'round' (round((1 - s) * d)) or 'floor' (int(d * (1 - s)), the
    official code's rule; `base.keep_count`). Every site the method masks gets a traced k (d_in at
    sparsity 0), so all sparsities and allocations share one compiled program.
  impl: top-k selection ('radix' | 'sort'; None = the backend's default, `select.default_impl`).
  settings: method settings, e.g. c_sites='all' for wina.
  """
  method = name if isinstance(name, Method) else get_method(name, **settings)
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
  if allocation not in ALLOCATIONS:
    raise ValueError(f"unknown allocation {allocation!r}; choose from {ALLOCATIONS}")
  if allocation == "greedy":
    if calibration is None or not calibration.paths or isinstance(sparsity, Mapping):
      raise ValueError(
        "allocation='greedy' needs one float sparsity and calibration=... holding greedy "
        "paths (run experiments/quality/calibrate.py --allocation=greedy)"
      )
    sparsity = pick(calibration.paths, sparsity)
  targets = site_sparsities(method, cfg, sparsity)
  state = method.state(params, cfg)
  if mode == "topk":
    k = {s: jnp.asarray(keep_count(v, site_width(cfg, s), k_rule), jnp.int32) for s, v in targets.items()}
    return ScoreSparsifier(method=method, mode=mode, k=k, state=state, impl=impl or select.default_impl())
  if calibration is None:
    raise ValueError(
      "mode='threshold' needs calibration=...: run `calibration.calibrate` (or load a "
      "thresholds file with `calibration.load`) for this method and model first"
    )
  calibration.check_method(method)
  thresholds = {s: jnp.asarray(calibration.threshold(s, v), jnp.float32) for s, v in targets.items()}
  return ScoreSparsifier(method=method, mode=mode, thresholds=thresholds, state=state)

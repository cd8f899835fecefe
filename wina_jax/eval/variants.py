"""A model variant to evaluate: a method spec + target sparsity -> (params, cfg, sparsifier).

Spec grammar (one spec never contains a comma: the sweep's --methods flag splits on commas):

  spec     := method [ settings ] [ transform [ settings ] ]
  settings := '[' setting ( ';' setting )* ']'
  setting  := key '=' value          value: an int, else a float, else a string
  transform:= '-transform'           rotate every block (`wina_jax.transform`), e.g. teal-transform = TEAL-T
            | '-transform-attn'      rotate only the self_attn blocks
            | '-transform-mlp'       rotate only the mlp blocks
            | '-transform-auto'      rotate the blocks where rotation lowers the calibration error (below)

`method` is a registered method (`wina_jax.sparsity.known_methods()`: dense, teal, wina, cats, ...) and the
settings are its dataclass fields: 'wina[c_sites=all]' is `get_method('wina', c_sites='all')`, and
'wina[c_sites=all]-transform-mlp' runs it on params with only the MLP blocks rotated. The settings reach
`sparsity.calibrate` and `sparsity.make` (they take the `Method` instance). The transform's settings
(`TRANSFORM_SETTINGS`) choose the free null-space basis of rank-deficient key kernels (`wina_jax.bases`):
'wina-transform[basis=axis]', 'teal-transform-attn[basis=learned]' (fitted on `calib_windows` at top-k
sparsity `basis_sparsity`, default 0.5), 'svd' (LAPACK's, the default).

Threshold mode calibrates on `calib_windows`, on the params the variant runs on, once per target: each
site's thresholds come from the model with every site upstream of it already sparsified at the target
(`sparsity.calibrate(..., upstream=)`), so the measured sparsity lands on the target; `upstream=False`
restores dense score statistics shared by every target (TEAL's recipe, which overshoots: 52 % measured
at a 50 % target on SmolLM2). Greedy allocation searches its paths on dense statistics, then each target's
thresholds are calibrated under the sparse upstream at the per-site sparsities the paths pick.

'-transform-auto' (a research option) picks, per target sparsity s, the blocks (layer, 'self_attn' | 'mlp')
to rotate. A block's error is the isolated relative output error of its linear sites on the calibration
windows under the method's top-k masks at sparsity s (every site fed the dense model's input; see
`block_errors`):

  err(block) = sum over the block's linear sites j, tokens t of ||x_tj K_j - xs_tj K_j||^2
               / sum over the same of ||x_tj K_j||^2

(xs: x masked by the method; at down_proj the MLP activation's mask counts too, as in
`wina_jax.analysis.errors`). It is measured once on the original params and once on the fully transformed
params, and a block is rotated iff err_transformed < (1 - AUTO_RTOL) * err_original (the margin keeps float
noise, e.g. CATS, whose masks a rotation does not change, from picking blocks). Rotating a block changes
only its own sites' inputs, and the denominators are rotation-invariant, so the pick minimises the summed
squared output error over all 2^(2L) subsets. The chosen params are `transform(params, cfg, blocks=chosen)`
(the original params when nothing is chosen, e.g. at s = 0), calibrated if the mode needs it; `make`
recomputes the choice per target (cached) and records it in `Variant.info`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections import OrderedDict
from typing import Any, Optional, Union

import jax
import numpy as np

from wina_jax import sites as S
from wina_jax.config import ModelConfig

SUFFIX = "-transform"
SCOPES = {"-transform": "all", "-transform-attn": "attn", "-transform-mlp": "mlp", "-transform-auto": "auto"}
TRANSFORM_SETTINGS = {"basis": str, "basis_sparsity": float}  # keyword arguments of `transform`
AUTO_RTOL = 1e-4  # rotate a block only if its error drops by more than this fraction
AUTO_CACHE = 2  # (params, cfg, calibration) kept per auto spec, keyed by the chosen blocks
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
Block = tuple[int, str]


@dataclasses.dataclass(frozen=True)
class Spec:
  """A parsed spec: method name, its settings ((key, value), ...), the transform scope (None: none) and
  the transform's settings ((key, value), ...: `transform` keyword arguments)."""

  spec: str
  name: str
  settings: tuple = ()
  scope: Optional[str] = None
  transform_settings: tuple = ()

  @property
  def transformed(self) -> bool:
    return self.scope is not None

  @property
  def method(self):
    from wina_jax import sparsity

    return sparsity.get_method(self.name, **dict(self.settings))

  def blocks(self, cfg: ModelConfig) -> Optional[list[Block]]:
    """The blocks a fixed scope rotates (None: every block); not defined for 'auto' (per target)."""
    if self.scope == "auto":
      raise ValueError("'-transform-auto' chooses its blocks per target sparsity (see `auto_choice`)")
    if self.scope in ("attn", "mlp"):
      b = "self_attn" if self.scope == "attn" else "mlp"
      return [(l, b) for l in range(cfg.num_hidden_layers)]
    return None


def _value(v: str) -> Union[int, float, str]:
  for kind in (int, float):
    try:
      return kind(v)
    except ValueError:
      pass
  return v


def _split_transform(spec: str) -> tuple[str, str]:
  """(method part, transform part) of `spec`: split at the first '-transform' outside brackets."""
  depth = 0
  for i, ch in enumerate(spec):
    depth += (ch == "[") - (ch == "]")
    if depth == 0 and spec.startswith(SUFFIX, i):
      return spec[:i], spec[i:]
  return spec, ""


def _settings(part: str, spec: str, what: str) -> tuple[str, dict]:
  """'name[key=value;...]' -> (name, {key: value}); errors name the bad part of `spec`."""
  if "[" not in part and "]" not in part:
    return part, {}
  i = part.find("[")
  if i <= 0 or not part.endswith("]") or part.count("[") != 1 or part.count("]") != 1:
    raise ValueError(
      f"malformed settings in {spec!r}; write '{what}[key=value;key=value]' with one pair of "
      f"brackets right after the {what}"
    )
  name, body = part[:i], part[i + 1 : -1]
  if not body.strip():
    raise ValueError(f"empty settings '[]' in {spec!r}; drop the brackets or write '[key=value]'")
  settings: dict = {}
  for item in body.split(";"):
    key, eq, val = (t.strip() for t in item.partition("="))
    if not eq or not _KEY.match(key) or not val:
      raise ValueError(f"bad setting {item!r} in {spec!r}; write key=value (separate several with ';')")
    if key in settings:
      raise ValueError(f"setting {key!r} is given twice in {spec!r}")
    settings[key] = _value(val)
  return name, settings


def _transform_settings(settings: dict, spec: str) -> tuple:
  from wina_jax.bases import check_basis

  bad = sorted(set(settings) - set(TRANSFORM_SETTINGS))
  if bad:
    raise ValueError(
      f"unknown transform setting(s) {bad} in {spec!r}; the transform takes "
      f"{list(TRANSFORM_SETTINGS)}, e.g. 'wina-transform[basis=axis]' (method settings go "
      "before the transform suffix: 'wina[c_sites=all]-transform')"
    )
  try:
    out = {k: TRANSFORM_SETTINGS[k](v) for k, v in settings.items()}
    check_basis(out.get("basis", "svd"))
    if not 0 <= out.get("basis_sparsity", 0.5) < 1:
      raise ValueError(f"basis_sparsity={out['basis_sparsity']} must be in [0, 1)")
  except (ValueError, TypeError) as e:
    raise ValueError(f"bad transform settings in {spec!r}: {e}") from e
  return tuple(sorted(out.items()))


def parse(spec: str) -> Spec:
  """Validate `spec` (grammar in the module docstring) -> `Spec`; errors name the bad part and the fix."""
  from wina_jax import sparsity

  known = sparsity.known_methods()
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"empty method spec {spec!r}; use e.g. 'wina', 'wina[c_sites=all]' or 'teal-transform'")
  if "," in spec:
    raise ValueError(
      f"method spec {spec!r} contains ','; the sweep's --methods splits on commas, so separate "
      "settings with ';' (e.g. 'm[a=1;b=2]') and list specs with ','"
    )
  head, tail = _split_transform(spec)
  if not tail and "]" in spec and not spec.endswith("]"):
    raise ValueError(
      f"bad transform suffix {spec[spec.rindex(']') + 1 :]!r} in {spec!r}; use one of "
      f"{list(SCOPES)} (settings go before it: 'wina[c_sites=all]-transform')"
    )
  suffix, tsettings = _settings(tail, spec, "transform suffix") if tail else ("", {})
  if suffix and suffix not in SCOPES:
    raise ValueError(
      f"bad transform suffix {suffix!r} in {spec!r}; use one of {list(SCOPES)} (settings go "
      "before it: 'wina[c_sites=all]-transform', transform settings after it: "
      "'wina-transform[basis=axis]')"
    )
  name, settings = _settings(head, spec, "method name")
  if name not in known:
    raise ValueError(
      f"unknown method {name!r} in spec {spec!r}; use one of {known}, optionally with settings "
      f"'[key=value;...]' and a suffix among {list(SCOPES)}. A method defined in your own module: pass "
      "--methods_module=your.module (scripts) or methods_module=your.module (lm-eval model_args)"
    )
  try:
    sparsity.get_method(name, **settings)  # the registry's error for unknown keys, the method's for values
  except (ValueError, TypeError) as e:
    raise ValueError(f"bad settings in spec {spec!r}: {e}") from e
  return Spec(
    spec, name, tuple(sorted(settings.items())), SCOPES.get(suffix), _transform_settings(tsettings, spec)
  )


def needs_calibration(spec: str, mode: str = "topk", allocation: str = "uniform") -> bool:
  """Whether `prepare(..., spec, mode=, allocation=)` needs calibration windows: threshold mode or greedy
  allocation (for any method but dense), a '-transform-auto' spec (it picks blocks on them) or a learned
  transform basis (fitted on them)."""
  sp = parse(spec)
  learned = sp.transformed and dict(sp.transform_settings).get("basis") == "learned"
  sparse = sp.name != "dense" and (mode == "threshold" or allocation == "greedy")
  return learned or sp.scope == "auto" or sparse


@dataclasses.dataclass
class Prepared:
  """What every sparsity of one spec shares: (transformed) params and, if needed, the calibration.

  For a '-transform-auto' spec, params / cfg are the original ones and `make` picks, transforms and
  calibrates per target (`auto` caches the choices, `built` the last few (params, cfg, calibration))."""

  params: dict
  cfg: ModelConfig
  spec: str
  base: str
  transformed: bool
  calibration: Any = None
  method: Any = None  # the Method instance (with the spec's settings)
  scope: Optional[str] = None  # None, 'all', 'attn', 'mlp' or 'auto'
  blocks: Optional[list] = None  # rotated blocks of a fixed scope (list of (layer, block))
  mode: str = "topk"
  allocation: str = "uniform"
  max_effective: float = 0.9
  calib_windows: Optional[np.ndarray] = None
  progress: bool = True
  upstream: bool = True  # threshold mode: calibrate each target under the sparse upstream
  transform_kw: dict = dataclasses.field(default_factory=dict)  # the spec's transform settings
  full: Optional[tuple] = None  # auto: the fully transformed (params, cfg)
  auto: dict = dataclasses.field(default_factory=dict)  # auto: target -> `auto_choice` result
  built: OrderedDict = dataclasses.field(default_factory=OrderedDict)
  targets: dict = dataclasses.field(default_factory=dict)  # (blocks, target) -> upstream calibration


@dataclasses.dataclass
class Variant:
  params: dict
  cfg: ModelConfig
  sparsifier: Any
  transformed: bool
  method: str
  info: dict = dataclasses.field(default_factory=dict)  # 'blocks': rotated [(layer, block)], 'shortcuts',
  # 'scope'; auto: 'errors' {'layers.i.block': [orig, T]}


def _calibrate(params, cfg, method, base, mode, allocation, windows, max_effective, progress, upstream):
  """The calibration every target shares, on these params: dense score statistics (and greedy paths) if
  greedy allocation or threshold mode without `upstream` needs them, else None."""
  from wina_jax import sparsity

  if base == "dense" or not ((mode == "threshold" and not upstream) or allocation == "greedy"):
    return None
  if windows is None:
    raise ValueError(f"mode={mode!r} / allocation={allocation!r} need calibration windows")
  calibration = sparsity.calibrate(params, cfg, method, windows, progress=progress)
  if allocation == "greedy":
    from wina_jax.sparsity.allocation import greedy

    calibration.paths = greedy(
      params, cfg, calibration, windows, max_effective=max_effective, progress=progress
    )
  return calibration


def _target_calibration(
  prep: Prepared, params: dict, cfg: ModelConfig, shared, target: float, allocation: str, key
) -> Any:
  """Thresholds for one target calibrated under the sparse upstream at the per-site sparsities the target
  means (uniform, or the greedy pick along `shared.paths`), which carries the paths over. Cached by key."""
  from wina_jax import sparsity

  key = (key, target, allocation)
  if key not in prep.targets:
    if prep.calib_windows is None:
      raise ValueError("mode='threshold' needs calibration windows: pass calib_windows=...")
    sites: Any = target
    if allocation == "greedy":
      from wina_jax.sparsity.thresholds import pick

      sites = pick(shared.paths, target)
    calibration = sparsity.calibrate(
      params, cfg, prep.method, prep.calib_windows, upstream=sites, progress=prep.progress
    )
    calibration.paths = shared.paths if shared is not None else None
    prep.targets[key] = calibration
  return prep.targets[key]


def all_blocks(cfg: ModelConfig) -> list[Block]:
  return [(l, b) for l in range(cfg.num_hidden_layers) for b in ("self_attn", "mlp")]


def prepare(
  params: dict,
  cfg: ModelConfig,
  spec: str,
  *,
  mode: str = "topk",
  allocation: str = "uniform",
  calib_windows: Optional[np.ndarray] = None,
  max_effective: float = 0.9,
  progress: bool = True,
  upstream: bool = True,
) -> Prepared:
  """Transform if the spec asks, and calibrate what every target shares (dense thresholds when not
  `upstream`; greedy paths up to `max_effective`) if the mode or allocation needs it; threshold mode with
  `upstream` (default) calibrates per target in `make`. An auto spec only transforms fully here (for its
  per-block errors); `make` does the rest per target."""
  sp = parse(spec)
  method = sp.method
  tkw = dict(sp.transform_settings)
  if tkw.get("basis") == "learned":
    if calib_windows is None:
      raise ValueError(f"{spec!r} fits its transform basis on calibration windows: pass calib_windows=...")
    tkw["calib_windows"] = calib_windows
  common = dict(
    method=method,
    scope=sp.scope,
    mode=mode,
    allocation=allocation,
    max_effective=max_effective,
    calib_windows=calib_windows,
    progress=progress,
    upstream=upstream,
    transform_kw=tkw,
  )
  if sp.scope == "auto":
    if calib_windows is None:
      raise ValueError(
        f"{spec!r} chooses the blocks to rotate on calibration windows: pass calib_windows=... "
        "(`variants.needs_calibration` says when a spec needs them)"
      )
    from wina_jax.transform import transform

    full = transform(params, cfg, **tkw) if sp.name != "dense" else None  # dense masks nothing: no rotation
    return Prepared(params, cfg, spec, sp.name, True, full=full, **common)
  blocks = None
  if sp.transformed:
    from wina_jax.transform import transform

    blocks = sp.blocks(cfg) or all_blocks(cfg)
    params, cfg = transform(params, cfg, blocks=blocks, **tkw)
  calibration = _calibrate(
    params, cfg, method, sp.name, mode, allocation, calib_windows, max_effective, progress, upstream
  )
  return Prepared(params, cfg, spec, sp.name, sp.transformed, calibration, blocks=blocks, **common)


def make(
  prep: Prepared, target: float, *, mode: Optional[str] = None, allocation: Optional[str] = None
) -> Variant:
  """The variant at `target` sparsity (dense when target == 0 or the method is 'dense'); mode and
  allocation default to the ones `prep` was prepared for."""
  from wina_jax import sparsity
  from wina_jax.transform import shortcut_cost

  mode, allocation = mode or prep.mode, allocation or prep.allocation
  dense = prep.base == "dense" or target == 0
  method = prep.method if prep.method is not None else sparsity.get_method(prep.base)
  info: dict = {"scope": prep.scope}
  if prep.scope == "auto":
    choice = auto_choice(prep, target)
    params, cfg, calibration = _auto_params(prep, choice["blocks"], None if dense else (mode, allocation))
    info.update(
      blocks=choice["blocks"], errors={f"layers.{l}.{b}": list(e) for (l, b), e in choice["errors"].items()}
    )
    transformed, key = bool(choice["blocks"]), tuple(choice["blocks"])
  else:
    params, cfg, calibration, transformed = prep.params, prep.cfg, prep.calibration, prep.transformed
    info["blocks"], key = list(prep.blocks or []), None
  if mode == "threshold" and prep.upstream and not dense:
    calibration = _target_calibration(prep, params, cfg, calibration, target, allocation, key)
  info["shortcuts"] = shortcut_cost(params, cfg)["shortcuts"]
  sp = sparsity.make(
    method,
    params,
    cfg,
    0.0 if dense else target,
    mode="topk" if dense else mode,  # nothing to threshold: no calibration needed
    calibration=calibration,
    allocation="uniform" if dense else allocation,
  )
  return Variant(params, cfg, sp, transformed, prep.spec, info)


def build(
  params: dict,
  cfg: ModelConfig,
  spec: str,
  target: float,
  *,
  mode: str = "topk",
  allocation: str = "uniform",
  calib_windows: Optional[np.ndarray] = None,
  progress: bool = True,
  upstream: bool = True,
) -> Variant:
  """`prepare` + `make` for one target sparsity."""
  prep = prepare(
    params,
    cfg,
    spec,
    mode=mode,
    allocation=allocation,
    calib_windows=calib_windows,
    max_effective=max(0.9, target),
    progress=progress,
    upstream=upstream,
  )
  return make(prep, target, mode=mode, allocation=allocation)


# ---- '-transform-auto': per-block errors and the choice ------------------------------------------------


@functools.partial(jax.jit, static_argnames=("cfg", "sites"))
def _layer_error_sums(lp, h, sparsifier, cfg, sites):
  """One dense layer (sites named as layer 0) on residual `h` [B, T, d] -> (output residual,
  {site: (sum ||(x - xs) K||^2, sum ||x K||^2)}) with every site fed the dense input."""
  from wina_jax.analysis.errors import site_input
  from wina_jax.analysis.metrics import error_sums
  from wina_jax.model import decoder_layer_aux  # the analysis drives the model; sparsifiers never do

  out, aux = decoder_layer_aux(cfg, lp, h, 0, collect=("inputs",))
  params = {"layers": {"0": lp}}
  sums = {}
  for site in sites:
    x, xs = site_input(params, cfg, aux["inputs"], sparsifier, site)
    e = error_sums(x, xs, S.site_kernel(params, site))
    sums[site] = (e["actual"], e["ref"])
  return out, sums


def block_errors(
  params: dict, cfg: ModelConfig, sparsifier, windows: np.ndarray, *, batch_size: int = 4
) -> dict[Block, float]:
  """{(layer, block): isolated relative output error of the block's linear sites} under `sparsifier`
  (a `ScoreSparsifier`) on token `windows` [N, T]: sum_sites sum_tokens ||(x - xs) K||^2 over
  sum_sites sum_tokens ||x K||^2, every site fed the dense model's input (one layer at a time)."""
  from wina_jax.sparsity import layerwise

  windows = np.asarray(windows)
  if windows.ndim != 2 or windows.size == 0:
    raise ValueError(f"need token windows [N, T] with N, T >= 1, got shape {windows.shape}")
  hs = [
    layerwise.embed_tokens(params, windows[i : i + batch_size], cfg)
    for i in range(0, len(windows), batch_size)
  ]
  out = {}
  for layer in range(cfg.num_hidden_layers):
    lp = params["layers"][str(layer)]
    local = layerwise.localize(sparsifier, layer)
    sites = tuple(S.site_name(0, b, p) for b in ("self_attn", "mlp") for p in S.block_sites(cfg, b))
    tot = {b: np.zeros(2) for b in ("self_attn", "mlp")}
    for i, h in enumerate(hs):
      hs[i], sums = _layer_error_sums(lp, h, local, cfg.layer_config(layer), sites)
      for site, (actual, ref) in sums.items():
        tot[S.parse_site(site)[1]] += (float(actual), float(ref))
    for b, (actual, ref) in tot.items():
      out[(layer, b)] = float(actual / ref) if ref > 0 else 0.0
  return out


def choose_blocks(errors: dict, rtol: float = AUTO_RTOL) -> list[Block]:
  """Blocks whose transformed error is lower: errors {(layer, block): (err_original, err_transformed)}."""
  return sorted(blk for blk, (orig, trans) in errors.items() if trans < (1.0 - rtol) * orig)


def auto_choice(prep: Prepared, target: float) -> dict:
  """{'blocks': rotated [(layer, block)], 'errors': {(layer, block): (err_original, err_transformed)}} for
  an auto spec at `target` (cached on `prep`). Nothing rotates at target 0 or for 'dense'."""
  from wina_jax import sparsity

  target = sparsity.check_sparsity(target, "target sparsity")
  if target in prep.auto:
    return prep.auto[target]
  if target == 0 or prep.base == "dense" or prep.full is None:
    choice = {"blocks": [], "errors": {}}
  else:
    per = []
    for params, cfg in ((prep.params, prep.cfg), prep.full):
      sp = sparsity.make(prep.method, params, cfg, target)  # top-k masks at the target
      per.append(block_errors(params, cfg, sp, prep.calib_windows))
    errors = {blk: (float(per[0][blk]), float(per[1][blk])) for blk in per[0]}
    choice = {"blocks": choose_blocks(errors), "errors": errors}
  prep.auto[target] = choice
  return choice


def _auto_params(prep: Prepared, blocks: list[Block], calib: Optional[tuple]):
  """(params, cfg, calibration) with `blocks` rotated (the originals when none), calibrated for
  calib = (mode, allocation) if that needs it (None: no calibration). LRU-cached on `prep`."""
  key = (tuple(blocks), calib)
  if key in prep.built:
    prep.built.move_to_end(key)
    return prep.built[key]
  params, cfg = prep.params, prep.cfg
  if blocks:
    from wina_jax.transform import transform

    params, cfg = transform(params, cfg, blocks=blocks, **prep.transform_kw)
  calibration = None
  if calib is not None:
    calibration = _calibrate(
      params,
      cfg,
      prep.method,
      prep.base,
      *calib,
      prep.calib_windows,
      prep.max_effective,
      prep.progress,
      prep.upstream,
    )
  prep.built[key] = (params, cfg, calibration)
  while len(prep.built) > AUTO_CACHE:
    prep.built.popitem(last=False)
  return prep.built[key]

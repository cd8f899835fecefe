"""Flags every script shares, `setup()` (the first call of every script's `main`), and input checks.

  --precision  matmul precision (`wina_jax.numerics`): float32 (default: true float32, also on a GPU), tf32,
               bfloat16. Every result a script writes records it (`numerics.describe`).
  --topk_impl  top-k selection (`wina_jax.sparsity.select`); masks are identical, speed differs.
  --methods_module  a module that registers sparsification methods (`@wina_jax.sparsity.register`),
               imported before any method name is resolved; repeat for several, e.g.
               `PYTHONPATH=.:path/to/mine python -m experiments.quality.sweep --methods_module=my_pkg.mine
               --methods=dense,mine` (installed packages' entry points need no flag: `sparsity.plugins`).

Input checks, so that bad input stops with one line naming the flag, the value and what is allowed, before
any model is loaded:
  check(FLAG, rule)          next to a flag's definition: a `wina_jax.checks` rule, run by absl when the
                             flags are parsed ('flag --seq_len=0: must be an integer in [1, 2147483647]')
  methods_flag(default, ...), sparsities_flag(...)   a script's --methods (method specs, `method_rule`) and
                             --sparsities (each in [0, 1)) list flags, checked
  model_config(model, ...)   before loading a model: its config from the file's header (a damaged or cut
                             short file refused) and --seq_len within its positions
  fits(parts, what, advice)  before a computation: its memory estimate (`wina_jax.memory`) against the
                             memory available, naming the flags that shrink it
  preflight(model, seq_len, forward=, calibration=, transform=)   both, the first call after `setup()`

A flag this module defines itself exists once per process, however many scripts a test imports.
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence

from absl import flags

from wina_jax import assets, checks, memory, numerics
from wina_jax.config import ModelConfig
from wina_jax.sparsity import select
from wina_jax.sparsity.registry import load_modules

PRECISION = flags.DEFINE_enum(
  "precision",
  numerics.DEFAULT,
  sorted(numerics.PRECISIONS),
  "Matmul precision: float32 = true float32 (on a GPU too, where JAX's default is TF32), tf32, bfloat16.",
)

TOPK_IMPL = flags.DEFINE_string(
  "topk_impl",
  "",
  "Top-k selection (wina_jax.sparsity.select): radix[:fanout] | sort | '' = by backend. Masks are "
  "identical; only speed differs.",
)

METHODS_MODULE = flags.DEFINE_multi_string(
  "methods_module",
  [],
  "Module registering sparsification methods (@wina_jax.sparsity.register), imported before method names "
  "are resolved; repeatable. It must be importable: on PYTHONPATH or installed.",
)

# The flags above are this module's; those its helpers define below (`methods_flag`, `sparsities_flag`) are
# the calling script's (its --helpshort, `get_key_flags_for_module`), as if the script had defined them.
flags.disclaim_key_flags()


_LOADED: dict = {}


def user_methods() -> dict[str, list]:
  """Import every --methods_module once -> {module: methods it registered} (the first import's report, also
  when a flag validator imported them before `setup`)."""
  for module, names in load_modules([m for m in METHODS_MODULE.value if m not in _LOADED]).items():
    _LOADED[module] = names
  return {m: _LOADED[m] for m in METHODS_MODULE.value}


def setup(dtype=None) -> dict:
  """Apply the shared flags (precision and top-k impl for every later trace; import every --methods_module,
  printing the methods each registered) -> what to record: `numerics.describe(dtype)` (dtype: of the arrays
  the script runs) and the top-k impl."""
  numerics.set_precision(PRECISION.value)
  select.set_default_impl(TOPK_IMPL.value or None)
  for module, names in user_methods().items():
    print(f"--methods_module={module}: registered {names or 'nothing new (already imported)'}")
  return {**numerics.describe(dtype), "topk_impl": select.default_impl()}


class InputError(SystemExit):
  """Bad input found before the run: exits with status 1 and prints only the message (no traceback, no
  flag listing)."""

  def __init__(self, message: str):
    super().__init__(f"error: {message}")


def check(holder: flags.FlagHolder, rule: checks.Rule) -> flags.FlagHolder:
  """Refuse the flag's value when it is parsed (before `main` runs) if `rule` gives a reason."""

  def validate(value) -> bool:
    if (why := rule(value)) is not None:
      raise flags.ValidationError(why)
    return True

  flags.register_validator(holder, validate)
  return holder


MODEL_RULE = checks.model(tuple(assets.MODELS))


def topk_impl_rule(value: str) -> str | None:
  """A top-k impl for sparsifiers, whose k is data ('' allowed: by backend): `select.impl_problem`."""
  return select.impl_problem(value, traced_k=True) if value else None


check(TOPK_IMPL, topk_impl_rule)


def method_rule(value) -> str | None:
  """A method spec of `wina_jax.eval.variants` ('' allowed: the script's default). Validators run once every
  flag is parsed, so the --methods_module modules are imported first: their methods are known here."""
  from wina_jax.eval import variants

  try:
    user_methods()
    if value:
      variants.parse(value)
  except (ValueError, ImportError) as e:
    return str(e)
  return None


def methods_flag(
  default: Sequence[str],
  help: str = "Methods; '<m>-transform' runs <m> on WINA-transformed params.",
  *,
  name: str = "methods",
  nonempty: bool = True,
) -> flags.FlagHolder:
  """The calling script's list flag --`name` of method specs, each checked by `method_rule` (so after the
  --methods_module imports); `nonempty`: at least one."""
  return check(flags.DEFINE_list(name, list(default), help), checks.each(method_rule, str, nonempty=nonempty))


def sparsities_flag(
  default: Sequence[str] = ("0.25", "0.4", "0.5", "0.65"),
  help: str = "Target sparsities.",
  *,
  name: str = "sparsities",
) -> flags.FlagHolder:
  """The calling script's list flag --`name` of target sparsities, each in [0, 1)."""
  return check(flags.DEFINE_list(name, list(default), help), checks.each(checks.fraction()))


def model_config(model: str, seq_len: int = 0, seq_flag: str = "--seq_len") -> ModelConfig:
  """The config of `model` from its header alone (a damaged, cut-short or unreadable file -> InputError
  naming it), with `seq_len` checked against its max_position_embeddings."""
  from wina_jax.convert.load import read_config

  try:
    cfg = read_config(model)
  except (OSError, ValueError) as e:
    raise InputError(f"--model={model}: {e}") from None
  if seq_len > cfg.max_position_embeddings:
    raise InputError(
      f"{seq_flag}={seq_len} exceeds the model's max_position_embeddings ({cfg.max_position_embeddings}); "
      f"pass {seq_flag} of at most {cfg.max_position_embeddings}"
    )
  return cfg


def fits(parts: dict[str, int], what: str, advice: str) -> None:
  """InputError when the memory estimate `parts` of `what` exceeds the memory available; `advice`: what
  shrinks it, e.g. 'lower --seq_len or --ppl_batch'."""
  try:
    memory.check(parts, what, advice)
  except MemoryError as e:
    raise InputError(str(e)) from None


def preflight(
  model: str,
  seq_len: int,
  *,
  forward: tuple[int, str] | None = None,
  calibration: tuple[int, str] | None = None,
  transform: bool = False,
  dtype_bytes: int = 4,
) -> ModelConfig:
  """`model_config` and `fits` for the computations a script will run, before it loads anything:
  forward / calibration = (batch or window count, the flag that sets it ('' when none does)); transform:
  the WINA transform of the params. Returns the config."""
  cfg = model_config(model, seq_len)
  name = model or assets.DEFAULT_MODEL
  lower = lambda flag: f"lower --seq_len or {flag}" if flag else "lower --seq_len"
  if forward:
    n, flag = forward
    fits(
      memory.forward(cfg, n, seq_len, dtype_bytes),
      f"a forward on {n} x {seq_len} tokens of {name}",
      lower(flag),
    )
  if calibration:
    n, flag = calibration
    fits(memory.calibration(cfg, n, seq_len), f"calibration on {n} x {seq_len} tokens of {name}", lower(flag))
  if transform:
    fits(memory.transform(cfg), f"the transform of {name}", "use a machine with more memory")
  return cfg


def command_line(module: str) -> str:
  """How this run was started, as a user would type it again: 'python -m MODULE' and the arguments given
  (shell-quoted), for result files to record."""
  return shlex.join(["python", "-m", module, *sys.argv[1:]])


def emit_row(res: dict, row: dict, line: str, out: str) -> None:
  """Append `row` to res['rows'], print `line`, and rewrite the results JSON at `out` (when given), so a run cut
  short by its time limit keeps every row it finished."""
  res["rows"].append(row)
  print(line, flush=True)
  if out:
    with open(out, "w") as f:
      json.dump(res, f, indent=1)

"""Methods from outside the package: modules named by the user, and installed packages' entry points.

A method is registered when the module that defines it runs `@register("name")`, so a method in your own
module needs that module imported before its name is resolved:
  - scripts: `--methods_module=my_pkg.mine` (repeatable; `experiments/common.py` imports them first);
  - the lm-eval model: `model_args` `methods_module=my_pkg.mine` (several separated by ';');
  - Python: `import my_pkg.mine`, or `sparsity.load_modules(["my_pkg.mine"])`.
An installed package registers methods with no flag through the entry-point group `wina_jax.methods`, one
entry per method, its name the method's name and its value the module that registers it (or the `Method`
class itself: `mine = "my_pkg.mine:Mine"`); in pyproject.toml:

  [project.entry-points."wina_jax.methods"]
  mine = "my_pkg.mine"

`registry.get_method` imports an entry point when its name is first asked for, so a broken package fails
only the methods it provides. Failures raise `MethodsModuleError` naming the module and the methods it was
to add. This module is pure: it only imports.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import sys
from collections.abc import Sequence

GROUP = "wina_jax.methods"
_REGISTER = re.compile(r"""register\(\s*["']([^"']+)["']""")


class MethodsModuleError(ImportError):
  """A module that was to register sparsification methods failed to import, or registered none."""


def installed() -> dict[str, importlib.metadata.EntryPoint]:
  """{method name: entry point} of the installed packages' `wina_jax.methods` group."""
  return {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}


def declared(module: str) -> list[str]:
  """Method names a module is to register, read without importing it: its entry points' names, else the
  `register("...")` calls in its source ([] when neither is found)."""
  names = sorted(n for n, ep in installed().items() if ep.module == module)
  if names:
    return names
  try:
    spec = importlib.util.find_spec(module)
    with open(spec.origin) as f:
      return _REGISTER.findall(f.read())
  except Exception:  # a missing parent package, no source file: nothing to read
    return []


def import_module(module: str, origin: str) -> bool:
  """Import `module` (a dotted name) -> whether this call imported it (False: it was already imported).
  origin: where the name came from, for the error ('--methods_module', an entry point, ...)."""
  if module in sys.modules:
    return False
  try:
    importlib.import_module(module)
  except Exception as e:
    expected = declared(module)
    what = f"the methods {expected}" if expected else "its methods (none found in a readable source)"
    hint = (
      "put its folder on PYTHONPATH or install its package"
      if isinstance(e, ModuleNotFoundError) and e.name and module.startswith(e.name)
      else "fix that error in the module, or install what it imports"
    )
    raise MethodsModuleError(
      f"methods module {module!r} (from {origin}) failed to import, so {what} are not registered: "
      f"{type(e).__name__}: {e}; {hint}"
    ) from e
  return True


def load_entry_point(ep: importlib.metadata.EntryPoint) -> object:
  """Import an entry point of `GROUP` -> the object it names (a module, or a `Method` class)."""
  dist = ep.dist.name if getattr(ep, "dist", None) is not None else "an installed package"
  try:
    return ep.load()
  except Exception as e:
    raise MethodsModuleError(
      f"method {ep.name!r} comes from {dist}'s entry point '{ep.name} = {ep.value}' (group {GROUP}), "
      f"which failed to import: {type(e).__name__}: {e}; fix or reinstall that package, or uninstall it"
    ) from e


def split(modules: str | Sequence[str]) -> list[str]:
  """Module names from a list, or one string separated by ';' (lm-eval's model_args split on ',')."""
  parts = modules.split(";") if isinstance(modules, str) else modules
  return [m.strip() for m in parts if m.strip()]

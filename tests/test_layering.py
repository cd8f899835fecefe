"""The layering of `wina_jax/`, read from the imports (ast) of every module, function-level ones included.

Rules (docs/CONTRIBUTING.md): no import cycle between modules; `wina_jax` never imports `experiments`;
the pure sparsity modules (methods, registry, masks, measurement, stored thresholds) and the kernels never
import the model, not even through another module.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PURE_SPARSITY = (
  "base",
  "methods",
  "registry",
  "plugins",
  "fastpath",
  "measure",
  "prefill",
  "select",
  "thresholds",
  "store",
)
MODEL = "wina_jax.model"


def module_name(path: str) -> str:
  rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
  return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def modules() -> dict[str, str]:
  """{module name: path} of every .py file under wina_jax/."""
  out = {}
  for dirpath, _, files in os.walk(os.path.join(ROOT, "wina_jax")):
    for f in files:
      if f.endswith(".py"):
        out[module_name(os.path.join(dirpath, f))] = os.path.join(dirpath, f)
  return out


def _is_type_checking(test: ast.expr) -> bool:
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
    isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
  )


def imported(name: str, path: str, known) -> set[str]:
  """Names a module imports anywhere in its body: `from a.b import c` gives a.b.c when that is a module,
  else a.b; relative imports are resolved against the module's package. Imports under
  `if TYPE_CHECKING:` never run, so they are no edges."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  typing_only = {
    id(n)
    for node in ast.walk(tree)
    if isinstance(node, ast.If) and _is_type_checking(node.test)
    for stmt in node.body
    for n in ast.walk(stmt)
  }
  out = set()
  for node in ast.walk(tree):
    if id(node) in typing_only:
      continue
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
      for a in node.names:
        out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
  return out


def graph() -> dict[str, set[str]]:
  """{module of wina_jax: every name it imports (modules of wina_jax or outside it)}."""
  mods = modules()
  return {m: imported(m, p, mods) for m, p in mods.items()}


def find_cycle(edges: dict[str, set[str]]):
  """One import cycle [a, b, ..., a] among `edges` (internal modules only), or None."""
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for n in sorted(edges.get(m, ())):
      if n not in edges or n == m:
        continue
      if state.get(n) == "open":
        return stack[stack.index(n) :] + [n]
      if n not in state:
        found = visit(n)
        if found:
          return found
    stack.pop()
    state[m] = "done"
    return None

  for m in sorted(edges):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


def reachable(edges, start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    m = todo.pop()
    for n in edges.get(m, ()):
      if n in edges and n not in seen:
        seen.add(n)
        todo.append(n)
  return seen


@pytest.fixture(scope="module")
def edges():
  return graph()


def test_no_import_cycle(edges):
  internal = {m: {n for n in imps if n in edges} for m, imps in edges.items()}
  cycle = find_cycle(internal)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_library_never_imports_experiments(edges):
  bad = {m: sorted(n for n in imps if n.split(".")[0] == "experiments") for m, imps in edges.items()}
  assert not {m: v for m, v in bad.items() if v}


def test_sparsifiers_and_kernels_never_reach_the_model(edges):
  pure = [f"wina_jax.sparsity.{m}" for m in PURE_SPARSITY]
  assert set(pure) <= set(edges), "a pure sparsity module is gone: update PURE_SPARSITY"
  guarded = pure + [m for m in edges if m.split(".")[:2] == ["wina_jax", "kernels"]]
  bad = [m for m in guarded if MODEL in reachable(edges, m)]
  assert not bad, f"{bad} import {MODEL} (directly or through another module)"


def test_the_checker_sees_cycles_and_lazy_imports():
  """The parser finds a function-level import, and a cycle through it."""
  tree = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert find_cycle(tree) == ["a", "b", "c", "a"] and find_cycle({"a": {"b"}, "b": set()}) is None
  assert "wina_jax.model" in graph()["wina_jax.sparsity.layerwise"]

"""Methods from a module outside `wina_jax` (the fixture package tests/fixtures/demo_methods): loaded by name
(`sparsity.load_modules`, the scripts' --methods_module, lm-eval's model_args) or from an installed
package's entry point, with errors that name a failing module and the methods it was to add."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_sweep import ROOT, _env, tiny_folder  # noqa: F401  (fixture)

from wina_jax import sparsity
from wina_jax.sparsity import MethodsModuleError, registry

FIXTURES = os.path.join(ROOT, "tests", "fixtures")


@pytest.fixture
def fresh(monkeypatch):
  """The built-in methods only, the fixture package on sys.path and not imported (all undone afterwards)."""
  builtins = {n: c for n, c in registry._METHODS.items() if c.__module__.startswith("wina_jax.")}
  monkeypatch.setattr(registry, "_METHODS", builtins)
  monkeypatch.syspath_prepend(FIXTURES)
  ours = lambda m: m.split(".")[0] in ("demo_methods", "demo_ep_cube", "demo_no_methods")
  saved = {m: sys.modules.pop(m) for m in list(sys.modules) if ours(m)}
  yield
  for m in [m for m in sys.modules if ours(m)]:
    del sys.modules[m]
  sys.modules.update(saved)


def test_load_modules_registers_the_modules_methods(fresh):
  assert "sq_wina" not in sparsity.known_methods()
  assert sparsity.load_modules("demo_methods") == {"demo_methods": ["sq_wina"]}
  assert sparsity.get_method("sq_wina").name == "sq_wina"
  assert sparsity.load_modules(["demo_methods"]) == {"demo_methods": []}  # already imported: no error


def test_a_module_that_fails_to_import_is_named_with_its_methods(fresh, tmp_path, monkeypatch):
  with pytest.raises(
    MethodsModuleError,
    match=r"'demo_methods.broken' \(from --methods_module\) failed to import, so the methods "
    r"\['broken_method'\] are not registered: ModuleNotFoundError: No module named "
    r"'a_package_that_is_not_installed'; fix that error in the module",
  ):
    sparsity.load_modules(["demo_methods.broken"])
  with pytest.raises(MethodsModuleError, match=r"'no_such_pkg.mine' .*put its folder on PYTHONPATH"):
    sparsity.load_modules("no_such_pkg.mine")
  (tmp_path / "demo_no_methods.py").write_text("X = 1\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  with pytest.raises(MethodsModuleError, match="'demo_no_methods' .* imported but registered no method"):
    sparsity.load_modules("demo_no_methods")


def test_an_installed_packages_entry_points_register_on_first_use(fresh, tmp_path, monkeypatch):
  """A dist-info folder on sys.path is what an installed package looks like to importlib.metadata."""
  dist = tmp_path / "demo_plugin-0.1.dist-info"
  dist.mkdir()
  (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: demo-plugin\nVersion: 0.1\n")
  (dist / "entry_points.txt").write_text(
    "[wina_jax.methods]\nsq_wina = demo_methods\ncube = demo_ep_cube:Cube\ngone = demo_ep_missing\n"
  )
  (tmp_path / "demo_ep_cube.py").write_text(
    "import dataclasses\nimport jax.numpy as jnp\nfrom wina_jax import sparsity\n\n\n"
    "@dataclasses.dataclass(frozen=True)\nclass Cube(sparsity.Method):\n"
    "  def score(self, site, x, state):\n    return jnp.abs(x) ** 3\n"
  )
  monkeypatch.syspath_prepend(str(tmp_path))
  assert {"sq_wina", "cube", "gone"} <= set(sparsity.known_methods())
  assert "demo_methods" not in sys.modules  # listed, not imported
  assert type(sparsity.get_method("sq_wina")).__module__ == "demo_methods"
  assert sparsity.get_method("cube").name == "cube"  # a Method class as the entry point: registered
  with pytest.raises(
    MethodsModuleError, match=r"method 'gone' comes from demo-plugin's entry point 'gone = demo_ep_missing'"
  ):
    sparsity.get_method("gone")


def _sweep(folder, out, *extra):
  cmd = [sys.executable, "-m", "experiments.quality.sweep", f"--model={folder}", "--methods=sq_wina"]
  cmd += ["--sparsities=0.5", "--tasks=", "--ppl_windows=1", "--seq_len=16", "--seeds=0", f"--out={out}"]
  env = {**_env(), "PYTHONPATH": os.pathsep.join([ROOT, FIXTURES])}
  return subprocess.run(cmd + list(extra), cwd=ROOT, env=env, capture_output=True, text=True)


def test_sweep_cli_runs_a_method_from_the_users_module(tiny_folder, tmp_path, fresh):  # noqa: F811
  """--methods_module=demo_methods: the sweep's perplexity of sq_wina equals the method's own, run here;
  without the flag the sweep's error says which flag loads it."""
  from wina_jax.convert import load
  from wina_jax.data.text import load_texts, token_windows
  from wina_jax.eval import variants
  from wina_jax.eval.perplexity import perplexity
  from wina_jax.tokenizer import load_tokenizer

  res = _sweep(tiny_folder, tmp_path / "no_flag")
  assert res.returncode != 0 and "--methods_module=your.module" in res.stderr
  res = _sweep(tiny_folder, tmp_path / "out", "--methods_module=demo_methods")
  assert res.returncode == 0, res.stderr[-2000:]
  assert "--methods_module=demo_methods: registered ['sq_wina']" in res.stdout
  row = json.loads((tmp_path / "out" / "results.json").read_text())[0]

  sparsity.load_modules("demo_methods")
  params, cfg = load(tiny_folder)
  windows = token_windows(load_tokenizer(tiny_folder), load_texts("boolq:heldout"), 16, 1)
  v = variants.build(params, cfg, "sq_wina", 0.5)
  own = perplexity(params, cfg, windows, v.sparsifier, dense_prefix=sparsity.resolve_prefill("all", 16))
  assert row["method"] == "sq_wina" and row["ppl"] == pytest.approx(own["ppl"], rel=1e-6)


def test_lm_eval_model_args_load_the_users_module(fresh, tiny_folder):  # noqa: F811
  """The harness's own model_args path (`create_from_arg_string`, as its CLI): methods_module imports the
  fixture package, and the model scores with the method's own sparsifier."""
  from lm_eval.api.registry import get_model

  from wina_jax.eval import lm_eval_adapter  # noqa: F401  (registers the model)
  from wina_jax.eval import multiple_choice as mc

  args = f"model={tiny_folder},methods_module=demo_methods,method=sq_wina,sparsity=0.5,mode=topk"
  lm = get_model("wina_jax").create_from_arg_string(args, {"progress": False})
  v = lm.variant
  own = sparsity.make("sq_wina", v.params, v.cfg, 0.5)
  assert type(v.sparsifier.method).__module__ == "demo_methods"
  assert v.sparsifier.method == own.method
  assert {s: int(k) for s, k in v.sparsifier.k.items()} == {s: int(k) for s, k in own.k.items()}
  reqs = [
    mc.encode_pair(lm.tok_encode, c, x, lm.eot_token_id) for c, x in [("The cat", " sat"), ("A", " b c")]
  ]
  got = [ll for ll, _ in lm._loglikelihood_tokens([(None, c, x) for c, x in reqs])]
  ref = [ll for ll, _ in mc.loglikelihoods(v.params, v.cfg, reqs, own, progress=False)]
  np.testing.assert_allclose(got, ref, rtol=1e-6)

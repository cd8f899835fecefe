"""Walk one script's flags in a fresh process (scripts share flag names, so one process per script).

  python tests/flag_walk.py MODULE PROBES_JSON [CASES_JSON]

PROBES_JSON: {"paths": {kind: path}} of prepared files (missing, empty, cut-short ones), used with the flags
named in PATH_FLAGS. Prints one JSON object: 'defaults' (the error of parsing no flags, else None), 'flags' {name: {'type', 'help', 'probes': {value: error or
None}}}, each probe parsed alone on top of the defaults, timed ('seconds'); and 'cases' {argv joined:
{'exit', 'stderr', 'loaded'}}: each argv run through the script's `main` as `app.run` would, where
'exit' is the SystemExit message, 'traceback' an uncaught exception's, 'loaded' whether weights were
converted (`wina_jax.convert.load._convert` ran).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
import sys
import time

from absl import flags

HUGE_INT = str(2**63)
NUMERIC = ("int", "float")
# flags naming a file of a kind: probed missing, empty and (where that is detectable) cut short
PATH_FLAGS = {
  "model": "model",
  "text": "text",
  "heldout": "text",
  "ppl_text": "text",
  "calib_text": "text",
  "json": "json",
  "configs": "json",
  "sweeps": "json",
  "config_sets": "json",
  "bundle": "npz",
  "out": "out",
  "plot": "out",
}


def parse(argv: list[str]) -> str | None:
  """None if `argv` parses (validators included), else absl's error message."""
  flags.FLAGS.unparse_flags()
  try:
    flags.FLAGS(["prog", *argv])
  except flags.Error as e:
    return str(e)
  return None


def kind(flag) -> str:
  """'int' | 'float' | 'ints' | 'floats' | 'other': numbers, or lists whose default entries are numbers."""
  t = flag.flag_type()
  if t in NUMERIC:
    return t
  if t == "list" and flag.default:
    for parse_as, name in ((int, "ints"), (float, "floats")):
      try:
        [parse_as(v) for v in flag.default]
        return name
      except ValueError:
        continue
  return "other"


def probes(name: str, k: str, paths: dict) -> list[str]:
  if k in ("int", "ints"):
    return ["0", "-1", "nan", HUGE_INT]
  if k in ("float", "floats"):
    return ["0", "-1", "nan", "inf"]
  if name in PATH_FLAGS:
    kinds = {  # a cut-short model is found before loading (`common.preflight`), not when parsing
      "out": ("under_file",),
      "model": ("missing", "empty"),
      "npz": ("empty", "cut_npz"),  # a missing bundle is written by the run
    }.get(PATH_FLAGS[name], ("missing", "empty", f"cut_{PATH_FLAGS[name]}"))
    return [paths[p] for p in kinds if p in paths]
  return []


def main(module: str, probe_files: dict, cases: list[list[str]]) -> dict:
  mod = importlib.import_module(module)
  own = {f.name: f for f in flags.FLAGS.get_key_flags_for_module(mod)}
  out = {"flags": {}, "cases": {}, "defaults": parse([])}  # None: every default passes its rule
  for name, flag in sorted(own.items()):
    k = kind(flag)
    res = {}
    for value in probes(name, k, probe_files):
      t0 = time.time()
      res[value] = parse([f"--{name}={value}"])
      res[value + ":seconds"] = time.time() - t0
    out["flags"][name] = {"type": k, "help": flag.help, "probes": res}
  loader = importlib.import_module("wina_jax.convert.load")  # every loader ends in _convert
  loaded, original = [], loader._convert
  loader._convert = lambda *a, **kw: loaded.append(1) or original(*a, **kw)
  for argv in cases:
    loaded.clear()
    err, res = io.StringIO(), {}
    t0 = time.time()
    with contextlib.redirect_stderr(err):
      if (msg := parse(argv)) is not None:
        res["exit"] = f"flag error: {msg}"
      else:
        try:
          mod.main([module])
          res["exit"] = None
        except SystemExit as e:
          res["exit"] = str(e.code)
        except Exception as e:  # what would reach the user as a traceback
          res["traceback"] = f"{type(e).__name__}: {e}"
    res.update(stderr=err.getvalue()[-2000:], loaded=bool(loaded), seconds=time.time() - t0)
    out["cases"][" ".join(argv)] = res
  return out


if __name__ == "__main__":
  files = json.loads(sys.argv[2])
  result = main(sys.argv[1], files, json.loads(sys.argv[3]) if len(sys.argv) > 3 else [])
  print(json.dumps(result, default=lambda x: None if isinstance(x, float) and math.isnan(x) else str(x)))

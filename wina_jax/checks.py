"""Value checks for script inputs: each rule maps a value to None (allowed) or the reason it is not.

Rules are flag-free (`experiments.common.check` turns one into an absl validator, which names the flag
and the value); a reason says what is allowed, e.g. 'must be an integer in [1, 2147483647]'.

  count(lo, hi)         an integer in [lo, hi] (hi defaults to INT_MAX: shapes and steps are int32)
  real(lo, hi, ...)     a finite float in [lo, hi] (open ends with lo_open / hi_open)
  fraction()            a sparsity: a finite float in [0, 1)
  one_of(names)         one of a fixed set of names
  each(rule)            every entry of a list flag (strings parsed as numbers)
  file() / text() / model() / out_path() / json_file() / npz_file()   paths (see each)
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from collections.abc import Callable
from typing import Optional

Rule = Callable[[object], Optional[str]]

INT_MAX = 2**31 - 1  # jax indexes and shapes in int32: a larger count cannot be a real request
BOOLQ_TEXTS = ("boolq:calibration", "boolq:heldout")


def count(lo: int = 1, hi: int = INT_MAX, *, none: bool = False) -> Rule:
  """An integer in [lo, hi]; `none`: None (the flag's 'unset') is allowed too."""

  def rule(v):
    if v is None:
      return None if none else "must be set"
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
      return f"must be an integer in [{lo}, {hi}]"
    return None

  return rule


def real(lo: float = -math.inf, hi: float = math.inf, *, lo_open=False, hi_open=False, none=False) -> Rule:
  """A finite float in [lo, hi] ('(' / ')' with lo_open / hi_open); `none`: None is allowed too."""
  span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"

  def rule(v):
    if v is None:
      return None if none else "must be set"
    try:
      x = float(v)
    except (TypeError, ValueError):
      return f"must be a number in {span}"
    inside = (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
    return None if math.isfinite(x) and inside else f"must be a finite number in {span}"

  return rule


def fraction() -> Rule:
  """A target sparsity: the fraction of inputs zeroed, in [0, 1)."""
  return real(0.0, 1.0, hi_open=True)


def one_of(names) -> Rule:
  """One of `names` (e.g. the model shapes of `wina_jax.bench.shapes.SHAPES`)."""
  return lambda v: None if v in names else f"must be one of {sorted(names)}"


def parses(parse: Callable[[str], object]) -> Rule:
  """A string that `parse` accepts (its ValueError's message is the reason, e.g. a kernel tiling spec)."""

  def check(v):
    try:
      parse(v)
    except ValueError as e:
      return str(e)
    return None

  return check


def each(
  rule: Rule, parse: Callable[[str], object] = float, *, nonempty: bool = False, split: str = ""
) -> Rule:
  """Every entry of a list flag: parsed with `parse` (int, float or str), then `rule`; `split`: entries
  are themselves `split`-joined lists (e.g. 'a.json+b.json')."""

  def check(values):
    values = [x for v in values or [] for x in (v.split(split) if split else [v])]
    if nonempty and not values:
      return "must list at least one value"
    for v in values:
      try:
        x = parse(v)
      except (TypeError, ValueError):
        return f"entry {v!r} is not {'an integer' if parse is int else 'a number'}"
      if (why := rule(x)) is not None:
        return f"entry {v!r} {why}"
    return None

  return check


def _readable(path: str) -> Optional[str]:
  if not os.path.exists(path):
    return f"{path} does not exist"
  if os.path.isfile(path) and os.path.getsize(path) == 0:
    return f"{path} is empty"
  if not os.access(path, os.R_OK):
    return f"{path} is not readable"
  return None


def file(*, empty: bool = True) -> Rule:
  """An existing, readable, non-empty file; `empty`: '' (the flag's 'none') is allowed."""
  return lambda v: (None if empty else "must name a file") if not v else _readable(v)


def text(also: tuple[str, ...] = ()) -> Rule:
  """A text source: 'boolq:calibration', 'boolq:heldout', a name in `also` or an existing non-empty file."""

  def rule(v):
    if v in BOOLQ_TEXTS or v in also:
      return None
    if not v:
      return f"must be one of {[*BOOLQ_TEXTS, *also]} or a text file"
    if str(v).startswith("boolq:"):
      return f"unknown split; use one of {list(BOOLQ_TEXTS)}"
    return _readable(v) or (None if os.path.isfile(v) else f"{v} is not a file")

  return rule


def model(names: tuple[str, ...]) -> Rule:
  """A model name in `names` ('' = the default), a .gguf file or an HF checkpoint folder with
  config.json. Whether a GGUF is complete is checked before loading (`convert.gguf_header`)."""

  def rule(v):
    if not v or v in names:
      return None
    if (why := _readable(v)) is not None:
      return f"is neither a known model {list(names)} nor an existing path: {why}"
    if os.path.isdir(v):
      return None if os.path.isfile(os.path.join(v, "config.json")) else f"folder {v} has no config.json"
    return None if v.endswith(".gguf") else f"{v} is not a .gguf file (or an HF checkpoint folder)"

  return rule


def json_file(*, empty: bool = True) -> Rule:
  """An existing file of valid JSON; `empty`: '' is allowed."""

  def rule(v):
    if not v:
      return None if empty else "must name a JSON file"
    if (why := _readable(v)) is not None:
      return why
    try:
      with open(v) as f:
        json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
      return f"{v} is not valid JSON (damaged or cut short?): {e}"
    return None

  return rule


def npz_file(*, missing: bool = False) -> Rule:
  """An .npz archive whose members all pass their CRC; `missing`: a path not there yet is allowed
  (written by the run), and so is ''."""

  def rule(v):
    if not v or (missing and not os.path.exists(v)):
      return None
    if (why := _readable(v)) is not None:
      return why
    try:
      with zipfile.ZipFile(v) as z:
        bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      return f"{v} is not a complete .npz archive (damaged or cut short?): {e}"
    return None if bad is None else f"{v} is damaged: member {bad} fails its checksum"

  return rule


def out_path() -> Rule:
  """An output path ('' allowed) whose nearest existing ancestor is a writable folder."""

  def rule(v):
    if not v:
      return None
    if os.path.isdir(v) and not os.access(v, os.W_OK):
      return f"{v} is not writable"
    parent = os.path.dirname(os.path.abspath(v))
    while not os.path.exists(parent):
      parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
      return f"{parent} is a file, so {v} cannot be created under it"
    return None if os.access(parent, os.W_OK) else f"{parent} is not writable"

  return rule

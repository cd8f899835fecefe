"""Pre-tokenised evaluation data in one compressed .npz: tokenized tasks, token windows and what made them.

A bundle lets evaluation run where no tokenizer or dataset library is installed (a GPU machine) and
skips re-tokenising on reruns. `experiments/quality/sweep.py --bundle=PATH` writes one when PATH is missing and
reads it otherwise, checking that its `meta` (tasks, limit, texts, window sizes, tokenizer) matches.

Layout (token ids as uint32; no pickles):
  meta                         JSON string
  task/<name>/ids              context then continuation ids of every request, back to back
  task/<name>/{ctx,cont}       [R] their lengths;  sizes [E], chars [R], gold [E] as in `Tokenized`
  windows/<name>               [N, T] token windows (e.g. 'ppl', 'calib')
"""

from __future__ import annotations

import json
import os

import numpy as np

from wina_jax.eval.multiple_choice import Tokenized

VERSION = 1


def save(path: str, tasks: dict[str, Tokenized], windows: dict[str, np.ndarray], meta: dict) -> None:
  """Write the bundle atomically (via a temporary file in the same folder)."""
  arrays = {"meta": np.asarray(json.dumps({"version": VERSION, **meta}, sort_keys=True))}
  for name, t in tasks.items():
    ids = [i for ctx, cont in t.requests for i in (*ctx, *cont)]
    arrays.update(
      {
        f"task/{name}/ids": np.asarray(ids, np.uint32),
        f"task/{name}/ctx": np.asarray([len(c) for c, _ in t.requests], np.int32),
        f"task/{name}/cont": np.asarray([len(c) for _, c in t.requests], np.int32),
        f"task/{name}/sizes": np.asarray(t.sizes, np.int32),
        f"task/{name}/chars": np.asarray(t.chars, np.int32),
        f"task/{name}/gold": np.asarray(t.gold, np.int32),
      }
    )
  for name, w in windows.items():
    arrays[f"windows/{name}"] = np.asarray(w, np.int32)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)


def _requests(ids: np.ndarray, ctx: np.ndarray, cont: np.ndarray) -> tuple:
  ends = np.cumsum(ctx + cont)
  starts = ends - ctx - cont
  ids = ids.tolist()
  return tuple(
    (ids[s : s + a], ids[s + a : e]) for s, a, e in zip(starts.tolist(), ctx.tolist(), ends.tolist())
  )


def load(path: str) -> tuple[dict[str, Tokenized], dict[str, np.ndarray], dict]:
  """-> (tasks, windows, meta) of a bundle written by `save`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"bundle {path} not found; write one with experiments/quality/sweep.py --bundle={path} "
      f"on a machine with the tokenizer and data"
    )
  with np.load(path, allow_pickle=False) as z:
    meta = json.loads(str(z["meta"]))
    if meta.get("version") != VERSION:
      raise ValueError(
        f"bundle {path} has version {meta.get('version')}, this code reads {VERSION}: rewrite it"
      )
    names = sorted({k.split("/")[1] for k in z.files if k.startswith("task/")})
    tasks = {
      n: Tokenized(
        _requests(z[f"task/{n}/ids"], z[f"task/{n}/ctx"], z[f"task/{n}/cont"]),
        tuple(z[f"task/{n}/sizes"].tolist()),
        tuple(z[f"task/{n}/chars"].tolist()),
        tuple(z[f"task/{n}/gold"].tolist()),
      )
      for n in names
    }
    windows = {k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("windows/")}
  return tasks, windows, meta


def check_meta(meta: dict, want: dict, path: str) -> None:
  """Raise if the bundle was made with other data settings than `want`."""
  diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
  if diff:
    raise ValueError(
      f"bundle {path} was made with other settings {{name: (bundle, wanted)}}: {diff}; "
      f"delete it or pass another --bundle path to write a new one"
    )

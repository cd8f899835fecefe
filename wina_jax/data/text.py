"""Plain-text corpora and their tokenisation into fixed-length windows.

BoolQ's Wikipedia passages are the default calibration and perplexity text: the unique passages are
shuffled with a fixed seed and split in two disjoint halves, 'calibration' and 'heldout'.
"""

from __future__ import annotations

import os

import numpy as np

from wina_jax import assets

SPLITS = ("calibration", "heldout")


def boolq_passages(split: str = "calibration") -> list[str]:
  """Unique BoolQ validation passages of one half: 'calibration' or 'heldout' (disjoint)."""
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is unknown; choose from {SPLITS}")
  import datasets

  ds = datasets.load_from_disk(assets.dataset_dir("boolq", "none", "validation"))
  passages = sorted(set(ds["passage"]))
  order = np.random.RandomState(0).permutation(len(passages))
  half = len(passages) // 2
  idx = order[:half] if split == "calibration" else order[half:]
  return [passages[i] for i in sorted(idx)]


def text_file(path: str) -> list[str]:
  """Paragraphs (blank-line separated) of a UTF-8 text file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"text file {path} not found")
  with open(path, encoding="utf-8") as f:
    paras = [p.strip() for p in f.read().split("\n\n")]
  return [p for p in paras if p]


def load_texts(source: str) -> list[str]:
  """'boolq:calibration', 'boolq:heldout', or a path to a text file."""
  if source.startswith("boolq:"):
    return boolq_passages(source.split(":", 1)[1])
  return text_file(source)


def token_windows(
  tokenizer, texts: list[str], seq_len: int, max_windows: int | None = None, separator_id: int | None = None
) -> np.ndarray:
  """Concatenate tokenised texts (separated by `separator_id`, default EOS) -> [N, seq_len] int32.

  Raises if the texts do not fill one window.
  """
  if not texts or not any(t.strip() for t in texts):
    raise ValueError("no text to tokenise: the corpus is empty")
  sep = tokenizer.eos_token_id if separator_id is None else separator_id
  stream: list[int] = []
  need = None if max_windows is None else max_windows * seq_len
  for t in texts:
    stream.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
    stream.append(sep)
    if need is not None and len(stream) >= need:
      break
  n = len(stream) // seq_len
  if n == 0:
    raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one window of {seq_len}")
  if max_windows is not None:
    n = min(n, max_windows)
  return np.asarray(stream[: n * seq_len], np.int32).reshape(n, seq_len)

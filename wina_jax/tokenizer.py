"""Tokenizers through transformers, GGUF-embedded ones included (cached after the first conversion)."""

from __future__ import annotations

import os

from wina_jax import assets
from wina_jax.convert import cache
from wina_jax.convert.gguf_file import open_gguf


def load_tokenizer(name_or_path: str):
  """A transformers tokenizer from a model name in `assets.MODELS`, a GGUF file or an HF checkpoint folder."""
  import transformers

  path = assets.model_path(name_or_path)
  if os.path.isfile(path) and path.endswith(".gguf"):
    saved = cache.file_key(path, "tokenizer")
    if cache.usable(saved):
      return transformers.AutoTokenizer.from_pretrained(saved)
    open_gguf(path)  # a clear error for a damaged file, before transformers' reader meets it
    folder, name = os.path.split(path)
    tok = transformers.AutoTokenizer.from_pretrained(folder or ".", gguf_file=name)
    if saved:
      cache.store(saved, tok.save_pretrained)
    return tok
  if os.path.isdir(path):
    return transformers.AutoTokenizer.from_pretrained(path)
  raise FileNotFoundError(f"no tokenizer at {path}: expected a .gguf file or an HF checkpoint folder")

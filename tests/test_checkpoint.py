"""Orbax params checkpoints: a bit-exact round trip of params and config (from a loader and from
`nn.CausalLM.init`), restore onto a target's shardings, the calibration fingerprint survives, clear errors.

  .venv/bin/python -m pytest -q -p no:xdist tests/test_checkpoint.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_hf_model

from wina_jax import checkpoint
from wina_jax import nn as wnn
from wina_jax.convert import from_transformers
from wina_jax.sparsity import fingerprint


def _assert_trees_equal(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_exact(tmp_path):
  params, cfg = from_transformers(make_hf_model("llama3_rope"))  # rope_scaling exercises the config json
  path = checkpoint.save_params(str(tmp_path / "ckpt"), params, cfg)
  restored, rcfg = checkpoint.restore_params(path)
  assert rcfg == cfg
  _assert_trees_equal(restored, params)
  assert fingerprint(restored, rcfg) == fingerprint(params, cfg)  # npz calibration files still load
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), params)
  onto, _ = checkpoint.restore_params(path, target=target)
  assert all(x.sharding == device for x in jax.tree_util.tree_leaves(onto))
  _assert_trees_equal(onto, params)


def test_module_init_params_round_trip(tmp_path):
  cfg = from_transformers(make_hf_model("phi3_fused"))[1]
  params = wnn.CausalLM(cfg, param_dtype=jnp.bfloat16).init(
    jax.random.PRNGKey(1), jnp.zeros((1, 1), jnp.int32)
  )["params"]
  restored, rcfg = checkpoint.restore_params(checkpoint.save_params(str(tmp_path / "c"), params, cfg))
  assert rcfg == cfg
  _assert_trees_equal(restored, params)


def test_errors_name_the_fix(tmp_path):
  params, cfg = from_transformers(make_hf_model("llama_gqa_tied"))
  path = checkpoint.save_params(str(tmp_path / "c"), params, cfg)
  with pytest.raises(FileExistsError, match="force=True"):
    checkpoint.save_params(path, params, cfg)
  moved = jax.tree_util.tree_map(lambda a: a + 1, params)
  overwritten = checkpoint.save_params(path, moved, cfg, force=True)
  _assert_trees_equal(checkpoint.restore_params(overwritten)[0], moved)
  with pytest.raises(FileNotFoundError, match="save_params"):
    checkpoint.restore_params(str(tmp_path / "missing"))

"""SPMD over a device mesh with `jax.sharding`: mesh flag, partition rules, sharded params/cache/batch.

A mesh has two named axes: 'data' (batch, and optionally FSDP of the weights) and 'model' (tensor
parallel). `make_mesh('data:1,model:4')` builds it; everything else is plain `jax.jit` over arrays placed
with `NamedSharding`: the compiler (GSPMD/Shardy, `AxisType.Auto`) partitions the unchanged model code
and inserts the collectives, so results equal one device up to float reduction order.

Tensor-parallel rules (Megatron layout, kernels [in, out]); the model family declares them
(`Family.sharding_rules`; the shared table is `wina_jax.families.base.SHARDING_RULES`):

  q/k/v_proj, qkv_proj   [d, heads*hd]   columns over 'model' (whole heads)
  o_proj                 [H*hd, d]       rows over 'model'  -> one all-reduce per attention block
  gate/up, gate_up_proj  [d, I]          columns over 'model'
  down_proj              [I, d]          rows over 'model'  -> one all-reduce per MLP block
  residual_attn/mlp      [d, d]          rows over 'model'
  embed_tokens           [vocab, d]      vocab over 'model' (d if vocab does not divide)
  lm_head                [d, vocab]      vocab over 'model'
  norms, biases of row-sharded kernels   replicated

With `fsdp=True` the other dimension of each kernel is sharded over 'data'. A dimension that the mesh
axis does not divide (or, for attention, that would split a head) stays replicated.
KV cache [B, S, K, hd]: batch over 'data', kv heads over 'model' when K divides.
Sparsifier state (thresholds, norms) is small and replicated (`replicate`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Optional

import jax
import numpy as np
from flax import traverse_util
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from wina_jax import families
from wina_jax.config import ModelConfig
from wina_jax.families.base import FSDP, TP  # logical axes: tensor parallel -> 'model', FSDP -> 'data'/none

AXES = ("data", "model")


def parse_mesh(spec: str) -> dict[str, int]:
  """'data:1,model:4' -> {'data': 1, 'model': 4}; a missing axis has size 1, '' means {}.

  One axis may be -1: it takes the devices the others leave (resolved in `make_mesh`)."""
  sizes: dict[str, int] = {}
  for part in filter(None, (p.strip() for p in spec.split(","))):
    name, sep, size = part.partition(":")
    if not sep or name not in AXES or not re.fullmatch(r"-1|\d+", size.strip()) or int(size) == 0:
      raise ValueError(
        f"bad mesh entry {part!r} in {spec!r}; write e.g. 'data:1,model:4' with axes {AXES}"
        " and positive sizes (one may be -1)"
      )
    if name in sizes:
      raise ValueError(f"mesh axis {name!r} given twice in {spec!r}")
    sizes[name] = int(size)
  if list(sizes.values()).count(-1) > 1:
    raise ValueError(f"only one mesh axis may be -1 in {spec!r}")
  return {a: sizes.get(a, 1) for a in AXES}


def make_mesh(spec: str = "model:-1", devices: Optional[Sequence[Any]] = None) -> Mesh:
  """Mesh ('data', 'model') from a `parse_mesh` spec over the first prod(sizes) of `devices`.

  Axis types are `Auto`: the compiler propagates shardings from the inputs of a jitted function."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = parse_mesh(spec)
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  if -1 in sizes.values():
    if len(devices) % known:
      raise ValueError(f"mesh {spec!r}: {len(devices)} devices are not a multiple of {known}")
    sizes = {a: len(devices) // known if s == -1 else s for a, s in sizes.items()}
  n = int(np.prod(list(sizes.values())))
  if n > len(devices):
    raise ValueError(
      f"mesh {spec!r} needs {n} devices but only {len(devices)} are visible; on CPU set "
      f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before jax starts"
    )
  shape = tuple(sizes[a] for a in AXES)
  return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices[:n])


def _fit(logical: tuple, shape: tuple, mesh: Mesh, fsdp: bool, unit: int) -> tuple[P, bool]:
  """Resolve logical axes to a PartitionSpec for `shape`; drop axes that do not divide.

  Returns (spec, whether the TP axis survived)."""
  names = {TP: "model", FSDP: "data" if fsdp else None, None: None}
  out, tp_ok = [], True
  for ax, dim in zip(logical, shape):
    name = names[ax]
    n = mesh.shape[name] if name else 1
    step = unit if ax == TP else 1
    ok = name is not None and n > 1 and dim % (n * step) == 0
    if ax == TP and not ok:
      tp_ok = False
    out.append(name if ok else None)
  return P(*out), tp_ok


def spec_for(path: str, shape: tuple, cfg: ModelConfig, mesh: Mesh, fsdp: bool = False) -> P:
  """PartitionSpec of the param at `path` ('layers/0/mlp/up_proj/kernel') with `shape`: the first of the
  family's rules whose regex matches, and of its candidates the first whose TP dimension divides evenly
  (in whole units)."""
  family = families.get(cfg.model_type)
  for pattern, candidates, unit in family.sharding_rules:
    if re.search(pattern, path):
      if len(candidates[0]) != len(shape):
        raise ValueError(
          f"param {path} has shape {shape}; its partition rule {pattern!r} expects {len(candidates[0])} dims"
        )
      step = getattr(cfg, unit) if unit else 1
      fitted = [_fit(c, shape, mesh, fsdp, step) for c in candidates]
      return next((spec for spec, tp_ok in fitted if tp_ok), fitted[0][0])
  raise ValueError(
    f"no partition rule matches param {path!r}; add one to the sharding_rules of {family.source}"
  )


def param_specs(params: dict, cfg: ModelConfig, mesh: Mesh, fsdp: bool = False) -> dict:
  """Pytree of PartitionSpec matching `params` (the `wina_jax.model` layout)."""
  flat = traverse_util.flatten_dict(params, sep="/")
  return traverse_util.unflatten_dict(
    {k: spec_for(k, tuple(v.shape), cfg, mesh, fsdp) for k, v in flat.items()}, sep="/"
  )


def named(mesh: Mesh, specs: Any) -> Any:
  """Map a pytree of PartitionSpec to NamedSharding on `mesh`."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard_params(params: dict, cfg: ModelConfig, mesh: Mesh, fsdp: bool = False) -> dict:
  """`params` placed on `mesh` by `param_specs`."""
  return jax.device_put(params, named(mesh, param_specs(params, cfg, mesh, fsdp)))


def cache_specs(cache: dict, cfg: ModelConfig, mesh: Mesh) -> dict:
  """Specs for a `model.init_cache` pytree: k/v [B, S, K, hd] over batch ('data') and kv heads ('model')."""
  b = cache["layers"]["0"]["k"].shape[0]
  kv = P(
    "data" if mesh.shape["data"] > 1 and b % mesh.shape["data"] == 0 else None,
    None,
    "model" if mesh.shape["model"] > 1 and cfg.num_key_value_heads % mesh.shape["model"] == 0 else None,
    None,
  )
  return {"length": P(), "layers": {i: {"k": kv, "v": kv} for i in cache["layers"]}}


def shard_cache(cache: dict, cfg: ModelConfig, mesh: Mesh) -> dict:
  return jax.device_put(cache, named(mesh, cache_specs(cache, cfg, mesh)))


def init_sharded_cache(cfg: ModelConfig, batch: int, max_len: int, mesh: Mesh, dtype=None) -> dict:
  """`wina_jax.model.init_cache`, created directly in its sharded layout (no full copy on one device)."""
  from wina_jax import model

  kw = {} if dtype is None else {"dtype": dtype}
  abstract = jax.eval_shape(lambda: model.init_cache(cfg, batch, max_len, **kw))
  shardings = named(mesh, cache_specs(abstract, cfg, mesh))
  return jax.jit(lambda: model.init_cache(cfg, batch, max_len, **kw), out_shardings=shardings)()


def batch_spec(x: Any, mesh: Mesh) -> P:
  """Leading (batch) dim over 'data' when it divides, the rest replicated."""
  n = mesh.shape["data"]
  lead = "data" if n > 1 and x.shape and x.shape[0] % n == 0 else None
  return P(lead, *([None] * (len(x.shape) - 1))) if x.shape else P()


def shard_batch(tree: Any, mesh: Mesh) -> Any:
  """Arrays (e.g. tokens [B, T]) with their batch dim over 'data'."""
  return jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, batch_spec(x, mesh))), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Every array of `tree` (e.g. a sparsifier's thresholds) copied to all devices of `mesh`."""
  return jax.device_put(tree, NamedSharding(mesh, P()))

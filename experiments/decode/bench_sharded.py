"""Sharded decode benchmark: tokens/s of dense vs WINA (or TEAL) on 1, 2, 4 devices of one host.

Random-weight bf16 models of real shapes, created directly in their sharded layout (`wina_jax.sharding`
rules, tensor parallel over 'model'). A dense prefill of `prompt_len` tokens, then `decode_tokens` greedy
steps of one jitted step (cache donated); the median step time after warm-up gives tokens/s. Threshold
mode (default) sets each site's threshold to the `sparsity` quantile of the method's scores on the prompt
(TEAL's protocol); top-k mode keeps exactly k per token. Each `--mesh` reuses the first devices.

GPU (2 or 4 H200):
  PYTHONPATH=. python -m experiments.decode.bench_sharded --configs=llama3_8b,phi4_14b \
      --mesh=model:1 --mesh=model:2 --mesh=model:4 --out=runs/bench_sharded.jsonl
CPU smoke test on fake devices:
  XLA_FLAGS=--xla_force_host_platform_device_count=4 PYTHONPATH=. .venv/bin/python -m \
      experiments.decode.bench_sharded --configs=tiny --mesh=model:1 --mesh=model:4 --mesh=data:2,model:2 \
      --prompt_len=16 --decode_tokens=8 --dtype=float32
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from tqdm import tqdm

from experiments import common
from wina_jax import checks, sparsity
from wina_jax import model as M
from wina_jax import sharding as SH
from wina_jax import sites as S
from wina_jax.bench.shapes import SHAPES as DECODE_SHAPES
from wina_jax.config import ModelConfig
from wina_jax.convert.load import expected_shapes
from wina_jax.testing import random_params

SHAPES = {
  "llama3_8b": DECODE_SHAPES["llama3_8b"],
  "phi4_14b": DECODE_SHAPES["phi4_14b"],  # Phi-3 architecture: fused qkv / gate_up, as the real checkpoint
  "tiny": ModelConfig(
    model_type="llama",
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=32,
    max_position_embeddings=128,
  ),
}

CONFIGS = common.check(
  flags.DEFINE_list("configs", ["llama3_8b", "phi4_14b"], f"model shapes from {sorted(SHAPES)}"),
  checks.each(checks.one_of(SHAPES), str, nonempty=True),
)
MESH = flags.DEFINE_multi_string("mesh", ["model:1"], "mesh per run, e.g. --mesh=model:1 --mesh=model:4")
FSDP = flags.DEFINE_bool("fsdp", False, "also shard kernels over the 'data' axis")
METHODS = flags.DEFINE_list("methods", ["dense", "wina"], "dense and/or sparsity methods (teal, wina)")
SPARSITY = common.check(
  flags.DEFINE_float("sparsity", 0.5, "target sparsity of the sparse methods"), checks.fraction()
)
MODE = flags.DEFINE_enum("mode", "threshold", ["threshold", "topk"], "sparsifier mode")
BATCH = common.check(flags.DEFINE_integer("batch", 1, "sequences decoded together"), checks.count())
PROMPT_LEN = common.check(
  flags.DEFINE_integer("prompt_len", 128, "prompt tokens (dense prefill)"), checks.count()
)
DECODE = common.check(
  flags.DEFINE_integer("decode_tokens", 64, "timed decode steps (after 4 warm-up steps)"), checks.count()
)
DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "weights and KV cache dtype")
OUT = common.check(flags.DEFINE_string("out", "", "append one JSON line per result here"), checks.out_path())

WARMUP = 4


def random_sharded_params(cfg: ModelConfig, mesh, fsdp: bool, dtype, seed: int = 0) -> dict:
  """`wina_jax.testing.random_params`, each array created sharded on `mesh` by the sharding rules."""
  shardings = {
    p: jax.sharding.NamedSharding(mesh, SH.spec_for(p, s, cfg, mesh, fsdp))
    for p, s in expected_shapes(cfg).items()
  }
  return random_params(cfg, jax.random.key(seed), dtype, shardings=shardings)


def make_sparsifier(method, params, cfg, prompt):
  """A ScoreSparsifier at --sparsity; threshold mode calibrates on the dense prompt's own scores."""
  if method == "dense":
    return None
  sp = sparsity.make(method, params, cfg, SPARSITY.value, mode="topk")
  if MODE.value == "topk":
    return sp

  @jax.jit
  def thresholds(params, prompt):
    inputs = M.forward(params, prompt, cfg, collect=("inputs",)).aux["inputs"]
    return {
      s: jnp.quantile(sp.score(s, inputs[s].astype(jnp.float32)).reshape(-1), SPARSITY.value) for s in sp.k
    }

  return sparsity.ScoreSparsifier(
    method=sp.method, mode="threshold", thresholds=thresholds(params, prompt), state=sp.state
  )


def bench(cfg_name: str, mesh_spec: str) -> list[dict]:
  cfg, dtype = SHAPES[cfg_name], jnp.dtype(DTYPE.value)
  mesh = SH.make_mesh(mesh_spec)
  params = random_sharded_params(cfg, mesh, FSDP.value, dtype)
  b, t = BATCH.value, PROMPT_LEN.value
  max_len = t + WARMUP + DECODE.value
  rng = np.random.RandomState(0)
  prompt = SH.shard_batch(jnp.asarray(rng.randint(0, cfg.vocab_size, (b, t)), jnp.int32), mesh)

  @jax.jit
  def prefill(params, prompt, cache):
    out = M.forward(params, prompt, cfg, cache=cache)
    return jnp.argmax(out.logits[:, -1:], axis=-1), out.cache

  @functools.partial(jax.jit, donate_argnames="cache")
  def step(params, token, cache, sp):
    out = M.forward(params, token, cfg, S.dense if sp is None else sp, cache=cache)
    return jnp.argmax(out.logits, axis=-1), out.cache

  rows = []
  for method in METHODS.value:
    sp = SH.replicate(make_sparsifier(method, params, cfg, prompt), mesh)
    cache = SH.init_sharded_cache(cfg, b, max_len, mesh, dtype)
    token, cache = prefill(params, prompt, cache)
    times, tokens = [], []
    for i in range(WARMUP + DECODE.value):
      t0 = time.perf_counter()
      token, cache = step(params, token, cache, sp)
      token.block_until_ready()
      if i >= WARMUP:
        times.append(time.perf_counter() - t0)
        tokens.append(np.asarray(token)[:, 0])
    sec = statistics.median(times)
    row = dict(
      config=cfg_name,
      mesh=mesh_spec,
      devices=mesh.size,
      fsdp=FSDP.value,
      method=method,
      sparsity=0.0 if method == "dense" else SPARSITY.value,
      mode=MODE.value,
      batch=b,
      prompt_len=t,
      dtype=DTYPE.value,
      ms_per_token=sec * 1e3,
      tokens_per_s=b / sec,
      token_ids=np.stack(tokens, 1).tolist(),
      device_kind=jax.devices()[0].device_kind,
    )
    tqdm.write(
      f"{cfg_name:10s} {mesh_spec:16s} {method:6s} {sec * 1e3:9.3f} ms/token {b / sec:9.1f} tokens/s"
    )
    rows.append(row)
    del cache
  return rows


def main(_):
  declared = common.setup(DTYPE.value)
  rows = []
  for cfg_name in CONFIGS.value:
    for mesh_spec in tqdm(MESH.value, desc=cfg_name):
      rows += bench(cfg_name, mesh_spec)
  for cfg_name in CONFIGS.value:  # same greedy tokens on every mesh (exact in float32)
    for method in METHODS.value:
      ids = [r["token_ids"] for r in rows if r["config"] == cfg_name and r["method"] == method]
      agree = np.mean([np.mean(np.asarray(i) == np.asarray(ids[0])) for i in ids])
      print(f"{cfg_name} {method}: greedy tokens agree with the first mesh on {agree:.1%}")
  if OUT.value:
    os.makedirs(os.path.dirname(OUT.value) or ".", exist_ok=True)
    with open(OUT.value, "a") as f:
      for r in rows:
        f.write(json.dumps({**r, "declared_numerics": declared}) + "\n")


if __name__ == "__main__":
  app.run(main)

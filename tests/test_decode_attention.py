"""The Pallas decode-attention kernel (interpret mode) against the model's XLA attention path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wina_jax import layers as L
from wina_jax.bench.shapes import SHAPES
from wina_jax.config import RopeScaling
from wina_jax.decode import decode_loop, fuse_projections, prefill
from wina_jax.kernels import decode_attention as DA
from wina_jax.model import attention_block
from wina_jax.testing import random_params

TINY = SHAPES["tiny"]  # qwen2: q/k/v biases, GQA 4 q heads over 2 KV heads
SLOTS = 72  # cache slots: lengths below cross the 64-slot block
LENGTHS = (0, 1, 63, 64, 65, SLOTS - 1)
LLAMA3 = RopeScaling(
  "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
)


def block_inputs(cfg, batch, dtype, seed=0, slots=SLOTS):
  """A normed input [B, 1, d], random q/k/v/o projections {name: (kernel, bias)} and a random full cache."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  d = cfg.hidden_size
  lin = {
    "q_proj": (d, cfg.q_dim),
    "k_proj": (d, cfg.kv_dim),
    "v_proj": (d, cfg.kv_dim),
    "o_proj": (cfg.q_dim, d),
  }
  weights = {
    n: (jax.random.normal(k1, s, dtype) * s[0] ** -0.5, jax.random.normal(k2, (s[1],), dtype))
    for (n, s), k1, k2 in zip(lin.items(), ks[:4], ks[4:])
  }
  x = jax.random.normal(jax.random.PRNGKey(seed + 1), (batch, 1, d), dtype)
  shape = (batch, slots, cfg.num_key_value_heads, cfg.head_dim)
  kv = {
    "k": jax.random.normal(jax.random.PRNGKey(seed + 2), shape, dtype),
    "v": jax.random.normal(jax.random.PRNGKey(seed + 3), shape, dtype),
  }
  return x, weights, kv


def projection(weights):
  """The `attention_block` project callable over `block_inputs`' weights."""
  return lambda name, y: y @ weights[name][0] + weights[name][1]


def compare(cfg, batch, dtype, attention, lengths, slots):
  """`attention_block` one decode step at each cache length: `attention` vs 'xla', output and cache."""
  x, weights, kv = block_inputs(cfg, batch, dtype, slots=slots)
  run = jax.jit(
    lambda w, kv, length, attention: attention_block(
      cfg, x, projection(w), length[None], kv, length + 1, attention
    ),
    static_argnums=3,
  )
  tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16: the XLA path rounds scores and probs (~3e-3)
  for length in lengths:
    n = jnp.int32(length)
    ref, ref_kv = run(weights, kv, n, "xla")
    got, got_kv = run(weights, kv, n, attention)
    assert got.dtype == ref.dtype and got_kv["k"].dtype == dtype
    a, b = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < tol, length
    for name in ("k", "v"):  # the written slot to rounding, every other slot untouched
      np.testing.assert_allclose(
        np.asarray(got_kv[name], np.float32), np.asarray(ref_kv[name], np.float32), rtol=tol, atol=tol
      )
      np.testing.assert_array_equal(
        np.delete(np.asarray(got_kv[name]), length, axis=1), np.delete(np.asarray(kv[name]), length, axis=1)
      )


@pytest.mark.parametrize(
  "batch,kv_heads,dtype,extra",
  [
    (1, 2, jnp.float32, {}),  # GQA
    (2, 4, jnp.float32, {"rope_scaling": LLAMA3, "partial_rotary_factor": 0.5}),  # MHA, scaled partial RoPE
    (8, 1, jnp.float32, {"sliding_window": 20}),  # multi-query, sliding window
    (2, 2, jnp.bfloat16, {}),
  ],
)
def test_kernel_equals_xla_attention_block(batch, kv_heads, dtype, extra):
  """Output and written cache of `attention_block` with the kernel equal the XLA path at every cache length,
  including 0 and both sides of the 64-slot block boundary."""
  compare(TINY.replace(num_key_value_heads=kv_heads, **extra), batch, dtype, "interpret", LENGTHS, SLOTS)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch", [1, 2, 8])
@pytest.mark.parametrize("shape", ["llama3_8b", "qwen25_7b"])
def test_gpu_kernel_equals_xla_attention_block(shape, batch):
  """The compiled Triton kernel on the paper models' attention shapes (GQA 4 and 7), bf16, 512 slots."""
  compare(SHAPES[shape], batch, jnp.bfloat16, "pallas", (0, 1, 63, 64, 300, 511), 512)


def split_vs_whole(cfg, batch, length, slots, interpret):
  """decode_attention with every divisor of G as heads_per_program equals it with one program per KV head
  (the default), output and both written caches; so does it on q|k|v packed as one [B, H + 2K, hd] input (a
  fused projection's output, which then needs no slices), with each split."""
  ks = jax.random.split(jax.random.PRNGKey(length), 5)
  h, kh, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
  q, k, v = (jax.random.normal(key, (batch, n, hd), jnp.bfloat16) for key, n in zip(ks, (h, kh, kh)))
  ck, cv = (jax.random.normal(key, (batch, slots, kh, hd), jnp.bfloat16) for key in ks[3:])
  packed = jnp.concatenate([q, k, v], axis=1)
  run = lambda hp, qkv=(q, k, v): DA.decode_attention(
    *qkv, ck, cv, jnp.int32(length), L.rope_inv_freq(cfg), rotary_dim=cfg.rotary_dim,
    heads_per_program=hp, interpret=interpret,
  )  # fmt: skip
  group = h // kh
  ref = run(None)
  for hp in [d for d in range(1, group) if group % d == 0] + [None]:
    for qkv in ((q, k, v), (packed, None, None)):
      for got, want in zip(run(hp, qkv), ref):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  with pytest.raises(ValueError, match="must divide"):
    run(group + 1)
  with pytest.raises(ValueError, match="give both k and v"):
    run(None, (q, k, None))


def test_heads_per_program_split_is_exact():
  """Splitting a KV head's query heads over programs changes no bit (interpret mode; G = 4)."""
  split_vs_whole(TINY.replace(num_attention_heads=8), 2, 65, SLOTS, True)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", ["llama3_8b", "qwen25_7b"])
def test_gpu_heads_per_program_split_is_exact(shape):
  """The same on the compiled kernel, the paper models' shapes (G = 4 and 7), 512 slots."""
  split_vs_whole(SHAPES[shape], 2, 300, 512, False)


@pytest.mark.parametrize("fused", [False, True])
def test_decode_loop_with_kernel_same_tokens_and_cache(fused, monkeypatch):
  """A tiny random model decoding 6 teacher-forced steps: same greedy tokens, logits and cache as 'xla'; with
  fused projections the kernel reads q|k|v packed (`decode_attention(qkv, None, None, ...)`)."""
  params, cfg = random_params(TINY, 0, jnp.float32), TINY
  if fused:
    params, cfg = fuse_projections(params, cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 11), 0, cfg.vocab_size)
  packed, real = [], DA.decode_attention
  monkeypatch.setattr(
    DA, "decode_attention", lambda q, k, *a, **kw: packed.append(k is None) or real(q, k, *a, **kw)
  )
  out = {}
  for attention in ("xla", "interpret"):
    _, _, cache = prefill(params, tokens[:, :5], cfg=cfg, max_len=16)
    out[attention] = decode_loop(params, tokens[:, 5:], cache, cfg=cfg, attention=attention)
  assert packed and set(packed) == {fused}
  (nxt, logits, cache), (nxt_x, logits_x, cache_x) = out["interpret"], out["xla"]
  np.testing.assert_array_equal(nxt, nxt_x)
  np.testing.assert_allclose(logits, logits_x, rtol=1e-5, atol=1e-5)
  assert int(cache["length"]) == int(cache_x["length"]) == 11
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), cache, cache_x)


def test_unsupported_shapes_are_refused_or_fall_back():
  """The kernel refuses batch > 8 with a clear error; `attention_block` runs those on XLA instead."""
  cfg = TINY
  x, weights, kv = block_inputs(cfg, DA.MAX_BATCH + 1, jnp.float32)
  project = projection(weights)
  with pytest.raises(ValueError, match="use the XLA attention"):
    DA.decode_attention(
      jnp.zeros((9, 4, 32)),
      jnp.zeros((9, 2, 32)),
      jnp.zeros((9, 2, 32)),
      kv["k"],
      kv["v"],
      jnp.int32(3),
      jnp.ones((16,)),
      rotary_dim=32,
      interpret=True,
    )
  got = attention_block(cfg, x, project, jnp.int32(3)[None], kv, 4, "interpret")[0]
  ref = attention_block(cfg, x, project, jnp.int32(3)[None], kv, 4, "xla")[0]
  np.testing.assert_array_equal(got, ref)
  with pytest.raises(ValueError, match="not one of"):
    attention_block(cfg, x, project, jnp.int32(3)[None], kv, 4, "cuda")


def test_attention_sweep_tiny_times_xla_and_each_split(tmp_path):
  """The attention benchmark's CPU smoke run writes an XLA row and one row per heads_per_program."""
  import json
  import subprocess
  import sys

  out = tmp_path / "sweep.json"
  subprocess.run(
    [sys.executable, "-m", "experiments.decode.attention_sweep", "--tiny", f"--out={out}"],
    check=True,
    capture_output=True,
    timeout=300,
  )
  res = json.loads(out.read_text())
  assert [(r["impl"], r["heads_per_program"]) for r in res["rows"]] == [
    ("xla", None),
    ("pallas", 1),
    ("pallas", 2),
  ]
  assert all(r["us_per_layer"] > 0 for r in res["rows"])
  assert list(res["best"]) == ["tiny/B1/len3"]

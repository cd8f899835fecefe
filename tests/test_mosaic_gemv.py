"""The Mosaic GPU GEMV (`wina_jax.kernels.mosaic_gemv`): on the CPU, the wrapper's compaction and contract
(through `partials_reference`) against the XLA masked linear, both kernels' lowering for CUDA, and bad input;
on a Hopper GPU, the kernels themselves against XLA at float32 tolerance (bf16 products are exact in their
float32 sums; only the order of the sums differs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wina_jax.kernels import mosaic_gemv as mg
from wina_jax.kernels.reference import masked_linear_xla

GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not GPU, reason="Mosaic GPU kernels run on a Hopper GPU only")
SMALL = mg.MosaicConfig(64, 64, 2, splits=2, programs=4)


def case(m, k, segs, seed=0, wina=True):
  key = jax.random.PRNGKey(seed)
  x = jax.random.normal(key, (m, k), jnp.bfloat16)
  w = jax.random.normal(jax.random.fold_in(key, 1), (k, sum(segs)), jnp.bfloat16)
  t = jnp.linspace(0.3, 1.2, len(segs)).astype(jnp.float32)
  sc = jax.random.uniform(jax.random.fold_in(key, 2), (len(segs), k)) + 0.5 if wina else None
  return x, w, t, sc


def close(got, ref, tol=1e-5):
  got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
  assert np.linalg.norm(got - ref) <= tol * np.linalg.norm(ref), np.abs(got - ref).max()


@pytest.mark.parametrize("m,segs,wina", [(1, (128,), False), (3, (128, 64, 64), True), (8, (64, 192), True)])
def test_compaction_and_contract_match_xla(m, segs, wina):
  """Kept rows compacted per segment and split, each batch row multiplying only its own kept inputs: the
  jnp contract of the kernel gives the XLA masked linear, bit for bit in bf16 output."""
  x, w, t, sc = case(m, 512, segs, wina=wina)
  got = mg.masked_linear_mosaic(x, w, t, sc, segs, SMALL, impl=mg.partials_reference)
  np.testing.assert_array_equal(
    np.asarray(got, np.float32), np.asarray(masked_linear_xla(x, w, t, sc, segs), np.float32)
  )


def test_compact_layout():
  """ids hold each split's kept rows in order, then the split's first row; x is zero past the count."""
  x = jnp.arange(1, 9, dtype=jnp.float32)[None]  # [1, 8]
  keep = jnp.array([[[1, 0, 1, 1, 0, 0, 0, 1]]], bool)
  xk, ids, counts = mg.compact(x, keep, splits=2)
  np.testing.assert_array_equal(counts, [[3, 1]])
  np.testing.assert_array_equal(ids, [[[0, 2, 3, 0], [7, 4, 4, 4]]])
  np.testing.assert_array_equal(np.asarray(xk[0, :, 0], np.float32), [[1, 3, 4, 0], [8, 0, 0, 0]])
  assert xk.shape == (1, 2, mg.ROWS, 4) and not np.any(np.asarray(xk[:, :, 1:], np.float32))


@pytest.mark.parametrize(
  "k,gather", [(1024, "tma"), (256, "tma"), (1024, "cp_async")]
)  # 256: 2 tiles < 3 stages
def test_kernels_lower_for_cuda(k, gather):
  """Both kernels trace and lower to Mosaic GPU (layouts inferred, transforms accepted) on the CPU."""
  segs = (256, 128)
  cfg = mg.MosaicConfig(64, 64, 3, splits=2, programs=8, gather=gather)
  xk = jnp.zeros((2, 2, mg.ROWS, k // 2), jnp.bfloat16)
  ids, counts = jnp.zeros((2, 2, k // 2), jnp.int32), jnp.zeros((2, 2), jnp.int32)
  w = jnp.zeros((k, sum(segs)), jnp.bfloat16)
  rows = jax.jit(lambda *a: mg.rows_partials(*a, cfg=cfg, segments=segs))
  assert "mosaic_gpu" in rows.trace(xk, ids, counts, w).lower(lowering_platforms=("cuda",)).as_text()
  dense = jax.jit(lambda x, w: mg.dense_partials(x, w, mg.MosaicConfig(128, 128, 2, programs=8)))
  text = dense.trace(jnp.zeros((mg.ROWS, k), jnp.bfloat16), w).lower(lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text


def test_resolved_splits_fill_the_grid():
  """Automatic splits: the fewest (a power of two) with blocks x splits >= programs, in whole blocks."""
  assert mg.resolved(mg.MosaicConfig(programs=132), 14336, 4096).splits == 4  # 64 blocks
  assert mg.resolved(mg.MosaicConfig(programs=132), 4096, 28672).splits == 1  # 448 blocks
  with pytest.raises(ValueError, match="does not split"):
    mg.resolved(mg.MosaicConfig(splits=3, programs=8), 1024, 128)


@pytest.mark.parametrize(
  "kwargs,match",
  [
    (dict(block_k=32), "multiples of 64"),
    (dict(block_n=512), "over wgmma's 256"),
    (dict(block_k=96), "power of two"),
    (dict(stages=0), "stages=0"),
    (dict(gather="ldg"), "gather='ldg'"),
  ],
)
def test_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    mg.MosaicConfig(**kwargs)


def test_input_errors():
  x, w, t, _ = case(9, 512, (128,))
  with pytest.raises(ValueError, match=r"9 rows \(at most 8\)"):
    mg.masked_linear_mosaic(x, w, t, None, (128,), SMALL)
  x, w, t, _ = case(1, 512, (128,))
  with pytest.raises(ValueError, match="bfloat16 only"):
    mg.masked_linear_mosaic(x.astype(jnp.float32), w, t, None, (128,), SMALL)
  with pytest.raises(ValueError, match="mosaic config"):
    mg.parse("64:64")


@needs_gpu
@pytest.mark.parametrize("m,segs,wina", [(1, (1024, 256, 256), False), (3, (512, 512), True)])
@pytest.mark.parametrize(
  "spec", ["64:64:2:0:0:tma", "64:64:4:2:0:tma", "128:64:3:0:264:tma", "64:64:4", "128:64:2:2:264"]
)
def test_gpu_rows_kernel_matches_xla(m, segs, wina, spec):
  x, w, t, sc = case(m, 2048, segs, wina=wina)
  cfg = mg.parse(spec)
  got = jax.jit(lambda x, w, t, sc: mg.masked_linear_mosaic(x, w, t, sc, segs, cfg))(x, w, t, sc)
  ref = mg.masked_linear_mosaic(x, w, t, sc, segs, cfg, impl=mg.partials_reference)
  close(got, ref, 1e-2)  # both rounded to bf16 once
  parts = jax.jit(lambda *a: mg.rows_partials(*a, cfg=mg.resolved(cfg, *w.shape), segments=segs))
  keep = jnp.abs(x.astype(jnp.float32))[None] * (1.0 if sc is None else sc[:, None]) > t[:, None, None]
  args = mg.compact(x, jnp.broadcast_to(keep, (len(segs), *x.shape)), mg.resolved(cfg, *w.shape).splits)
  close(parts(*args, w), mg.partials_reference(*args, w, cfg, segs))


@needs_gpu
@pytest.mark.parametrize("spec", ["64:64:4", "128:128:2", "64:128:8:2:264"])
def test_gpu_dense_kernel_matches_xla(spec):
  x, w, _, _ = case(8, 2048, (1024,))
  got = jnp.sum(jax.jit(lambda x, w: mg.dense_partials(x, w, mg.parse(spec)))(x, w), 0).T
  close(got, jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest"))


def test_masked_linear_backend_mosaic():
  """backend 'mosaic' through `masked_linear` (the jnp contract off the GPU) equals the XLA path; float32
  input and more than 8 rows fall back to the other kernels, with the same result."""
  from wina_jax.kernels import masked_linear

  x, w, t, sc = case(2, 512, (128, 64, 64))
  ref = masked_linear(x, w, t, sc, (128, 64, 64), backend="xla")
  close(masked_linear(x, w, t, sc, (128, 64, 64), backend="mosaic", config=SMALL), ref, 1e-2)
  for m, dtype in [(2, jnp.float32), (9, jnp.bfloat16)]:
    x, w, t, sc = case(m, 512, (128, 64, 64))
    x, w = x.astype(dtype), w.astype(dtype)
    close(
      masked_linear(x, w, t, sc, (128, 64, 64), backend="mosaic"),
      masked_linear_xla(x, w, t, sc, (128, 64, 64)),
    )

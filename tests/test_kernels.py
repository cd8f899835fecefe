"""The fused threshold linear: Pallas kernel (interpret mode on CPU) vs the XLA path vs numpy masked dense."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wina_jax.kernels import FusedThresholdSparsifier, KernelConfig, masked_linear, masked_linear_xla
from wina_jax.kernels import config as C


def masked_ref(x, w, thresholds, scales, segments):
  """float64 numpy: per segment, (x * (|x| * scale > t)) @ w[:, seg]."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  outs, start = [], 0
  for s, width in enumerate(segments):
    score = np.abs(x) * (1.0 if scales is None else np.asarray(scales[s], np.float64))
    outs.append(np.where(score > thresholds[s], x, 0.0) @ w[:, start : start + width])
    start += width
  return np.concatenate(outs, axis=-1)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize(
  "mode,reduce,rows,segments,wina,loop",
  [
    ("compact", "partials", 1, (96,), False, "dynamic"),
    ("compact", "atomic", 3, (64, 32, 32), True, "dynamic"),
    ("masked", "atomic", 1, (64, 32, 32), False, "dynamic"),
    ("masked", "partials", 5, (96,), True, "dynamic"),
    ("compact", "semaphore", 1, (64, 32, 32), True, "dynamic"),
    ("masked", "semaphore", 3, (96,), False, "dynamic"),
    ("compact", "semaphore", 2, (96,), False, "prefetch"),
    ("compact", "atomic", 1, (64, 32, 32), True, "prefetch"),
    ("compact", "partials", 3, (96,), False, "prefetch"),
    ("balanced", "partials", 1, (96,), True, "dynamic"),
    ("balanced", "atomic", 3, (64, 32, 32), False, "prefetch"),
    ("balanced", "semaphore", 1, (64, 32, 32), True, "prefetch"),
    ("indexed", "partials", 1, (64, 32, 32), True, "dynamic"),
    ("indexed", "atomic", 3, (96,), False, "prefetch"),
    ("indexed", "semaphore", 2, (64, 32, 32), False, "dynamic"),
  ],
)
def test_interpret_kernel_matches_xla_and_masked_dense(mode, reduce, rows, segments, wina, loop):
  k, n = 256, sum(segments)
  keys = jax.random.split(jax.random.PRNGKey(rows), 4)
  x = jax.random.normal(keys[0], (rows, k), jnp.bfloat16)
  w = jax.random.normal(keys[1], (k, n), jnp.bfloat16)
  scales = jax.random.uniform(keys[2], (len(segments), k), minval=0.5, maxval=2.0) if wina else None
  t = jnp.asarray([0.6, 0.9, 1.2][: len(segments)])
  cfg = KernelConfig(mode=mode, chunk=64, block_k=16, block_n=32, reduce=reduce, loop=loop)
  workspace = jnp.zeros((2, n // 32), jnp.int32) if reduce == "semaphore" else None
  got = masked_linear(x, w, t, scales, segments, backend="interpret", config=cfg, workspace=workspace, slot=1)
  xla = masked_linear(x, w, t, scales, segments, backend="xla")
  ref = masked_ref(x, w, np.asarray(t), None if scales is None else np.asarray(scales), segments)
  assert got.shape == (rows, n) and got.dtype == jnp.bfloat16
  assert rel_err(got, ref) < 4e-3  # bf16 output rounding
  assert rel_err(got, xla) < 4e-3
  frac = np.mean(np.abs(np.asarray(x, np.float32)) > 0.9)
  assert 0.2 < frac < 0.6  # the thresholds really drop rows


@pytest.mark.parametrize(
  "mode,rows,loop,dense_at",
  [
    ("compact", 1, "dynamic", 2.0),
    ("compact", 3, "prefetch", 0.875),
    ("compact", 1, "dynamic", 0.1),  # the dense fallback's tiles
    ("masked", 1, "dynamic", 0.875),
    ("masked", 2, "dynamic", 0.875),
    ("balanced", 1, "prefetch", 0.875),
    ("indexed", 2, "dynamic", 0.875),
  ],
)
def test_tile_accumulator_equals_vector_accumulator(mode, rows, loop, dense_at):
  """acc='tile' ([BK, BN] float32 accumulator, one reduction over rows per program) gives the 'vector'
  accumulator's result and the masked product to float32 rounding, in every mode, float32 in and out."""
  k, segments = 256, (64, 32, 32)
  keys = jax.random.split(jax.random.PRNGKey(11 + rows), 3)
  x = jax.random.normal(keys[0], (rows, k), jnp.float32)
  w = jax.random.normal(keys[1], (k, sum(segments)), jnp.float32)
  scales = jax.random.uniform(keys[2], (3, k), minval=0.5, maxval=2.0)
  t = jnp.asarray([0.6, 0.9, 1.2])
  out = {}
  for acc in ("vector", "tile"):
    cfg = KernelConfig(mode=mode, chunk=64, block_k=16, block_n=32, loop=loop, dense_at=dense_at, acc=acc)
    out[acc] = masked_linear(x, w, t, scales, segments, backend="interpret", config=cfg)
  ref = masked_ref(x, w, np.asarray(t), np.asarray(scales), segments)
  assert out["tile"].shape == (rows, sum(segments)) and out["tile"].dtype == jnp.float32
  assert rel_err(out["tile"], out["vector"]) < 1e-6 and rel_err(out["tile"], ref) < 1e-5


@pytest.mark.parametrize("loop", ["dynamic", "prefetch"])
@pytest.mark.parametrize("rows", [1, 3])
def test_dense_fallback_chunks_equal_masked_dense(loop, rows):
  """Chunks that keep at least dense_at of their rows walk contiguous unmasked tiles (zeros for dropped
  rows), the others compact: mixed in one call (the union over rows keeps all of chunk 0, 58 / 64 of chunk 1,
  half of chunk 2, none of chunk 3; rows > 0 drop more), every dense_at gives the masked product."""
  k, segments = 256, (64, 32)
  keys = jax.random.split(jax.random.PRNGKey(7 + rows), 2)
  z = jnp.abs(jax.random.normal(keys[0], (rows, k), jnp.float32))
  i = jnp.arange(k)
  chunk, r = i // 64, i % 64
  union = (chunk == 0) | ((chunk == 1) & (r < 58)) | ((chunk == 2) & (r % 2 == 0))
  keep = union & ((jnp.arange(rows)[:, None] == 0) | ((i + jnp.arange(rows)[:, None]) % 5 != 0))
  sign = jnp.where(jax.random.bernoulli(keys[1], 0.5, (rows, k)), 1.0, -1.0)
  x = (sign * jnp.where(keep, 0.9 + z, 0.4 * z / (1 + z))).astype(jnp.bfloat16)  # kept > 0.8 > 0.4 > dropped
  w = jax.random.normal(keys[1], (k, sum(segments)), jnp.bfloat16)
  t = jnp.asarray([0.5, 0.8])
  ref = masked_ref(x, w, np.asarray(t), None, segments)
  assert np.array_equal(np.abs(np.asarray(x, np.float32)) > 0.5, np.asarray(keep))
  for dense_at in (0.1, 0.6, 0.875, 1.0, 2.0):
    cfg = KernelConfig(mode="compact", chunk=64, block_k=16, block_n=32, loop=loop, dense_at=dense_at)
    got = masked_linear(x, w, t, None, segments, backend="interpret", config=cfg)
    assert rel_err(got, ref) < 4e-3, dense_at
  with pytest.raises(ValueError, match="dense_at"):
    KernelConfig(dense_at=0.0)


@pytest.mark.parametrize(
  "mode,rows,dtype,wina,dense_at",
  [
    ("compact", 1, jnp.float32, False, 0.875),
    ("compact", 3, jnp.bfloat16, True, 2.0),
    ("masked", 2, jnp.bfloat16, False, 0.875),
    ("compact", 1, jnp.bfloat16, True, 0.1),  # the dense fallback with the prologue
    ("balanced", 1, jnp.bfloat16, True, 0.875),  # 192 rows: the scan's one 256-row step is masked
    ("balanced", 2, jnp.float32, False, 0.875),
  ],
)
def test_rms_norm_prologue_equals_norm_then_kernel(mode, rows, dtype, wina, dense_at):
  """norm=(gain, eps): the kernel normalises the raw residual in its prologue and equals rms_norm first, then
  the masked product (same masks: thresholds on the normalised input), on both sides of a 64-row chunk."""
  from wina_jax.layers import rms_norm

  k, segments = 192, (64, 32)
  keys = jax.random.split(jax.random.PRNGKey(rows), 4)
  h = (3.0 * jax.random.normal(keys[0], (rows, k), jnp.float32) + 1.0).astype(dtype)  # not normalised
  gain = jax.random.uniform(keys[1], (k,), minval=0.5, maxval=1.5).astype(dtype)
  w = jax.random.normal(keys[2], (k, sum(segments)), dtype)
  scales = jax.random.uniform(keys[3], (2, k), minval=0.5, maxval=2.0) if wina else None
  t = jnp.asarray([0.6, 0.9])
  cfg = KernelConfig(mode=mode, chunk=64, block_k=16, block_n=32, dense_at=dense_at)
  got = masked_linear(h, w, t, scales, segments, backend="interpret", config=cfg, norm=(gain, 1e-5))
  x = rms_norm(h, gain, 1e-5)
  ref = masked_linear(x, w, t, scales, segments, backend="interpret", config=cfg)
  xla = masked_linear(h, w, t, scales, segments, backend="xla", norm=(gain, 1e-5))
  assert got.shape == (rows, sum(segments)) and got.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  assert rel_err(got, ref) < tol and rel_err(xla, masked_ref(x, w, np.asarray(t), scales, segments)) < 4e-3
  assert rel_err(got, xla) < tol
  frac = np.mean(np.abs(np.asarray(x, np.float32)) > 0.6)
  assert 0.2 < frac < 0.8  # the thresholds drop rows of the normalised input
  with pytest.raises(ValueError, match="norm_scale must be"):
    from wina_jax.kernels.pallas_gemv import sparse_gemv

    sparse_gemv(h, w, t, None, segments, cfg, interpret=True, norm_scale=gain[:-1], norm_eps=1e-5)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.9, 1.0])
def test_balanced_shares_over_scan_steps(monkeypatch, sparsity):
  """'balanced' mode over a scan of several 64-row steps (the last one masked): each program along K takes
  its share of the input's kept rows, from all of them (0 %) to none (100 %: a zero output)."""
  from wina_jax.kernels import pallas_gemv

  monkeypatch.setattr(pallas_gemv, "SCAN_ROWS", 64)
  k, segments = 224, (64, 32)  # 224 = 3.5 scan steps of 64; programs of 32 rows along K
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  x = jax.random.normal(keys[0], (1, k), jnp.float32)
  w = jax.random.normal(keys[1], (k, sum(segments)), jnp.float32)
  q = float(np.quantile(np.abs(np.asarray(x)), sparsity)) if sparsity else -1.0
  t = jnp.asarray([q, q + 1e-6 if sparsity < 1 else q])
  cfg = KernelConfig(mode="balanced", chunk=32, block_k=8, block_n=32, reduce="semaphore")
  got = pallas_gemv.sparse_gemv(
    x, w, t, None, segments, cfg, interpret=True, workspace=jnp.zeros((1, 4), jnp.int32)
  )
  ref = masked_ref(x, w, np.asarray(t), None, segments)
  if sparsity == 1.0:
    np.testing.assert_array_equal(np.asarray(got), 0.0)
  else:
    assert rel_err(got, ref) < 1e-5


def test_kept_rows_lists_each_segments_kept_inputs_in_order():
  """'indexed' mode's compaction: per segment, the rows any batch row keeps, in order, then zeros."""
  from wina_jax.kernels.pallas_gemv import kept_rows

  x = jnp.asarray([[0.1, -2.0, 0.5, 3.0, -0.2], [0.0, 0.0, -0.9, 0.1, 0.0]], jnp.float32)
  scales = jnp.asarray([[1.0] * 5, [1.0, 0.1, 1.0, 1.0, 10.0]])
  ids, counts = kept_rows(x, jnp.asarray([0.45, 0.45]), scales, 2)
  np.testing.assert_array_equal(np.asarray(counts), [3, 3])
  np.testing.assert_array_equal(np.asarray(ids), [[1, 2, 3, 0, 0], [2, 3, 4, 0, 0]])  # 0.2 < 0.45 < 2.0
  ids, counts = kept_rows(x, jnp.asarray([0.45, 2.5]), None, 2)  # TEAL: |x| for every segment
  np.testing.assert_array_equal(np.asarray(counts), [3, 1])
  np.testing.assert_array_equal(np.asarray(ids[1]), [3, 0, 0, 0, 0])
  with pytest.raises(ValueError, match="no RMSNorm prologue"):
    masked_linear(
      x,
      jnp.ones((5, 32)),
      0.3,
      backend="interpret",
      config=KernelConfig(mode="indexed", chunk=1, block_k=1, block_n=32),
      norm=(jnp.ones(5), 1e-5),
    )


def test_semaphore_reduce_workspace_and_fallback():
  """The semaphore kernel writes x.dtype itself, sums the partials (here bitwise equal to the 'partials'
  reduce), leaves its workspace zeroed, runs 'partials' without one and rejects a small one."""
  k, n = 256, 128
  x = jax.random.normal(jax.random.PRNGKey(0), (1, k), jnp.bfloat16)
  w = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.bfloat16)
  cfg = KernelConfig(mode="compact", chunk=64, block_k=16, block_n=32, reduce="semaphore")
  workspace = jnp.zeros((1, 4), jnp.int32)
  run = jax.jit(lambda x, ws: masked_linear(x, w, 0.8, None, backend="interpret", config=cfg, workspace=ws))
  got = run(x, workspace)
  partials = masked_linear(x, w, 0.8, backend="interpret", config=cfg)  # no workspace
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(partials, np.float32))
  np.testing.assert_array_equal(np.asarray(workspace), 0)
  with pytest.raises(ValueError, match="column blocks"):
    masked_linear(x, w, 0.8, backend="interpret", config=cfg, workspace=jnp.zeros((1, 2), jnp.int32))


def test_sparsifier_semaphore_workspace():
  """A semaphore config gives the sparsifier one zeroed workspace row per site; results match XLA."""
  k, n = 128, 64
  w = {s: jax.random.normal(jax.random.PRNGKey(i), (k, n), jnp.bfloat16) for i, s in enumerate(("a", "b"))}
  x = jax.random.normal(jax.random.PRNGKey(5), (1, k), jnp.bfloat16)
  cfg = KernelConfig(mode="masked", chunk=32, block_k=16, block_n=32, reduce="semaphore")
  sp = FusedThresholdSparsifier.create({"a": 0.5, "b": 0.9}, backend="interpret", configs={(k, n): cfg})
  assert sp.workspace.shape == (2, C.WORKSPACE_BLOCKS) and sp.workspace.dtype == jnp.int32
  assert FusedThresholdSparsifier.create({"a": 0.5}).workspace is None
  for site in ("a", "b"):
    got = sp.linear(site, x, w[site])
    ref = sp.replace(backend="xla").linear(site, x, w[site])
    assert rel_err(got, ref) < 4e-3


def test_parse_kernel_config_specs():
  assert C.parse("compact:256:32:256:4:3:partials:prefetch") == KernelConfig(
    "compact", 256, 32, 256, 4, 3, "partials", "prefetch"
  )
  assert C.parse("indexed:128:16:64") == KernelConfig("indexed", 128, 16, 64)
  assert C.parse("masked:256:32:256:4:3:partials:dynamic:0.875:tile").acc == "tile"
  assert C.parse("compact:64:16:32:4:2:atomic:dynamic:0.5").dense_at == 0.5
  with pytest.raises(ValueError, match="the first four at least"):
    C.parse("compact:64:16")
  with pytest.raises(ValueError, match="compact:x"):
    C.parse("compact:x:16:32")
  with pytest.raises(ValueError, match="mode 'dense'"):
    C.parse("dense:64:16:32")


def test_xla_path_for_many_rows_and_untileable_shapes():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 48), jnp.float32)  # 14 rows > MAX_ROWS
  w = jax.random.normal(jax.random.PRNGKey(1), (48, 40), jnp.float32)
  scales = jnp.linspace(0.5, 1.5, 48)
  for backend in ("auto", "interpret"):
    got = masked_linear(x, w, 0.7, scales, backend=backend)
    ref = masked_ref(np.asarray(x), np.asarray(w), [0.7], [np.asarray(scales)], (40,))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  assert C.resolve(KernelConfig(), 48, (40,)) is None  # no tiling fits: XLA path
  assert masked_linear(x[0, :1], w, 0.7, scales, backend="interpret").shape == (1, 40)


@pytest.mark.parametrize("lead", [(1,), (2, 3), (2, 9)])  # few rows: one stacked matmul; 18 rows: slices
def test_xla_path_segments_equal_masked_dense(lead):
  segments = (40, 16, 8)
  keys = jax.random.split(jax.random.PRNGKey(len(lead)), 3)
  x = jax.random.normal(keys[0], (*lead, 48), jnp.float32)
  w = jax.random.normal(keys[1], (48, sum(segments)), jnp.float32)
  scales = jax.random.uniform(keys[2], (3, 48), minval=0.5, maxval=2.0)
  t = jnp.asarray([0.3, 0.8, 1.1])
  got = masked_linear_xla(x, w, t, scales, segments)
  ref = masked_ref(np.asarray(x).reshape(-1, 48), np.asarray(w), np.asarray(t), np.asarray(scales), segments)
  np.testing.assert_allclose(np.asarray(got).reshape(-1, sum(segments)), ref, rtol=1e-5, atol=1e-5)


def test_auto_backend_takes_the_kernel_for_batch_one_only(monkeypatch):
  from wina_jax.kernels.masked_linear import pick_backend

  assert [pick_backend("auto", r) for r in (1, 2)] == ["xla", "xla"]  # CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert [pick_backend("auto", r) for r in (1, 2, 8)] == ["pallas", "xla", "xla"]  # the H200 crossover
  assert pick_backend("pallas", 8) == "pallas" and pick_backend("interpret", 8) == "interpret"


def test_resolve_shrinks_tiles_to_fit():
  cfg = C.resolve(KernelConfig(chunk=512, block_k=32, block_n=256), 3584, (3584, 512, 512))
  assert cfg.chunk == 512 and cfg.block_n == 256
  cfg = C.resolve(KernelConfig(chunk=512, block_k=32, block_n=256), 576, (192, 64, 64))
  assert (cfg.chunk, cfg.block_n) == (64, 64) and C.fits(cfg, 576, (192, 64, 64))
  with pytest.raises(ValueError, match="power of two"):
    KernelConfig(block_n=96)
  with pytest.raises(ValueError, match="loop"):
    KernelConfig(loop="unrolled")
  with pytest.raises(ValueError, match="acc 'rows' is not one of"):
    KernelConfig(acc="rows")


def _lowered_for_cuda(cfg: KernelConfig) -> str:
  """The per-site kernel on a [1, 1024] x [1024, 1024] site, lowered for CUDA (on any machine), as text."""
  x = jax.ShapeDtypeStruct((1, 1024), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((1024, 1024), jnp.bfloat16)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  f = jax.jit(lambda x, w, t: masked_linear(x, w, t, None, (1024,), backend="pallas", config=cfg))
  return f.trace(x, w, t).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize(
  "mode,loop,acc",
  [
    ("compact", "dynamic", "tile"),
    ("compact", "prefetch", "tile"),
    ("masked", "dynamic", "tile"),
    ("compact", "dynamic", "vector"),
  ],
)
def test_lowers_to_triton(mode, loop, acc):
  """The per-site kernel lowers to the Triton dialect for CUDA without a GPU (cross-platform lowering), with
  either accumulator; Triton's own compilation shows only on the GPU (test_gpu_kernel_matches_xla)."""
  cfg = KernelConfig(mode=mode, chunk=256, block_k=32, block_n=256, loop=loop, acc=acc)
  assert "triton" in _lowered_for_cuda(cfg)


def test_bad_inputs_raise():
  x, w = jnp.ones((1, 8)), jnp.ones((8, 4))
  with pytest.raises(ValueError, match="segments"):
    masked_linear(x, w, 0.0, segments=(3,))
  with pytest.raises(ValueError, match="features"):
    masked_linear(jnp.ones((1, 7)), w, 0.0)
  with pytest.raises(ValueError, match="backend"):
    masked_linear(x, w, 0.0, backend="cuda")


def test_pdl_trigger_lowers_only_when_asked():
  """KernelConfig.pdl_trigger puts griddepcontrol.launch_dependents into the Triton kernel (its 11th spec
  field), and nothing else does; interpret mode (the CPU) runs without it and gives the same sums."""
  assert C.parse("compact:256:32:256:4:3:partials:dynamic:0.875:vector:true").pdl_trigger
  assert not C.parse("compact:256:32:256").pdl_trigger
  base = KernelConfig(mode="compact", chunk=256, block_k=32, block_n=256)
  assert "griddepcontrol" not in _lowered_for_cuda(base)
  assert "griddepcontrol.launch_dependents" in _lowered_for_cuda(dataclasses.replace(base, pdl_trigger=True))
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 512), jnp.bfloat16)
  w = jax.random.normal(jax.random.PRNGKey(1), (512, 256), jnp.bfloat16)
  t = jnp.asarray([0.5])
  plain = masked_linear(x, w, t, None, (256,), backend="interpret", config=base)
  trig = masked_linear(
    x, w, t, None, (256,), backend="interpret", config=dataclasses.replace(base, pdl_trigger=True)
  )
  np.testing.assert_array_equal(np.asarray(plain, np.float32), np.asarray(trig, np.float32))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
def test_gpu_pdl_trigger_same_bits():
  """On the GPU the triggered kernel (Triton compiles the asm) gives the same bits as the plain one, in a chain
  of dependent sites (each input the previous output), where XLA may launch the next kernel early."""
  k = 4096
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  ws = [jax.random.normal(kk, (k, k), jnp.bfloat16) / 64 for kk in keys[:3]]
  x = jax.random.normal(keys[3], (1, k), jnp.bfloat16)
  t = jnp.asarray([0.8])

  def chain(cfg):
    def f(x):
      for w in ws:
        x = masked_linear(x, w, t, None, (k,), backend="pallas", config=cfg).astype(jnp.bfloat16)
      return x

    return np.asarray(jax.jit(f)(x), np.float32)

  for mode in ("compact", "masked"):
    cfg = KernelConfig(mode=mode, chunk=256, block_k=32, block_n=256)
    np.testing.assert_array_equal(chain(cfg), chain(dataclasses.replace(cfg, pdl_trigger=True)))


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows", [1, 2, 8])
@pytest.mark.parametrize("mode", ["compact", "masked", "balanced", "indexed"])
def test_gpu_kernel_matches_xla(mode, rows):
  k, segments = 4096, (4096, 1024, 1024)
  keys = jax.random.split(jax.random.PRNGKey(rows), 3)
  x = jax.random.normal(keys[0], (rows, k), jnp.bfloat16)
  w = jax.random.normal(keys[1], (k, sum(segments)), jnp.bfloat16)
  scales = jax.random.uniform(keys[2], (3, k), minval=0.5, maxval=2.0)
  t = jnp.asarray([0.5, 0.7, 1.0])
  workspace = jnp.zeros((1, sum(segments) // 256), jnp.int32)
  ref = masked_linear_xla(x, w, t, scales, segments)
  for reduce, loop, dense_at, acc in (
    ("partials", "dynamic", 2.0, "vector"),
    ("partials", "dynamic", 2.0, "tile"),
    ("atomic", "prefetch", 0.25, "tile"),  # the dense fallback on most chunks
    ("semaphore", "dynamic", 0.5, "vector"),  # dense and compacted chunks mixed
  ):
    cfg = KernelConfig(
      mode=mode, chunk=256, block_k=32, block_n=256, reduce=reduce, loop=loop, dense_at=dense_at, acc=acc
    )
    got = masked_linear(x, w, t, scales, segments, backend="pallas", config=cfg, workspace=workspace)
    assert rel_err(got, ref) < 1e-2
  from wina_jax.layers import rms_norm

  gain = jax.random.uniform(keys[2], (k,), minval=0.5, maxval=1.5).astype(jnp.bfloat16)
  h = 4.0 * x  # a residual the prologue normalises
  ref_n = masked_linear_xla(rms_norm(h, gain, 1e-5), w, t, scales, segments)
  for dense_at in (2.0, 0.25) if mode != "indexed" else ():  # 'indexed' takes no prologue
    cfg_n = KernelConfig(mode=mode, chunk=256, block_k=32, block_n=256, reduce="semaphore", dense_at=dense_at)
    got_n = masked_linear(
      h, w, t, scales, segments, backend="pallas", config=cfg_n, workspace=workspace, norm=(gain, 1e-5)
    )
    assert rel_err(got_n, ref_n) < 1e-2
  for _ in range(3):  # the semaphore sum has a fixed order: bitwise repeatable
    again = masked_linear(x, w, t, scales, segments, backend="pallas", config=cfg, workspace=workspace)
    np.testing.assert_array_equal(np.asarray(again, np.float32), np.asarray(got, np.float32))
  np.testing.assert_array_equal(np.asarray(workspace), 0)

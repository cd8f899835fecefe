"""The Mosaic GPU GEMV (`wina_jax.kernels.mosaic_gemv`): on the CPU, the wrapper's compaction and contract
(through `partials_reference`) against the XLA masked linear, both kernels' lowering for CUDA, and bad input;
on a Hopper GPU, the kernels themselves against XLA at float32 tolerance (bf16 products are exact in their
float32 sums; only the order of the sums differs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wina_jax.kernels import mosaic_gemv as mg
from wina_jax.kernels.reference import keep_mask, masked_linear_xla

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
  jnp contract of the kernel gives the XLA masked linear to one bf16 rounding of the output (the float32 sums
  differ only in order, so a sum next to a rounding boundary may land one ulp apart; a wrong row moves
  many outputs by far more)."""
  x, w, t, sc = case(m, 512, segs, wina=wina)
  got = np.asarray(mg.masked_linear_mosaic(x, w, t, sc, segs, SMALL, reference=True), np.float32)
  ref = np.asarray(masked_linear_xla(x, w, t, sc, segs), np.float32)
  ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(ref), 1e-30))) - 7)  # bf16: 8 significant bits
  assert np.all(np.abs(got - ref) <= ulp), np.abs(got - ref).max()
  assert np.mean(got == ref) > 0.99


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


@pytest.mark.parametrize(
  "m,wina,spec,segs",
  [
    (1, False, "64:64:3:2:8", (256, 128)),
    (3, True, "128:64:2:2:6", (256, 128)),
    (8, True, "64:64:8:0:8", (256, 128)),
    (1, True, "64:128:3:0:8", (256, 128)),
    (2, False, "128:256:2:0:4", (256, 512)),
  ],
)
def test_fused_kernel_lowers_for_cuda(m, wina, spec, segs):
  """The in-kernel compaction (`fused_partials`: thresholds, a scan over the warpgroup, kept ids and x^T
  written to swizzled shared memory) builds a module that MLIR verifies, for 1 / 3 / 8 batch rows, TEAL and
  WINA, 64- and 128-row tiles, 64 / 128 / 256 columns, and fewer stages than a split's tiles or more."""
  k = 512
  cfg = mg.parse(spec + ":cp_async:kernel")
  x, w, t, sc = case(m, k, segs, wina=wina)
  f = jax.jit(lambda x, t, sc, w: mg.fused_partials(x, t, sc, w, cfg, segs))
  assert "mosaic_gpu" in f.trace(x, t, sc, w).lower(lowering_platforms=("cuda",)).as_text()


def test_compaction_barriers_are_unaligned(monkeypatch):
  """`compact_split`'s three warpgroup barriers (each may follow a `when` block) are PTX's unaligned
  `barrier.sync`, as the grid wait's are (`mosaic_sync.barrier`: LLVM may copy a barrier into both branches of a
  `when`, and a warp reaching two copies of an aligned one hung the H200 in session 22); the lowered fused
  kernel holds three per compaction it emits, and no other unaligned barrier."""
  from tests.mosaic_hlo import mosaic_modules

  emitted = []
  real = mg.compact_split
  monkeypatch.setattr(mg, "compact_split", lambda *a, **k: emitted.append(1) or real(*a, **k))
  cfg = mg.parse("64:64:2:2:4:cp_async:kernel")
  x, w, t, _ = case(1, 512, (256, 128))
  (text,) = mosaic_modules(
    jax.jit(lambda x, t, w: mg.fused_partials(x, t, None, w, cfg, (256, 128))), x, t, w
  )
  assert emitted and text.count('"barrier.sync $0, 128;"') == 3 * len(emitted)


def test_fused_marks_lower_and_summarise():
  """`fused_partials(marks=True)` lowers with its clock output [programs, items, MARKS], and `clock_phases`
  turns marks into phases: per item, per program and the span across programs, across a wrap of the clock."""
  from wina_jax.bench.timing import clock_phases

  cfg = mg.resolved(mg.parse("64:64:2:1:4:cp_async:kernel"), 512, 384)
  x, w, t, _ = case(1, 512, (256, 128))
  f = jax.jit(lambda x, t, w: mg.fused_partials(x, t, None, w, cfg, (256, 128), marks=True))
  assert jax.eval_shape(f, x, t, w)[1].shape == (4, 2, mg.MARKS)
  assert "mosaic_gpu" in f.trace(x, t, w).lower(lowering_platforms=("cuda",)).as_text()
  np.testing.assert_array_equal(mg.items_per_program(cfg, 384), [2, 2, 1, 1])
  m = np.array(
    [[[1000, 2000, 5000, 6000], [6500, 6500, 9000, 9500]], [[-3000, -2000, 1000, 1500], [0, 0, 0, 0]]]
  )
  got = clock_phases((m + 2**31).astype(np.uint32).view(np.int32), np.array([2, 1]))  # the clock wraps
  assert got["span_us"] == 12.5 and got["program_busy_us"] == 6.5
  assert got["compact"] == {"item_median_us": 1.0, "program_median_us": 1.0, "program_max_us": 1.0}
  assert got["tiles"]["program_max_us"] == 5.5 and got["store"]["program_median_us"] == 1.0
  assert got["next"]["program_max_us"] == 0.5


def test_fused_config_limits():
  """compact='kernel' splits K until a split fits shared memory (<= FUSED_MAX_KP rows) where K divides, and a
  site whose split still does not fit is refused with the figure and the fix."""
  auto = mg.MosaicConfig(programs=132, compact="kernel")
  assert mg.resolved(auto, 4096, 28672).splits == 1
  assert mg.resolved(auto, 16384, 28672).splits == 4  # 448 blocks fill the grid; 16384 rows do not fit
  assert mg.resolved(auto, 18944, 3584).splits == 4  # Qwen's down_proj: 4736 rows, the most it divides
  w = jnp.zeros((16384, 128), jnp.bfloat16)
  why = mg.unsupported(1, jnp.bfloat16, w, (128,), mg.MosaicConfig(splits=1, programs=8, compact="kernel"))
  assert "shared memory" in why and "more splits" in why
  assert mg.unsupported(1, jnp.bfloat16, w, (128,), auto) is None


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
    (dict(compact="host"), "compact='host'"),
    (dict(compact="kernel", gather="tma"), "cp_async only"),
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


ROWS_SPECS = ["64:64:2:0:0:tma", "64:64:4:2:0:tma", "128:64:3:0:264:tma", "64:64:4", "128:64:2:2:264"]
FUSED_SPECS = [
  "64:64:4:0:0:cp_async:kernel",
  "128:64:2:2:264:cp_async:kernel",
  "64:64:3:4:6:cp_async:kernel",
  "64:128:4:0:0:cp_async:kernel",
  "64:256:2:0:8:cp_async:kernel",
  "64:64:2:1:4:cp_async:kernel",
  "64:128:3:2:4:cp_async:kernel",
]


@needs_gpu
@pytest.mark.parametrize("m,segs,wina", [(1, (1024, 256, 256), False), (3, (512, 512), True)])
@pytest.mark.parametrize("spec", ROWS_SPECS + FUSED_SPECS)
def test_gpu_rows_kernel_matches_xla(m, segs, wina, spec):
  """The kept-row kernels (XLA's compaction then `rows_partials`, or `fused_partials`) against their jnp
  contract: the partial sums at float32 tolerance, the output at bf16's. '64:64:3:4:6' gives programs that
  are no multiple of the splits, so a program compacts anew at every work item; '...:1:4' and '...:2:4' give
  each program several items of one segment and split in a row (the next item's copies issued before the
  store) and then a change of segment."""
  x, w, t, sc = case(m, 2048, segs, wina=wina)
  cfg = mg.resolved(mg.parse(spec), *w.shape)
  got = jax.jit(lambda x, w, t, sc: mg.masked_linear_mosaic(x, w, t, sc, segs, cfg))(x, w, t, sc)
  close(got, mg.masked_linear_mosaic(x, w, t, sc, segs, cfg, reference=True), 1e-2)  # both rounded to bf16
  keep = jnp.stack([keep_mask(x, t[g], None if sc is None else sc[g]) for g in range(len(segs))])
  args = mg.compact(x, keep, cfg.splits)
  if cfg.compact == "kernel":
    parts = jax.jit(lambda x, t, sc, w: mg.fused_partials(x, t, sc, w, cfg, segs))(x, t, sc, w)
  else:
    parts = jax.jit(lambda *a: mg.rows_partials(*a, cfg=cfg, segments=segs))(*args, w)
  close(parts, mg.partials_reference(*args, w, cfg, segs))


@needs_gpu
@pytest.mark.parametrize("m", [1, 8])
def test_gpu_fused_kernel_keeps_all_and_none(m):
  """Every row kept in one segment and none in the other (a split whose count is 0: no tile, zero sums)."""
  x, w, _, _ = case(m, 2048, (512, 512))
  t = jnp.array([-1.0, 1e30], jnp.float32)
  cfg = mg.resolved(mg.parse(FUSED_SPECS[0]), *w.shape)
  parts = jax.jit(lambda x, t, w: mg.fused_partials(x, t, None, w, cfg, (512, 512)))(x, t, w)
  want = jnp.dot(x.astype(jnp.float32), w[:, :512].astype(jnp.float32), precision="highest")
  close(jnp.sum(parts, 0)[:512, :m].T, want)
  assert not np.any(np.asarray(parts[:, 512:]))


@needs_gpu
@pytest.mark.parametrize("k,spec", [(1792, "64:64:3:2:0"), (3072, "64:128:2:2:0"), (1792, "64:256:2:1:4")])
@pytest.mark.parametrize("m,wina", [(1, False), (3, True)])
def test_gpu_fused_odd_rows_per_thread(k, spec, m, wina):
  """Splits whose rows per thread (kp / 128: 7, 12, 14) are no power of two, as Llama's down_proj (14336
  rows) gives: the compaction's vector loads shrink to 1, 4 and 2 elements and must still read every row."""
  segs = (256, 256)
  x, w, t, sc = case(m, k, segs, wina=wina)
  cfg = mg.resolved(mg.parse(spec + ":cp_async:kernel"), *w.shape)
  keep = jnp.stack([keep_mask(x, t[g], None if sc is None else sc[g]) for g in range(len(segs))])
  parts = jax.jit(lambda x, t, sc, w: mg.fused_partials(x, t, sc, w, cfg, segs))(x, t, sc, w)
  close(parts, mg.partials_reference(*mg.compact(x, keep, cfg.splits), w, cfg, segs))


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

"""One site with its RMSNorm and residual add in one Mosaic GPU launch (`wina_jax.kernels.mosaic_site`): on the
CPU, its jnp contract against the per-site path, its lowering for CUDA, what it refuses, and how
`masked_linear`, the sparsifier and the model hand it the norm and the residual; on a Hopper GPU, the launch
against its contract."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.mosaic_hlo import mosaic_modules, scratch_operand
from wina_jax.kernels import mosaic_gemv as mg
from wina_jax.kernels import mosaic_phases as mp
from wina_jax.kernels import mosaic_site as msite
from wina_jax.kernels import mosaic_sync as ms
from wina_jax.kernels.grid_sync import new_counter
from wina_jax.kernels.masked_linear import masked_linear
from wina_jax.layers import rms_norm

GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not GPU, reason="Mosaic GPU kernels run on a Hopper GPU only")
SEGS = (256, 128)


def case(m, k=512, segs=SEGS, wina=False, seed=0):
  """Random bf16 x, w (scaled so outputs are O(1)), thresholds keeping about half, WINA scales, a bf16 gain near
  1 and a bf16 residual of the output's shape."""
  key = jax.random.split(jax.random.PRNGKey(seed), 5)
  x = jax.random.normal(key[0], (m, k), jnp.bfloat16)
  w = (jax.random.normal(key[1], (k, sum(segs))) / np.sqrt(k)).astype(jnp.bfloat16)
  t = jnp.linspace(0.5, 0.8, len(segs)).astype(jnp.float32)
  sc = jax.random.uniform(key[2], (len(segs), k)) + 0.5 if wina else None
  gain = (jax.random.uniform(key[3], (k,)) + 0.5).astype(jnp.bfloat16)
  res = jax.random.normal(key[4], (m, sum(segs)), jnp.bfloat16)
  return x, t, sc, w, gain, res


def test_contract_is_the_per_site_path():
  """Without norm or residual the partials are the per-site kernel's contract; the norm is `layers.rms_norm`
  first; the residual add is `mosaic_phases.residual_output` (the sum in split order, bf16, then the add)."""
  x, t, sc, w, gain, res = case(3, wina=True)
  cfg = mg.parse("64:64:2:0:8")
  (parts,) = msite.site_reference(x, t, sc, w, cfg, SEGS)
  per_site = mg.masked_linear_mosaic(x, w, t, sc, SEGS, cfg, reference=True)
  np.testing.assert_array_equal(mg.partials_output(parts, 3, jnp.bfloat16), per_site)
  (normed,) = msite.site_reference(x, t, sc, w, cfg, SEGS, gain=gain, eps=1e-5)
  np.testing.assert_array_equal(normed, msite.site_reference(rms_norm(x, gain, 1e-5), t, sc, w, cfg, SEGS)[0])
  parts, h = msite.site_reference(x, t, sc, w, cfg, SEGS, residual=res)
  np.testing.assert_array_equal(h, mp.residual_output(parts, res))
  np.testing.assert_array_equal(h, res + mg.partials_output(parts, 3, jnp.bfloat16))
  _, y = msite.site_reference(x, t, sc, w, cfg, SEGS, summed=True)
  np.testing.assert_array_equal(y, mg.partials_output(parts, 3, jnp.bfloat16))


@pytest.mark.parametrize(
  "m,wina,norm,adds,summed,counted",
  [
    (1, False, True, False, False, False),
    (3, True, False, True, False, False),
    (2, False, True, True, False, True),
    (1, False, True, False, True, True),
  ],
)
def test_launch_lowers_for_cuda(m, wina, norm, adds, summed, counted):
  """Lowered for CUDA: the outputs, the norm where given (rsqrt and the warp shuffles), one grid-wide wait where
  the output is summed or the residual added (on the counter, which the last program out zeroes, or on Pallas'
  zeroed semaphore)."""
  x, t, sc, w, gain, res = case(m, wina=wina)
  kw = ({"gain": gain, "eps": 1e-5} if norm else {}) | ({"residual": res} if adds else {})
  kw |= ({"counter": new_counter()} if counted else {}) | {"summed": summed}
  adds = adds or summed  # the launch writes an output
  f = jax.jit(lambda x, t, sc, w: msite.site_launch(x, t, sc, w, mg.parse("64:64:2:0:8"), SEGS, **kw))
  parts, *h, gave_up = jax.eval_shape(f, x, t, sc, w)
  assert parts.shape[1:] == (384, 8) and gave_up.shape == (8,)
  assert [(o.shape, o.dtype) for o in h] == ([((m, 384), jnp.bfloat16)] if adds else [])
  hlo = f.trace(x, t, sc, w).lower(lowering_platforms=("cuda",)).as_text()
  assert (scratch_operand(hlo) == "tensor<1xi32>") == (adds and not counted)
  (text,) = mosaic_modules(f, x, t, sc, w)
  assert ("math.rsqrt" in text and "shfl.sync.bfly" in text) == norm
  assert text.count("red.release.gpu.global.add") == adds
  assert text.count("atom.acq_rel.gpu.global.add") == counted
  assert text.count("red.relaxed.gpu.global.add") == counted  # a given-up wait counts in counter[2]


def test_what_it_refuses():
  x, t, _, w, gain, res = case(2)
  cfg = mg.parse("64:64:2:0:8")
  with pytest.raises(ValueError, match=r"bf16 \[512\] gain"):
    msite.site_launch(x, t, None, w, cfg, SEGS, gain=gain[:256], eps=1e-5)
  with pytest.raises(ValueError, match=r"adds a bf16 \[2, 384\] residual"):
    msite.site_launch(x, t, None, w, cfg, SEGS, residual=res.astype(jnp.float32))
  with pytest.raises(ValueError, match="sum\\(segments\\) = 256"):
    msite.site_launch(x, t[:1], None, w, cfg, (256,))
  assert "9 rows" in msite.unsupported(9, w, SEGS, cfg) and msite.unsupported(2, w, SEGS, cfg) is None
  with pytest.raises(ValueError, match="not the output's shape"):
    masked_linear(x, w, t, None, SEGS, residual=res[:, :128])


@pytest.mark.parametrize("backend", ["xla", "mosaic"])
def test_masked_linear_adds_the_residual_off_the_gpu(backend):
  """Off the GPU, `masked_linear(residual=)` is residual + the output, folded or not. A float32 gain makes the
  normed input float32, which the Mosaic kernels do not read: that site runs as backend 'auto' (XLA here)."""
  x, t, _, w, gain, res = case(2)
  kw = {"backend": backend, "config": mg.parse("64:64:2:0:8")}
  y = masked_linear(x, w, t, None, SEGS, norm=(gain, 1e-5), **kw)
  for fold in (False, True):
    h = masked_linear(x, w, t, None, SEGS, norm=(gain, 1e-5), residual=res, fold=fold, **kw)
    np.testing.assert_array_equal(h, res + y)
  wide = (gain.astype(jnp.float32), 1e-5)
  np.testing.assert_array_equal(
    masked_linear(x, w, t, None, SEGS, norm=wide, **kw),
    masked_linear(x, w, t, None, SEGS, norm=wide, backend="xla"),
  )


def test_on_the_gpu_fold_hands_the_norm_and_residual_to_one_launch(monkeypatch):
  """Where the backend is the GPU, `masked_linear(fold=True)` on backend 'mosaic' gives the launch (stood in for
  by its contract) the un-normalised x, the bf16 gain, the residual and the counter, and returns the launch's
  new residual stream (without a residual, its summed output); without fold the per-site kernel runs."""
  x, t, _, w, gain, res = case(2)
  cfg, counter, got, gave_up = mg.parse("64:64:2:0:8"), new_counter(), {}, [0]

  def launch(x, t, sc, w, cfg, segs, counter=None, **kw):
    got.clear()
    got.update(x=x, counter=counter, **kw)
    return (*msite.site_reference(x, t, sc, w, cfg, segs, **kw), jnp.full((8,), gave_up[0], jnp.int32))

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(msite, "site_launch", launch)
  kw = {"backend": "mosaic", "config": cfg, "fold": True, "counter": counter}
  h = masked_linear(x, w, t, None, SEGS, norm=(gain, 1e-5), residual=res, **kw)
  assert got["gain"] is gain and got["eps"] == 1e-5 and got["residual"] is res and got["counter"] is counter
  np.testing.assert_array_equal(got["x"], x)
  np.testing.assert_array_equal(
    h, msite.site_reference(x, t, None, w, cfg, SEGS, gain=gain, eps=1e-5, residual=res)[1]
  )
  y = masked_linear(x, w, t, None, SEGS, norm=(gain, 1e-5), **kw)
  assert got["summed"] and got["residual"] is None
  assert not np.isnan(np.asarray(y, np.float32)).any()
  np.testing.assert_array_equal(
    y, msite.site_reference(x, t, None, w, cfg, SEGS, gain=gain, eps=1e-5, summed=True)[1]
  )
  # a wait given up: NaN out of a launch without a counter; with one, the count in counter[2] (check_waits)
  gave_up[0] = 1
  bare, counted = (
    masked_linear(x, w, t, None, SEGS, norm=(gain, 1e-5), **(kw | {"counter": c})) for c in (None, counter)
  )
  assert np.isnan(np.asarray(bare, np.float32)).all() and not np.isnan(np.asarray(counted, np.float32)).any()
  got.clear()
  monkeypatch.setattr(mg, "masked_linear_mosaic", lambda x, *a, **k: jnp.zeros((x.shape[0], 384), x.dtype))
  masked_linear(x, w, t, None, SEGS, norm=(gain, 1e-5), residual=res, **(kw | {"fold": False}))
  assert not got


@pytest.mark.parametrize("mode", ["fold", "mlp"])
def test_model_folds_norms_and_residual_adds(monkeypatch, mode):
  """A 2-layer decode step in `on_mosaic` mode fold / mlp, traced and lowered for CUDA: the launches are q|k|v
  and gate|up with the norm inside, o_proj and down with the residual add, each summing its output after one
  wait on the counter, or the MLP launch with three waits; off the GPU the same step's logits equal the unfolded
  mode's ('' / mlp22) bit for bit (there the norms and the adds run in XLA as in those modes)."""
  import dataclasses

  from wina_jax import sites as S
  from wina_jax.bench.decode_setup import abstract_fused_params, on_mosaic
  from wina_jax.bench.shapes import SHAPES
  from wina_jax.decode import decode_step, fuse_projections, fuse_state, init_cache, prefill
  from wina_jax.kernels import FusedThresholdSparsifier
  from wina_jax.testing import random_params

  cfg0 = dataclasses.replace(SHAPES["tiny"], num_hidden_layers=2)
  ft, fs, segs = fuse_state({s: jnp.float32(0.3) for s in S.linear_sites(cfg0)}, {}, cfg0)
  base = FusedThresholdSparsifier.create(ft, fs, segs)
  spec = "64:64:2:0:4:cp_async:kernel"
  params, cfg = fuse_projections(jax.tree.map(lambda a: a.astype(jnp.bfloat16), random_params(cfg0, 0)), cfg0)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 6), 0, cfg.vocab_size)

  def logits_in(m):
    _, _, cache = prefill(params, tokens[:, :5], cfg=cfg, max_len=8)  # the step takes the cache over
    return decode_step(params, tokens[:, 5], cache, on_mosaic(base, spec, m), cfg=cfg)[1]

  unfolded = "" if mode == "fold" else "mlp22"
  np.testing.assert_array_equal(logits_in(mode), logits_in(unfolded))

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the GPU paths, lowered only
  aparams, _ = abstract_fused_params(cfg0)
  acache = jax.eval_shape(lambda: init_cache(cfg, 1, 8, jnp.bfloat16))
  step = jax.jit(lambda p, t, c: decode_step(p, t, c, on_mosaic(base, spec, mode), cfg=cfg))
  texts = mosaic_modules(step, aparams, jax.ShapeDtypeStruct((1,), jnp.int32), acache)
  counts = [(t.count("red.release.gpu.global.add"), t.count("atom.acq_rel.gpu.global.add")) for t in texts]
  assert all(leaves == (waits > 0) for waits, leaves in counts)  # every launch that waits leaves the counter
  # every site sums its own output: no XLA reduction after any launch
  assert sorted(waits for waits, _ in counts) == ([1, 1, 1, 1] if mode == "fold" else [1, 1, 3])
  assert sum("math.rsqrt" in t for t in texts) == 2  # q|k|v's and gate|up's (or the MLP launch's) norm


@needs_gpu
@pytest.mark.parametrize(
  "m,k,segs,wina,spec,norm,adds,summed,counted",
  [
    (1, 4096, (4096, 1024, 1024), False, "64:256:3:0:0", True, False, True, True),
    (3, 1024, (1024,), True, "64:128:3:0:0", False, True, False, True),
    (1, 4096, (4096,), False, "64:256:3:0:0", False, True, False, True),
    (2, 4096, (4096,), True, "64:256:3:0:0", True, True, False, False),
    (1, 4096, (4096, 1024, 1024), True, "64:256:3:0:0", True, False, False, False),
  ],
)
def test_gpu_launch_matches_its_contract(m, k, segs, wina, spec, norm, adds, summed, counted):
  """The partial sums against `site_reference` (float32 tolerance; with the norm, within a few bf16 roundings:
  its sum of squares runs in another order than XLA's); the summed output or the new residual stream from the
  launch's own partials bit for bit; no wait given up; with a counter, two launches in a row and the counter zero
  after them."""
  x, t, sc, w, gain, res = case(m, k, segs, wina)
  cfg = mg.parse(spec)
  kw = ({"gain": gain, "eps": 1e-5} if norm else {}) | ({"residual": res} if adds else {})
  kw |= {"summed": summed}
  counter = new_counter() if counted else None
  launch = jax.jit(lambda *a, counter: msite.site_launch(*a, cfg, segs, counter=counter, **kw))
  for _ in range(2 if counted else 1):
    parts, *h, gave_up = launch(x, t, sc, w, counter=counter)
    ms.check_gave_up(gave_up)
  if counted:
    np.testing.assert_array_equal(counter, np.zeros(3, np.int32))
  if adds:
    np.testing.assert_array_equal(h[0], mp.residual_output(parts, res))
  elif summed:
    np.testing.assert_array_equal(h[0], mp.site_sum(parts, m))
  want = msite.site_reference(x, t, sc, w, cfg, segs, **{a: b for a, b in kw.items() if a != "residual"})[0]
  got, want = np.asarray(parts), np.asarray(want)
  assert np.linalg.norm(got - want) <= (1e-3 if norm else 1e-5) * np.linalg.norm(want)

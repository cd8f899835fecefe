"""Programmatic dependent launch of the Mosaic GPU kernels (`MosaicConfig.pdl`, `mosaic_sync.grid_dependency`):
on the CPU, every kernel's module starts with the grid dependency's wait, before any memory access, only when
asked; on a Hopper GPU, chains of launches that read each other's outputs give the same bits with PDL as
without (a launch that started early and read its input before the kernel ahead of it wrote it would not)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.mosaic_hlo import mosaic_modules
from wina_jax.kernels import mosaic_gemv as mg
from wina_jax.kernels import mosaic_mlp as mm
from wina_jax.kernels import mosaic_site as msite
from wina_jax.kernels import mosaic_sync as ms
from wina_jax.kernels.grid_sync import new_counter

GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not GPU, reason="Mosaic GPU kernels run on a Hopper GPU only")
WAIT, LAUNCH = "griddepcontrol.wait", "griddepcontrol.launch_dependents"
# what reads or writes memory in a lowered Mosaic module (shared or global; barrier set-up aside)
ACCESSES = (
  "memref.load",
  "memref.store",
  "vector.load",
  "vector.store",
  "llvm.load",
  "llvm.store",
  "cp.async",
)


def _bf16(key, shape, scale=1.0):
  return (jax.random.normal(key, shape) * scale).astype(jnp.bfloat16)


def kernels(pdl: bool) -> dict:
  """name -> (jitted fn, args): every Mosaic launch of the project, small, with config pdl."""
  cfg = mg.MosaicConfig(64, 64, 2, splits=2, programs=4, pdl=pdl)
  fused = mg.in_kernel(cfg)
  k, n, f = 512, 256, 512
  key = jax.random.split(jax.random.PRNGKey(0), 4)
  x, w = _bf16(key[0], (1, k)), _bf16(key[1], (k, n), k**-0.5)
  t1, t2 = jnp.full((1,), 0.5, jnp.float32), jnp.full((2,), 0.5, jnp.float32)
  xk = jnp.zeros((1, 2, mg.ROWS, k // 2), jnp.bfloat16)
  ids, counts = jnp.zeros((1, 2, k // 2), jnp.int32), jnp.zeros((1, 2), jnp.int32)
  w_gu, w_down = _bf16(key[2], (k, 2 * f), k**-0.5), _bf16(key[3], (f, k), f**-0.5)
  return {
    "dense": (
      jax.jit(lambda x8, w: mg.dense_partials(x8, w, cfg)),
      (jnp.zeros((mg.ROWS, k), jnp.bfloat16), w),
    ),
    "rows": (jax.jit(lambda *a: mg.rows_partials(*a, cfg=cfg, segments=(n,))), (xk, ids, counts, w)),
    "fused": (jax.jit(lambda x, t, w: mg.fused_partials(x, t, None, w, fused, (n,))), (x, t1, w)),
    "site": (jax.jit(lambda x, t, w: msite.site_launch(x, t, None, w, cfg, (n,))), (x, t1, w)),
    "mlp": (
      jax.jit(lambda x, a, b, c, d: mm.mlp_partials(x, a, None, b, c, None, d, cfg)),
      (x, t2, w_gu, t1, w_down),
    ),
  }


def test_spec_takes_pdl():
  assert not mg.parse("64:256:3:0:132:cp_async:kernel").pdl
  assert mg.parse("64:256:3:0:132:cp_async:kernel:true").pdl
  with pytest.raises(ValueError, match="pdl='yes' is not true | false"):
    mg.parse("64:256:3:0:132:cp_async:kernel:yes")


@pytest.mark.parametrize("name", ["dense", "rows", "fused", "site", "mlp"])
def test_every_launch_waits_first_only_when_asked(name):
  """With pdl the module holds one grid-dependency wait, then the trigger for the next launch, and the kernel
  touches no memory before the wait (Pallas' prologue sets up barriers and a thread's own registers only): a
  kernel launched early runs beside the one ahead of it until then. Without pdl neither."""
  plain, text = (mosaic_modules(fn, *args)[0] for fn, args in (kernels(pdl)[name] for pdl in (False, True)))
  assert WAIT not in plain and LAUNCH not in plain
  assert text.count(WAIT) == 1 and text.count(LAUNCH) == 1
  kernel = text[text.index("gpu.launch ") :]  # the device code (the host side before it loads the arguments)
  before, after = kernel.split(WAIT)
  touches = [line.strip() for line in before.splitlines() if any(a in line for a in ACCESSES)]
  assert all("%alloca" in line for line in touches), touches  # a thread's own registers only
  assert LAUNCH in after and any(a in after for a in ACCESSES)


def test_pdl_launches_reads_the_waits_effect(monkeypatch):
  """True where the wait carries jax 0.11's PdlEffect (which makes Pallas launch the kernel with PDL), False
  where it carries only its memory effect, as in jax 0.10."""
  from jax._src.pallas.mosaic_gpu import primitives

  class PdlEffect:
    pass

  memory = next(iter(primitives.griddepcontrol_wait_p.abstract_eval()[1]))
  monkeypatch.setattr(primitives.griddepcontrol_wait_p, "abstract_eval", lambda: ((), {memory}))
  assert not ms.pdl_launches()
  monkeypatch.setattr(primitives.griddepcontrol_wait_p, "abstract_eval", lambda: ((), {memory, PdlEffect()}))
  assert ms.pdl_launches()


def test_benchmarks_record_whether_pdl_ran():
  """The JSON head says whether this jax launches a waiting kernel with PDL, and the XLA flags of the run."""
  from wina_jax.bench.timing import run_record

  head = run_record({})
  assert head["mosaic_pdl_launch"] == ms.pdl_launches() and isinstance(head["mosaic_pdl_launch"], bool)
  assert "xla_flags" in head


def _site_chain(cfg, x, ws, t):
  """Each site launch's summed bf16 output is the next one's input, with no XLA op between them -> (the last
  output, every launch's gave_up)."""
  gave = []
  for w in ws:
    _, x, gave_up = msite.site_launch(x, t, None, w, cfg, (w.shape[1],), summed=True)
    gave.append(gave_up)
  return x, gave


def _mlp_chain(cfg, x, args, gain, counter):
  """Each MLP launch's new residual stream (norm and residual add inside) is the next one's input -> (the last
  one, every launch's gave_up)."""
  gave = []
  for _ in range(3):
    *_, x, gave_up = mm.mlp_partials(x, *args, cfg, gain=gain, eps=1e-5, residual=x, counter=counter)
    gave.append(gave_up)
  return x, gave


@needs_gpu
@pytest.mark.parametrize("spec", ["64:256:3:0:0"])  # the step's tiling, on all SMs
def test_gpu_chains_give_the_same_bits_with_pdl(spec):
  """Four site launches and three MLP launches in a row, each reading what the one before wrote: with PDL
  (where jax launches with it: `mosaic_sync.pdl_launches`) the outputs equal the plain launches' bit for bit,
  and the counter is zero after them."""
  key = jax.random.split(jax.random.PRNGKey(1), 8)
  d, f = 1024, 2048
  x = _bf16(key[0], (1, d))
  ws = [_bf16(key[1 + i], (d, d), d**-0.5) for i in range(4)]
  t = jnp.full((1,), 0.5, jnp.float32)
  args = (jnp.array([0.6, 0.7], jnp.float32), None, _bf16(key[5], (d, 2 * f), d**-0.5))
  args += (jnp.array([0.1], jnp.float32), None, _bf16(key[6], (f, d), f**-0.5))
  gain = (jax.random.uniform(key[7], (d,)) + 0.5).astype(jnp.bfloat16)
  out = {}
  for pdl in (False, True):
    cfg = mg.parse(f"{spec}:cp_async:kernel:{str(pdl).lower()}")
    counter = new_counter()
    site, gave_site = jax.jit(lambda x, ws: _site_chain(cfg, x, ws, t))(x, ws)
    mlp, gave_mlp = jax.jit(lambda x, c: _mlp_chain(cfg, x, args, gain, c))(x, counter)
    for gave_up in gave_site + gave_mlp:
      ms.check_gave_up(gave_up)
    np.testing.assert_array_equal(counter, np.zeros(3, np.int32))
    out[pdl] = (np.asarray(site, np.float32), np.asarray(mlp, np.float32))
  for plain, early in zip(out[False], out[True]):
    np.testing.assert_array_equal(early, plain)


@pytest.mark.parametrize("mode", ["", "mlp"])
def test_model_step_launches_all_wait_with_a_pdl_spec(monkeypatch, mode):
  """A 2-layer decode step on backend 'mosaic' with a spec ending ':true', traced and lowered for CUDA: every
  Mosaic launch of the step (per-site, or the folded sites and the MLP launch) starts with the grid dependency's
  wait, and none does with the same spec ending ':false'. The config reaches every launch through the
  sparsifier."""
  import dataclasses

  from wina_jax import sites as S
  from wina_jax.bench.decode_setup import abstract_fused_params, on_mosaic
  from wina_jax.bench.shapes import SHAPES
  from wina_jax.decode import decode_step, fuse_state, init_cache
  from wina_jax.kernels import FusedThresholdSparsifier

  cfg0 = dataclasses.replace(SHAPES["tiny"], num_hidden_layers=2)
  ft, fs, segs = fuse_state({s: jnp.float32(0.3) for s in S.linear_sites(cfg0)}, {}, cfg0)
  base = FusedThresholdSparsifier.create(ft, fs, segs)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the GPU paths, lowered only
  aparams, cfg = abstract_fused_params(cfg0)
  acache = jax.eval_shape(lambda: init_cache(cfg, 1, 8, jnp.bfloat16))
  for pdl in ("true", "false"):
    sp = on_mosaic(base, f"64:64:2:0:4:cp_async:kernel:{pdl}", mode)
    step = jax.jit(lambda p, t, c: decode_step(p, t, c, sp, cfg=cfg))
    texts = mosaic_modules(step, aparams, jax.ShapeDtypeStruct((1,), jnp.int32), acache)
    assert texts and [t.count(WAIT) for t in texts] == [int(pdl == "true")] * len(texts)

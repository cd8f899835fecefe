"""Gate|up and down in one persistent Mosaic GPU launch (`wina_jax.kernels.mosaic_mlp`): on the CPU, its jnp
contract against the XLA masked linears and the model's SwiGLU, its lowering for CUDA and what it refuses; on a
Hopper GPU, the kernel against its contract, Llama-3-8B's MLP shape included."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.mosaic_hlo import mosaic_modules, scratch_operand
from wina_jax.kernels import mosaic_gemv as mg
from wina_jax.kernels import mosaic_mlp as mm
from wina_jax.kernels import mosaic_phases as mp
from wina_jax.kernels import mosaic_sync as ms
from wina_jax.kernels.grid_sync import new_counter
from wina_jax.kernels.reference import masked_linear_xla
from wina_jax.layers import rms_norm

GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not GPU, reason="Mosaic GPU kernels run on a Hopper GPU only")


def case(m, d, f, wina, seed=0):
  """Random bf16 x and weights (scaled so the down input is O(1)); thresholds keep about half of each input."""
  key = jax.random.split(jax.random.PRNGKey(seed), 6)
  x = jax.random.normal(key[0], (m, d), jnp.bfloat16)
  w_gu = (jax.random.normal(key[1], (d, 2 * f)) / np.sqrt(d)).astype(jnp.bfloat16)
  w_down = (jax.random.normal(key[2], (f, d)) / np.sqrt(f)).astype(jnp.bfloat16)
  sc_gu = jax.random.uniform(key[3], (2, d)) + 0.5 if wina else None
  sc_down = jax.random.uniform(key[4], (1, f)) + 0.5 if wina else None
  thr_gu = jnp.array([0.6, 0.7], jnp.float32)
  thr_down = jnp.array([0.1], jnp.float32)
  return x, thr_gu, sc_gu, w_gu, thr_down, sc_down, w_down


def close(got, ref, tol):
  got, ref = np.asarray(got, np.float32), np.asarray(ref, np.float32)
  assert np.linalg.norm(got - ref) <= tol * np.linalg.norm(ref), np.abs(got - ref).max()


@pytest.mark.parametrize("m,wina", [(1, False), (3, True)])
def test_contract_is_the_xla_mlp(m, wina):
  """The partials' sums equal the XLA path: masked gate|up (bf16 out), SiLU(gate) * up in bf16, masked down."""
  args = case(m, 512, 1024, wina)
  x, thr_gu, sc_gu, w_gu, thr_down, sc_down, w_down = args
  cfg = mg.MosaicConfig(64, 64, 2, programs=8)
  parts_gu, a_ref, parts_down = mm.mlp_reference(*args, cfg)
  y = masked_linear_xla(x, w_gu, thr_gu, sc_gu, (1024, 1024))
  close(jnp.sum(parts_gu, 0)[:, :m].T, y, 1e-2)  # y is rounded to bf16
  g, u = jnp.split(y, 2, axis=-1)
  np.testing.assert_array_equal(
    mm.swiglu(g, u), jax.nn.silu(g) * u
  )  # the model's mlp_block in bf16, bit for bit
  np.testing.assert_array_equal(a_ref, mm.down_input(parts_gu, m))
  # a from the partials, summed in split order: a few roundings of g, u differ from XLA's
  assert np.mean(np.asarray(a_ref) == np.asarray(jax.nn.silu(g) * u)) > 0.95
  want = masked_linear_xla(a_ref, w_down, thr_down, sc_down, (512,))
  close(jnp.sum(parts_down, 0)[:, :m].T, want, 1e-2)
  kept = np.mean(
    np.abs(np.asarray(a_ref, np.float32)) * (1 if sc_down is None else np.asarray(sc_down)) > 0.1
  )
  assert 0.2 < kept < 0.95  # the down site keeps a part of its input, not all or nothing


def norm_of(d, seed=0):
  """An RMSNorm's bf16 gain [d] near 1 and its eps (`mlp_partials(gain=..., eps=...)`)."""
  gain = (jax.random.uniform(jax.random.PRNGKey(seed + 7), (d,)) + 0.5).astype(jnp.bfloat16)
  return {"gain": gain, "eps": 1e-5}


@pytest.mark.parametrize(
  "m,wina,spec,norm,adds,counted",
  [
    (1, False, "64:64:2:0:8", False, False, False),
    (3, True, "64:128:3:0:8", False, True, True),
    (2, False, "64:64:2:0:8", True, False, False),
    (1, False, "64:64:2:0:8", True, True, True),
  ],
)
def test_kernel_lowers_for_cuda(m, wina, spec, norm, adds, counted):
  """Lowered for CUDA: the outputs' shapes; the RMSNorm, the residual add's third wait and the counter's leave
  where asked. With a counter the waits count on it and Pallas adds no zeroed semaphore to the launch."""
  args = case(m, 512, 1024, wina)
  cfg = mg.parse(spec)
  kw = (norm_of(512) if norm else {}) | ({"residual": residual_of(m, 512)} if adds else {})
  kw |= {"counter": new_counter()} if counted else {}
  f = jax.jit(lambda *a: mm.mlp_partials(*a, cfg, marks=True, **kw))
  hlo = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  # without a counter, the wait's semaphore: one for all 8 programs, zeroed by Pallas (the last operand)
  assert (scratch_operand(hlo) == "tensor<1xi32>") != counted
  parts_gu, a, parts_down, *h, gave_up, marks = jax.eval_shape(f, *args)
  cfg_gu, cfg_down = mm.configs(cfg, 512, 1024)
  assert parts_gu.shape == (cfg_gu.splits, 2048, 8) and parts_down.shape == (cfg_down.splits, 512, 8)
  assert a.shape == (m, 1024) and a.dtype == jnp.bfloat16
  assert [(o.shape, o.dtype) for o in h] == ([((m, 512), jnp.bfloat16)] if adds else [])
  assert gave_up.shape == (8,) and marks.shape[::2] == (8, mg.MARKS)
  (text,) = mosaic_modules(f, *args)
  assert ("math.rsqrt" in text and "shfl.sync.bfly" in text) == norm  # the RMSNorm runs in the launch
  assert text.count("red.release.gpu.global.add") == (3 if adds else 2)  # grid waits: the add is the third's
  assert text.count("atom.acq_rel.gpu.global.add") == counted  # `grid_leave`: the last out zeroes the counter
  assert (
    text.count("red.relaxed.gpu.global.add") == (3 if adds else 2) * counted
  )  # give-ups count in counter[2]


def residual_of(m, d, seed=0):
  """A bf16 residual stream [m, d] of O(1) entries (`mlp_partials(residual=...)`)."""
  return jax.random.normal(jax.random.PRNGKey(seed + 11), (m, d), jnp.bfloat16)


def test_residual_add_is_the_sites_output_added():
  """With residual, the contract's fourth output is residual + the down site's output (its partials summed in
  split order and rounded to bf16, as `partials_output` rounds), the add in float32 rounded to bf16: the model's
  bf16 add. The other outputs do not change; a residual of another shape or dtype is refused."""
  args, cfg = case(2, 512, 1024, True), mg.parse("64:64:2:0:8")
  res = residual_of(2, 512)
  *same, h = mm.mlp_reference(*args, cfg, residual=res)
  for got, want in zip(same, mm.mlp_reference(*args, cfg)):
    np.testing.assert_array_equal(got, want)
  y = mg.partials_output(same[2], 2, jnp.bfloat16)
  np.testing.assert_array_equal(h, res + y)
  assert h.dtype == jnp.bfloat16 and not np.array_equal(h, res)
  for bad in (res[:1], res.astype(jnp.float32)):
    with pytest.raises(ValueError, match=r"adds a bf16 \[2, 512\] residual"):
      mm.mlp_partials(*args, cfg, residual=bad)


def test_norm_in_the_launch_is_rms_norm_first():
  """With gain, the contract normalises x as the model does (`layers.rms_norm`), then runs as without."""
  args = case(2, 512, 1024, True)
  cfg, kw = mg.parse("64:64:2:0:8"), norm_of(512)
  normed = (rms_norm(args[0], kw["gain"], kw["eps"]),) + args[1:]
  for got, want in zip(mm.mlp_reference(*args, cfg, **kw), mm.mlp_reference(*normed, cfg)):
    np.testing.assert_array_equal(got, want)
  assert mp.takes_norm(kw["gain"], 512) and not mp.takes_norm(kw["gain"].astype(jnp.float32), 512)
  with pytest.raises(ValueError, match="bf16 \\[512\\] gain"):
    mm.mlp_partials(*args, cfg, gain=kw["gain"][:256], eps=1e-5)


def test_what_it_refuses():
  assert "9 rows" in mm.unsupported(9, 4096, 14336, mg.parse("64:256:3"))
  assert "shared memory" in mm.unsupported(1, 4096, 14336, mg.parse("64:256:8"))
  assert mm.unsupported(1, 4096, 14336, mg.parse("64:256:3:0:132")) is None
  x, thr_gu, sc_gu, w_gu, thr_down, _, w_down = case(1, 512, 1024, True)
  with pytest.raises(ValueError, match="scales at both sites or at neither"):
    mm.mlp_partials(x, thr_gu, sc_gu, w_gu, thr_down, None, w_down, mg.parse("64:64:2"))
  with pytest.raises(ValueError, match=r"not \[512, 2F\] and \[F, 512\]"):
    mm.mlp_partials(
      *case(1, 512, 1024, False)[:-1], jnp.zeros((512, 1024), jnp.bfloat16), mg.parse("64:64:2")
    )


@needs_gpu
@pytest.mark.parametrize(
  "m,d,f,wina,spec,norm,adds,counted",
  [
    (1, 1024, 2048, False, "64:64:2:0:0", False, False, False),
    (3, 1024, 2048, True, "64:128:3:0:0", False, True, True),
    (8, 512, 1024, True, "64:64:4:0:0", False, True, False),
    (1, 4096, 14336, False, "64:256:3:0:0", False, False, True),
    (2, 4096, 14336, True, "64:256:3:0:0", False, False, False),
    (3, 1024, 2048, True, "64:128:3:0:0", True, False, False),
    (1, 4096, 14336, False, "64:256:3:0:0", True, True, True),
  ],
)
def test_gpu_kernel_matches_its_contract(m, d, f, wina, spec, norm, adds, counted):
  """Every phase against `mlp_reference`: gate|up's partial sums at float32 tolerance; the down input from the
  kernel's own partials as `down_input` builds it (SiLU's exp on the GPU and in XLA may differ by an ulp, so a
  few bf16 values may); down within a few of its inputs' bf16 roundings (an input at its threshold may flip);
  no wait given up. With the norm in the launch, gate|up within a few bf16 roundings too: its sum of squares
  runs in another order than XLA's, so an rsqrt may differ by an ulp and a normed input round the other way.
  With the residual, the new residual stream from the kernel's own down partials bit for bit. With a counter,
  two launches in a row on it, each waiting on all its programs, and the counter zero after them."""
  args = case(m, d, f, wina)
  cfg = mg.parse(spec)
  kw = (norm_of(d) if norm else {}) | ({"residual": residual_of(m, d)} if adds else {})
  counter = new_counter() if counted else None
  launch = jax.jit(lambda *a, counter: mm.mlp_partials(*a, cfg, counter=counter, **kw))
  for _ in range(2 if counted else 1):
    parts_gu, a, parts_down, *h, gave_up = launch(*args, counter=counter)
    ms.check_gave_up(gave_up)
  if counted:
    np.testing.assert_array_equal(counter, np.zeros(3, np.int32))
  if adds:
    np.testing.assert_array_equal(h[0], mp.residual_output(parts_down, kw.pop("residual")))
  ref_gu, _, ref_down = mm.mlp_reference(*args, cfg, **kw)
  close(parts_gu, ref_gu, 1e-3 if norm else 1e-5)
  a_own = np.asarray(mm.down_input(parts_gu, m), np.float32)
  assert np.mean(np.asarray(a, np.float32) == a_own) > 0.99
  close(a, a_own, 1e-2)
  close(parts_down, ref_down, 1e-3)


def test_benchmark_script_lowers_on_the_cpu(tmp_path):
  """experiments.decode.mosaic_mlp off the GPU: every row lowers, the JSON is written."""
  import json
  import subprocess
  import sys

  out = tmp_path / "mlp.json"
  cmd = [sys.executable, "-m", "experiments.decode.mosaic_mlp", "--models=tiny", "--specs=64:64:2:0:4"]
  subprocess.run(cmd + ["--reps=1", "--sparsities=0,0.5", f"--out={out}"], check=True, capture_output=True)
  rows = json.loads(out.read_text())["rows"]
  assert [(r["sparsity"], r["lowered"]) for r in rows] == [(0.0, True), (0.5, True)]


def test_model_runs_the_mlp_as_one_launch_behind_backend_mosaic(monkeypatch):
  """A decode step under backend 'mosaic' with mosaic_mlp: every layer's MLP goes through `fused_mlp` (its jnp
  contract off the GPU) and the logits match the per-site 'mosaic' path's within the step's one-ulp band;
  without mosaic_mlp, or with a threshold at the act site (CATS), the per-site path runs."""
  from wina_jax import sites as S
  from wina_jax.bench.decode_setup import ulp_sensitivity
  from wina_jax.bench.shapes import SHAPES
  from wina_jax.decode import decode_step, fuse_projections, fuse_state, prefill
  from wina_jax.kernels import FusedThresholdSparsifier
  from wina_jax.testing import random_params

  cfg0 = SHAPES["tiny"]
  params, cfg = fuse_projections(jax.tree.map(lambda a: a.astype(jnp.bfloat16), random_params(cfg0, 0)), cfg0)
  thr = {s: jnp.float32(0.3) for s in S.linear_sites(cfg0)}
  scales = {s: jnp.linalg.norm(S.site_kernel(random_params(cfg0, 0), s), axis=1) for s in thr}  # WINA
  ft, fs, segs = fuse_state(thr, scales, cfg0)
  mcfg = mg.MosaicConfig(64, 64, 2, programs=4)
  calls = []
  real = mm.mlp_reference
  monkeypatch.setattr(mm, "mlp_reference", lambda *a, **kw: calls.append(sorted(kw)) or real(*a, **kw))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 0, cfg.vocab_size)

  def step_sparsifier(**kw):
    return FusedThresholdSparsifier.create(ft, fs, segs, backend="mosaic").replace(mosaic_config=mcfg, **kw)

  def step(**kw):
    sp = step_sparsifier(**kw)
    _, _, cache = prefill(params, tokens[:, :5], cfg=cfg, max_len=6)
    return decode_step(params, tokens[:, 5], cache, sp, cfg=cfg)[1]

  per_site = step()
  assert not calls
  fused = step(mosaic_mlp=True, mosaic_fold=True)
  # traced once per layer; off the GPU the norm and the residual add run in XLA
  assert calls == [[]] * cfg.num_hidden_layers
  # within the model's own rounding band: the per-site step's logits moved by one bf16 ulp at its input (its
  # masks flip under rounding-level changes; the contract sums in split order and rounds SwiGLU op by op)
  band = ulp_sensitivity(params, cfg, step_sparsifier(), tokens, 6)["rel_err"]
  assert np.linalg.norm(fused - per_site) / np.linalg.norm(per_site) <= band
  calls.clear()
  with_act = dict(ft, **{S.site_name(0, "mlp", S.ACT): jnp.float32(0.1)})
  sp = FusedThresholdSparsifier.create(with_act, fs, segs, backend="mosaic").replace(
    mosaic_config=mcfg, mosaic_mlp=True
  )
  _, _, cache = prefill(params, tokens[:, :5], cfg=cfg, max_len=6)
  decode_step(params, tokens[:, 5], cache, sp, cfg=cfg)
  assert len(calls) == cfg.num_hidden_layers - 1  # layer 0's MLP has a CATS site: per-site there


def test_on_the_gpu_the_launch_takes_the_norm_residual_and_counter(monkeypatch):
  """Where the backend is the GPU, `fused_mlp` hands the un-normalised x and the RMSNorm's bf16 gain to the
  launch (stood in for by its contract here) and applies no norm itself; the output is the contract's. Given the
  residual, the launch adds it (its fourth output is returned) where mosaic_fold is set (else XLA adds it, with
  the same result here); the sparsifier's counter goes to every launch."""
  from wina_jax import sites as S
  from wina_jax.kernels import FusedThresholdSparsifier

  x, thr_gu, sc_gu, w_gu, thr_down, sc_down, w_down = case(2, 512, 1024, False)
  kw, cfg = norm_of(512), mg.parse("64:64:2:0:8")
  got = {}

  def launch(x, *a, counter=None, **k):
    got.clear()
    got.update(x=x, counter=counter, **k)
    return (*mm.mlp_reference(x, *a, **k), jnp.zeros((8,), jnp.int32))

  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setattr(mm, "mlp_partials", launch)
  gu, down = S.site_name(0, "mlp", "gate_up_proj"), S.site_name(0, "mlp", "down_proj")
  sp = FusedThresholdSparsifier.create({gu: thr_gu[0], down: thr_down[0]}, backend="mosaic").replace(
    mosaic_config=cfg, mosaic_mlp=True, mosaic_fold=True
  )
  model_cfg = type("Cfg", (), {"fused_gate_up": True, "hidden_act": "silu"})()
  mlp = {"gate_up_proj": {"kernel": w_gu}, "down_proj": {"kernel": w_down}}
  y = sp.fused_mlp(model_cfg, 0, x[:, None], (kw["gain"], kw["eps"]), mlp)
  assert got["gain"] is not None and got["eps"] == kw["eps"]
  np.testing.assert_array_equal(got["x"], x)  # not normalised before the launch
  assert got["counter"] is sp.counter and sp.counter.shape == (3,)
  want = mm.mlp_reference(x, jnp.stack([thr_gu[0]] * 2), None, w_gu, thr_down[:1], None, w_down, cfg, **kw)[2]
  np.testing.assert_array_equal(y[:, 0], mg.partials_output(want, 2, x.dtype))
  res = residual_of(2, 512)[:, None]
  h = sp.fused_mlp(model_cfg, 0, x[:, None], (kw["gain"], kw["eps"]), mlp, residual=res)
  assert got["residual"].shape == (2, 512)
  np.testing.assert_array_equal(h, res + y)  # bf16 + bf16, one rounding: the launch's add
  h_xla = sp.replace(mosaic_fold=False).fused_mlp(model_cfg, 0, x[:, None], (kw["gain"], kw["eps"]), mlp, res)
  assert "residual" not in got
  np.testing.assert_array_equal(h_xla, h)


def test_on_mosaic_modes():
  """`decode_setup.on_mosaic`: per-site kernels, folded sites, session 22's MLP launch, or the MLP launch with the
  rest folded; the folding modes get a counter; anything else is refused naming the choices."""
  from wina_jax.bench.decode_setup import on_mosaic
  from wina_jax.kernels import FusedThresholdSparsifier

  sp = FusedThresholdSparsifier.create({"layers.0.mlp.down_proj": 0.1})
  modes = {mode: on_mosaic(sp, "64:64:2", mode) for mode in ("", "fold", "mlp22", "mlp")}
  assert all(m.backend == "mosaic" and m.mosaic_config == mg.parse("64:64:2") for m in modes.values())
  got = {k: (m.mosaic_mlp, m.mosaic_fold, m.counter is not None) for k, m in modes.items()}
  assert got == {
    "": (False, False, False),
    "fold": (False, True, True),
    "mlp22": (True, False, False),
    "mlp": (True, True, True),
  }
  np.testing.assert_array_equal(modes["mlp"].counter, np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="Mosaic mode 'mlp3'"):
    on_mosaic(sp, "64:64:2", "mlp3")


@pytest.mark.parametrize("mlp", [False, True])
def test_layers_share_one_trace_per_kernel(monkeypatch, mlp):
  """A 4-layer decode step on backend 'mosaic', traced and lowered for CUDA: each distinct kernel (q|k|v, o,
  then gate|up and down or the one MLP launch) is traced once for all layers, not once a layer. Lowering a
  32-layer Llama-3-8B step took 43 s on this CPU when every layer traced its own (2 s now)."""
  import dataclasses

  from wina_jax import sites as S
  from wina_jax.bench.decode_setup import abstract_fused_params
  from wina_jax.bench.shapes import SHAPES
  from wina_jax.decode import decode_step, fuse_state, init_cache
  from wina_jax.kernels import FusedThresholdSparsifier

  jax.clear_caches()
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the GPU paths, lowered only
  phases = []
  real = mg.kept_row_phase
  monkeypatch.setattr(mg, "kept_row_phase", lambda *a: phases.append(a[1]) or real(*a))
  cfg0 = dataclasses.replace(SHAPES["tiny"], num_hidden_layers=4)
  params, cfg = abstract_fused_params(cfg0)
  ft, fs, segs = fuse_state({s: jnp.float32(0.3) for s in S.linear_sites(cfg0)}, {}, cfg0)
  mcfg = mg.MosaicConfig(64, 64, 2, programs=4, compact="kernel")
  sp = FusedThresholdSparsifier.create(ft, fs, segs, backend="mosaic").replace(
    mosaic_config=mcfg, mosaic_mlp=mlp
  )
  cache = jax.eval_shape(lambda: init_cache(cfg, 1, 8, jnp.bfloat16))
  step = jax.jit(lambda p, t, c: decode_step(p, t, c, sp, cfg=cfg))
  hlo = step.trace(params, jax.ShapeDtypeStruct((1,), jnp.int32), cache).lower(lowering_platforms=("cuda",))
  assert "mosaic_gpu" in hlo.as_text()
  d, f = cfg0.hidden_size, cfg0.intermediate_size
  assert sorted(phases) == sorted([(d, cfg.q_dim + 2 * cfg.kv_dim), (cfg.q_dim, d), (d, 2 * f), (f, d)])


def test_lower_cost_script_on_the_cpu():
  """experiments.decode.lower_cost off the GPU: a line of trace and lower seconds per layer count."""
  import subprocess
  import sys

  cmd = [
    sys.executable,
    "-m",
    "experiments.decode.lower_cost",
    "--model=tiny",
    "--layers=1,2",
    "--mosaic_mode=mlp",
  ]
  run = subprocess.run(cmd + ["--mosaic_config=64:64:2:0:4:cp_async:kernel"], check=True, capture_output=True)
  *lines, per_layer = run.stdout.decode().splitlines()
  assert [line.split(":")[0] for line in lines] == [f"tiny layers={n} backend=mosaic +mlp" for n in (1, 2)]
  assert all(re.search(r"trace \d+\.\d s, lower \d+\.\d s, step glue ops \d+, kernels", x) for x in lines)
  # per layer: q|k|v, attention, o_proj and the MLP launch; no reduction, norm or SwiGLU left to XLA
  assert per_layer.startswith("tiny backend=mosaic +mlp per layer: {'KERNEL': 4.0")
  assert not re.search("reduce|rsqrt|logistic|transpose", per_layer)

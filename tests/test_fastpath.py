"""The fast decode path takes a method whose score it can compute (the masks equal the method's own) or
refuses it naming the method and the reason; `invert` maps thresholds exactly."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wina_jax import sites as S
from wina_jax import sparsity
from wina_jax.bench.shapes import SHAPES
from wina_jax.decode import fast_sparsifier, fuse_projections, fuse_state
from wina_jax.kernels import FusedThresholdSparsifier, keep_mask
from wina_jax.model import forward
from wina_jax.sparsity import FastPathError, FastScale, ScoreSparsifier, fast_state
from wina_jax.sparsity.fastpath import invert
from wina_jax.testing import random_params

CFG = SHAPES["tiny"]  # qwen2: q|k|v and gate|up fuse, biases
FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture(scope="module")
def model():
  """Tiny random float32 params, calibration windows and other tokens; the fixture package on the path."""
  sys.path.insert(0, FIXTURES)
  sparsity.load_modules("demo_methods")  # registers sq_wina (x**2 * c) from outside the package
  params = random_params(CFG, 0, jnp.float32)
  windows = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (4, 32), 0, CFG.vocab_size))
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, CFG.vocab_size)
  yield params, windows, tokens
  sys.path.remove(FIXTURES)


def calibrated(params, windows, method, target=0.5):
  calib = sparsity.calibrate(params, CFG, method, windows, progress=False)
  return sparsity.make(method, params, CFG, target, mode="threshold", calibration=calib)


def mask_flips(sp, fast, params, tokens_list):
  """(entries whose fast-path mask differs from the method's own, entries) over every masked site's input."""
  flips = total = 0
  for tokens in tokens_list:
    for site, x in forward(params, tokens, CFG, sp, collect=("inputs",)).aux["inputs"].items():
      if site in sp.thresholds:
        own = sp.mask(site, x)
        flips += int(jnp.sum(own != keep_mask(x, fast.thresholds[site], fast.scales.get(site))))
        total += own.size
  return flips, total


@pytest.mark.parametrize("name", ["sq_wina", "wina", "teal", "cats"])
def test_fast_path_masks_equal_the_methods_own(model, name):
  """Calibrated at 50 %: the kernels' masks equal the method's at every site, on the calibration windows
  (where a score equals its threshold) and on other tokens, and the fused model's logits equal its own."""
  params, windows, tokens = model
  sp = calibrated(params, windows, sparsity.get_method(name))
  flips, total = mask_flips(sp, fast_sparsifier(sp, CFG, fused=False), params, [tokens, jnp.asarray(windows)])
  assert flips == 0 and total > 10_000
  fparams, fcfg = fuse_projections(params, CFG)
  got = forward(fparams, tokens, fcfg, fast_sparsifier(sp, CFG, backend="xla")).logits
  ref = forward(params, tokens, CFG, sp).logits
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)  # fused matmuls: rounding only


def test_the_raw_state_as_a_scale_was_another_method(model):
  """What the issue measured: `sq_wina`'s state (c) handed to the kernels as the scale of |x| computes
  another method (logits off by O(1)); its declaration computes its own."""
  params, windows, tokens = model
  sp = calibrated(params, windows, sparsity.get_method("sq_wina"))
  fparams, fcfg = fuse_projections(params, CFG)
  ref = forward(params, tokens, CFG, sp).logits
  raw = FusedThresholdSparsifier.create(*fuse_state(sp.thresholds, sp.state, CFG), backend="xla")
  assert float(jnp.max(jnp.abs(forward(fparams, tokens, fcfg, raw).logits - ref))) > 0.1


def test_interpret_kernels_compute_the_plugin_methods_masks(model):
  """The Pallas kernels (interpret mode) on every fused site of the model, one decode token: sq_wina."""
  params, windows, tokens = model
  sp = calibrated(params, windows, sparsity.get_method("sq_wina"))
  fparams, fcfg = fuse_projections(params, CFG)
  tok = tokens[:1, :1]
  got = forward(fparams, tok, fcfg, fast_sparsifier(sp, CFG, backend="interpret")).logits
  np.testing.assert_allclose(got, forward(params, tok, CFG, sp).logits, rtol=0, atol=1e-5)


def test_a_score_written_in_another_order_flips_only_near_its_threshold(model):
  """x**2 * c computed literally (not as (|x| * sqrt(c))**2) maps too, but the two roundings disagree where
  the score is within a few ulps of t: at layer 0 the calibration windows' tokens repeat the very entries
  that set the thresholds (a score equal to t), and only such entries flip."""

  @dataclasses.dataclass(frozen=True)
  class Literal(sparsity.Method):
    def state(self, params, cfg):
      return {s: sparsity.column_norms(S.site_kernel(params, s)) for s in self.sites(cfg)}

    def score(self, site, x, state):
      return x**2 * state

    def fast_scale(self, site, state):
      return FastScale(scale=jnp.sqrt(state), outer=jnp.square)

  params, windows, tokens = model
  sp = calibrated(params, windows, Literal())
  fast = fast_sparsifier(sp, CFG, fused=False)
  for t in (tokens, jnp.asarray(windows)):
    for site, x in forward(params, t, CFG, sp, collect=("inputs",)).aux["inputs"].items():
      if site in sp.thresholds:
        score, th = sp.score(site, x), sp.thresholds[site]
        differ = sp.mask(site, x) != keep_mask(x, fast.thresholds[site], fast.scales.get(site))
        assert bool(jnp.all(jnp.abs(score[differ] - th) <= 4 * jnp.spacing(th))), site


def test_invert_is_exact_at_every_float():
  """outer(u) > t <=> u > invert(outer, t) for the floats next to the boundary and random ones, thresholds
  that are exact squares included; -inf / inf thresholds keep everything / nothing."""
  rng = np.random.default_rng(0)
  u0 = rng.uniform(0, 3, 64).astype(np.float32)
  t = jnp.asarray(np.concatenate([u0 * u0, rng.uniform(0, 9, 64).astype(np.float32), [0.0, -1.0]]))
  tp = invert(jnp.square, t)
  near = jnp.stack([tp, jnp.nextafter(tp, jnp.inf), jnp.nextafter(tp, -jnp.inf), jnp.nextafter(tp, 0.0)])
  u = jnp.concatenate([jnp.abs(near), jnp.asarray(rng.uniform(0, 3, (256, t.size)), jnp.float32)])
  np.testing.assert_array_equal(jnp.square(u) > t, u > tp)
  assert float(tp[-1]) == -np.inf  # no u >= 0 has u**2 <= -1: keep everything
  ends = invert(jnp.square, jnp.asarray([-np.inf, np.inf], jnp.float32))
  assert float(ends[0]) == -np.inf and float(ends[1]) == np.inf


def test_undeclared_and_mismatched_methods_are_refused():
  x = jnp.ones((4,))

  @dataclasses.dataclass(frozen=True)
  class Cube(sparsity.Method):  # declares nothing
    name = "cube"

    def score(self, site, x, state):
      return jnp.abs(x) ** 3

  @dataclasses.dataclass(frozen=True)
  class MyWina(sparsity.methods.Wina):  # a new score under Wina's declaration
    name = "my_wina"

    def score(self, site, x, state):
      return x**2

  @dataclasses.dataclass(frozen=True)
  class Picky(sparsity.Method):
    name = "picky"

    def fast_scale(self, site, state):
      raise FastPathError("its score needs the whole row")

  def sp(method, mode="threshold"):
    return ScoreSparsifier(method=method, mode=mode, k={"s": 2}, thresholds={"s": 0.5}, state={"s": x})

  with pytest.raises(
    FastPathError, match="'cube' cannot run on the fast path: it does not declare `fast_scale`"
  ):
    fast_state(sp(Cube()))
  with pytest.raises(
    FastPathError, match="'my_wina'.*MyWina overrides `score` but inherits `fast_scale` from Wina"
  ):
    fast_state(sp(MyWina()))
  with pytest.raises(
    FastPathError, match="'picky' cannot run on the fast path at s: its score needs the whole row"
  ):
    fast_state(sp(Picky()))
  with pytest.raises(FastPathError, match="'wina' is in top-k mode"):
    fast_state(sp(sparsity.get_method("wina"), mode="topk"))
  assert fast_state(sparsity.make("dense", {}, None, 0.0)) == ({}, {})  # masks nothing: nothing to refuse

"""`FusedThresholdSparsifier`: threshold-mode TEAL/WINA as a pytree that the model calls per site.

`__call__(site, x, kernel)` masks (CPU, analysis); `linear(site, x, kernel)` runs the fused kernel
(`masked_linear`), which the model prefers when present; `norm_linear(site, h, gain, eps, kernel)` does the
same on `rms_norm(h)` with the norm computed in the kernel's prologue (the model's sites after a norm);
`residual_linear(site, x, kernel, residual)` returns residual + `linear` (a block's output projection), the add
inside the launch where `mosaic_fold` lets it. Sites absent from `thresholds` stay dense.
Fused sites (`qkv_proj`, `gate_up_proj`) carry one threshold and scale per output segment.
backend 'persistent' adds `fused_layer`, which runs a whole decoder layer step as one launch
(`persistent_layer`) where it applies (batch 1, one token, fused Llama / Qwen2-style layers) and returns None
elsewhere, so the model falls back to its per-site path (the sites then use backend 'auto').
backend 'mosaic' with `mosaic_mlp` adds `fused_mlp`, which runs a decode step's MLP (fused gate|up, SiLU,
down) as one persistent Mosaic launch (`mosaic_mlp`) where it applies, and None elsewhere. backend 'mosaic' with
`mosaic_fold` folds XLA's work around the sites into their launches on the GPU: the RMSNorm before q|k|v, the
residual add after o_proj (`mosaic_site`) and after the MLP launch.

From a calibrated `wina_jax.sparsity.ScoreSparsifier` in threshold mode, any method:
  wina_jax.decode.fast_sparsifier(sp, cfg, fused=False)   # or fused=True for `fuse_projections`' model
which maps the method's declared score (`Method.fast_scale`) to `|x| * scale > t` or refuses the method
(`wina_jax.sparsity.fastpath`); a method's raw `sp.state` is not a scale in general.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from wina_jax import numerics
from wina_jax import sites as S
from wina_jax.kernels import mosaic_mlp as MM
from wina_jax.kernels import mosaic_phases as MP
from wina_jax.kernels import persistent_config as PC
from wina_jax.kernels import persistent_layer as PL
from wina_jax.kernels.config import WORKSPACE_BLOCKS, KernelConfig
from wina_jax.kernels.grid_sync import check_waits, new_counter
from wina_jax.kernels.masked_linear import masked_linear
from wina_jax.kernels.mosaic_gemv import MosaicConfig, partials_output
from wina_jax.kernels.mosaic_sync import guarded
from wina_jax.kernels.reference import keep_mask
from wina_jax.layers import rms_norm


@struct.dataclass
class FusedThresholdSparsifier:
  """thresholds: {site: [] or [S]} float32 (traced); scales: {site: [d_in] or [S, d_in]} float32
  (traced, WINA column norms; absent = TEAL's |x|); segments: static ((site, widths), ...) for fused
  sites; backend: 'auto' | 'pallas' | 'interpret' | 'xla' | 'mosaic' | 'persistent' (whole layers where they apply,
  `fused_layer`; per-site kernels as 'auto' elsewhere);
  configs: static (((d_in, d_out), KernelConfig), ...) tilings per kernel shape (else the default);
  workspace: int32 [sites, WORKSPACE_BLOCKS] zeros, one row per site (sorted order), when a config
  uses the 'semaphore' reduce (the kernel leaves it zeroed, so it is made once, never per step);
  fuse_norm: static, whether `norm_linear` normalises inside the Pallas kernel's prologue (True) or runs
  the norm as XLA ops first (False, the default: on the H200 the prologue made the Llama-3-8B decode step
  0.09 ms slower at 50 / 65 %, its kernels losing more than the norm kernels it removes; decode_h200.md, session 7);
  layer_config: static `PersistentConfig` of backend 'persistent' (None: `persistent_config.DEFAULT_LAYER`);
  counter: int32 [3] (`grid_sync.new_counter`: the grid-wide waits' counter, left zeroed by every launch,
  so made once) of backend 'persistent' (its third slot counts waits the watchdog gave up, which `check_waits`
  raises on) and of `fused_mlp` (None there: Pallas zeroes a semaphore before each launch);
  mosaic_config: static `MosaicConfig` of backend 'mosaic' (the Mosaic GPU kept-row kernel at every site it
  takes; None: its default tiling); mosaic_mlp: static, with backend 'mosaic', whether `fused_mlp` runs each
  MLP's gate|up and down as one persistent launch where it applies; mosaic_fold: static, with backend 'mosaic'
  on the GPU, whether a site's launch also applies the RMSNorm before it (`norm_linear`, a bf16 gain) and adds
  the residual after it (`residual_linear`, and the MLP launch where the model offers the residual), with their
  grid-wide waits on `counter` (False: XLA runs both, as in session 22)."""

  thresholds: dict = struct.field(default_factory=dict)
  scales: dict = struct.field(default_factory=dict)
  segments: tuple = struct.field(pytree_node=False, default=())
  backend: str = struct.field(pytree_node=False, default="auto")
  configs: tuple = struct.field(pytree_node=False, default=())
  workspace: Optional[jax.Array] = None
  fuse_norm: bool = struct.field(pytree_node=False, default=False)
  layer_config: Optional[PC.PersistentConfig] = struct.field(pytree_node=False, default=None)
  counter: Optional[jax.Array] = None
  mosaic_config: Optional[MosaicConfig] = struct.field(pytree_node=False, default=None)
  mosaic_mlp: bool = struct.field(pytree_node=False, default=False)
  mosaic_fold: bool = struct.field(pytree_node=False, default=False)

  @classmethod
  def create(
    cls,
    thresholds: Mapping[str, object],
    scales: Optional[Mapping[str, object]] = None,
    segments: Optional[Mapping[str, tuple]] = None,
    backend: str = "auto",
    configs: Optional[Mapping[tuple, KernelConfig]] = None,
    fuse_norm: bool = False,
    layer_config: Optional[PC.PersistentConfig] = None,
  ) -> FusedThresholdSparsifier:
    """From plain dicts (numbers or arrays); scales of sites without a threshold are dropped."""
    scales, configs = scales or {}, configs or {}
    semaphore = any(c.reduce == "semaphore" for c in configs.values())
    return cls(
      thresholds={s: jnp.asarray(t, jnp.float32) for s, t in thresholds.items()},
      scales={s: jnp.asarray(v, jnp.float32) for s, v in scales.items() if s in thresholds},
      segments=tuple(sorted((s, tuple(int(w) for w in ws)) for s, ws in (segments or {}).items())),
      backend=backend,
      configs=tuple(sorted(configs.items())),
      workspace=jnp.zeros((len(thresholds), WORKSPACE_BLOCKS), jnp.int32) if semaphore else None,
      fuse_norm=fuse_norm,
      layer_config=layer_config,
      counter=new_counter() if backend in ("persistent", "mosaic") else None,
    )

  def as_persistent(self, layer_config: Optional[PC.PersistentConfig] = None) -> FusedThresholdSparsifier:
    """The same thresholds and scales under backend 'persistent' (with `layer_config`, and a zeroed counter)."""
    return self.replace(backend="persistent", layer_config=layer_config, counter=new_counter())

  def check_waits(self) -> None:
    """After persistent launches (backend 'persistent', or 'mosaic' launches that wait on `counter`): raises
    `grid_sync.WaitTimeout` if one gave up a grid-wide wait (a grid that was not co-resident; its outputs are
    wrong). No-op without a counter."""
    if self.counter is not None:
      check_waits(self.counter)

  def with_thresholds(self, thresholds: Mapping[str, object]) -> FusedThresholdSparsifier:
    """Same structure, new threshold values (reuses compiled code when shapes match)."""
    return self.replace(thresholds={s: jnp.asarray(t, jnp.float32) for s, t in thresholds.items()})

  def _segments(self, site: str) -> Optional[tuple]:
    return dict(self.segments).get(site)

  def __call__(self, site: str, x: jax.Array, kernel: Optional[jax.Array]) -> jax.Array:
    t = self.thresholds.get(site)
    if t is None:
      return x
    if jnp.ndim(t) and t.shape[0] > 1:
      raise ValueError(
        f"site {site} has {t.shape[0]} segment thresholds, so no single input mask exists; "
        "call `linear` (the model does unless collecting inputs) or use unfused params"
      )
    keep = keep_mask(
      x, jnp.reshape(t, ()), None if site not in self.scales else jnp.reshape(self.scales[site], (-1,))
    )
    return jnp.where(keep, x, jnp.zeros((), x.dtype))

  def linear(self, site: str, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """(x * mask) @ kernel for x [..., d_in], kernel [d_in, d_out], through `masked_linear`."""
    return self._linear(site, x, kernel, None)

  def norm_linear(self, site: str, h: jax.Array, gain: jax.Array, eps: float, kernel: jax.Array) -> jax.Array:
    """`linear` of `layers.rms_norm(h, gain, eps)`, h [..., d_in] un-normalised: with `fuse_norm` the Pallas
    kernel normalises in its prologue (with `mosaic_fold`, the Mosaic launch in its compaction), so no norm
    kernel runs before it; else the norm runs first."""
    if not self.fuse_norm and not self._folds():
      return self._linear(site, rms_norm(h, gain, eps), kernel, None)
    return self._linear(site, h, kernel, (gain, eps))

  def residual_linear(self, site: str, x: jax.Array, kernel: jax.Array, residual: jax.Array) -> jax.Array:
    """residual + `linear`(site, x, kernel), residual [..., d_out]: with `mosaic_fold` on the GPU the add runs
    in the site's launch (`mosaic_site`), else in XLA after it."""
    return self._linear(site, x, kernel, None, residual)

  def _folds(self) -> bool:
    """Whether sites fold their norm and residual add into their launches: on the GPU only, so that off it the
    step runs as the per-site path does, bit for bit (XLA's excess precision rounds the same norm differently
    in another fusion, and the masks amplify it)."""
    return self.backend == "mosaic" and self.mosaic_fold and jax.default_backend() == "gpu"

  def _linear(self, site, x, kernel, norm, residual=None):
    t = self.thresholds.get(site)
    if t is None:
      y = numerics.matmul(x if norm is None else rms_norm(x, *norm), kernel)
      return y if residual is None else residual + y
    return masked_linear(
      x,
      kernel,
      t,
      self.scales.get(site),
      self._segments(site),
      backend="auto" if self.backend == "persistent" else self.backend,
      config=self.mosaic_config if self.backend == "mosaic" else dict(self.configs).get(tuple(kernel.shape)),
      workspace=self.workspace,
      slot=sorted(self.thresholds).index(site),
      norm=norm,
      residual=residual,
      fold=self._folds(),
      counter=self.counter,  # the folded launches' waits count on it (`masked_linear` uses it with fold only)
    )

  def _layer_sites(self, layer: int) -> list:
    """The sites with a threshold in layer `layer`."""
    return [s for s in self.thresholds if s.startswith(f"layers.{layer}.")]

  def layer_thresholds(self, layer: int) -> tuple[dict, dict]:
    """({fused projection: thresholds}, {fused projection: scales}) of layer `layer`'s sites, as the
    persistent layer kernel takes them (`persistent_layer.layer_args`)."""
    mine = self._layer_sites(layer)
    proj = lambda site: S.parse_site(site)[2]
    return {proj(s): self.thresholds[s] for s in mine}, {
      proj(s): self.scales[s] for s in mine if s in self.scales
    }

  def fused_layer(self, cfg, lp: dict, h: jax.Array, layer: int, positions: jax.Array, kv: Optional[dict]):
    """Decoder layer `layer` (params `lp`, residual h [B, T, d]) as one persistent kernel launch -> (h, kv),
    or None where backend is not 'persistent' or the kernel does not apply (`persistent_layer.unsupported`:
    batch > 1, no cache, unsupported layer or shapes): the model then runs the per-site path. Off the GPU
    the kernel runs in interpret mode with one program."""
    if self.backend != "persistent" or kv is None:
      return None
    lcfg = cfg.layer_config(layer)
    config = self.layer_config or PC.DEFAULT_LAYER
    if PL.unsupported(lcfg, lp, h.shape[0], h.shape[1], self._layer_sites(layer), config):
      return None
    return PL.decoder_layer(
      lcfg,
      lp,
      h,
      kv,
      positions[0],
      *self.layer_thresholds(layer),
      self.counter,
      config=config,
      interpret=jax.default_backend() != "gpu",
    )

  def fused_mlp(
    self,
    cfg,
    layer: int,
    x: jax.Array,
    norm: Optional[tuple],
    mlp: dict,
    residual: Optional[jax.Array] = None,
  ) -> Optional[jax.Array]:
    """Layer `layer`'s MLP on x [B, T, d] (un-normalised when norm = (gain, eps) is given; mlp: the block's
    params) as one persistent Mosaic launch (`mosaic_mlp.mlp_partials`) -> its output [B, T, d], or with
    residual [B, T, d] the new residual stream residual + output, the add inside the launch (its third phase)
    on the GPU where `mosaic_fold` is set (else XLA adds it after);
    None where backend is not 'mosaic' with `mosaic_mlp`, or the launch does not take the MLP:
    not a fused gate|up with SiLU, a threshold missing at gate|up or down or present at the act site, biases,
    not bfloat16, more than 8 rows, or a shape its tiling refuses (`mosaic_mlp.unsupported`). On the GPU the
    launch applies the RMSNorm where its gain is bf16 (else XLA, before it). Off the GPU its jnp contract runs
    (`mosaic_mlp.mlp_reference`), the norm before it and the residual add after it in XLA as on the per-site path
    (XLA's excess precision rounds the same ops differently in another fusion, and the masks amplify it). A
    launch whose grid-wide wait gave up returns NaN, or with `counter` counts it there (`check_waits`)."""
    if self.backend != "mosaic" or not self.mosaic_mlp or not cfg.fused_gate_up or cfg.hidden_act != "silu":
      return None
    gu, down = S.site_name(layer, "mlp", "gate_up_proj"), S.site_name(layer, "mlp", "down_proj")
    if (
      gu not in self.thresholds
      or down not in self.thresholds
      or S.site_name(layer, "mlp", S.ACT) in self.thresholds
    ):
      return None
    w_gu, w_down = mlp["gate_up_proj"], mlp["down_proj"]
    (b, t, d), f = x.shape, w_down["kernel"].shape[0]
    mcfg = self.mosaic_config or MosaicConfig()
    tensors = (x, w_gu["kernel"], w_down["kernel"]) + (() if residual is None else (residual,))
    bf16 = all(v.dtype == jnp.bfloat16 for v in tensors)
    if "bias" in w_gu or "bias" in w_down or not bf16 or MM.unsupported(b * t, d, f, mcfg):
      return None
    gpu = jax.default_backend() == "gpu"
    fold = None  # on the GPU the launch applies the RMSNorm itself where it can (`mosaic_phases.takes_norm`)
    if norm is not None:
      gain = jnp.asarray(norm[0])
      if gpu and MP.takes_norm(gain, d):
        fold = {"gain": gain, "eps": float(norm[1])}
      else:  # off the GPU as the per-site path does it, so the CPU path matches that one bit for bit
        x = rms_norm(x, *norm)
    thr_gu = jnp.broadcast_to(self.thresholds[gu], (2,))
    thr_down = jnp.reshape(self.thresholds[down], (1,))
    sc_gu, sc_down = self.scales.get(gu), self.scales.get(down)
    if sc_gu is not None or sc_down is not None:  # the launch takes scales at both sites or at neither
      sc_gu = jnp.broadcast_to(jnp.ones((d,), jnp.float32) if sc_gu is None else sc_gu, (2, d))
      sc_down = jnp.broadcast_to(jnp.ones((f,), jnp.float32) if sc_down is None else sc_down, (1, f))
    args = (x.reshape(b * t, d), thr_gu, sc_gu, w_gu["kernel"], thr_down, sc_down, w_down["kernel"], mcfg)
    # the launch adds the residual on the GPU only: off it XLA adds it as on the per-site path, bit for bit
    adds = {"residual": residual.reshape(b * t, d)} if residual is not None and self._folds() else {}
    if gpu:
      *_, out, gave_up = MM.mlp_partials(*args, **(fold or {}), **adds, counter=self.counter)
      out = guarded(out, gave_up, self.counter)
    else:
      out = MM.mlp_reference(*args, **adds)[-1]
    if adds:
      return out.reshape(b, t, d)
    y = partials_output(out, b * t, x.dtype).reshape(b, t, d)
    return y if residual is None else residual + y

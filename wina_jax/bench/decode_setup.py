"""Set-up shared by the decode experiments (no flags): tuned tilings, calibrated threshold sparsifiers,
kept-weight bytes, the check of a sparse step against the XLA path, and the weightless stand-in (`NoLinear`).

Used by `bench_decode`, `profile_decode`, `check_decode`, `decode_overhead` and the per-shape kernel scripts
(`kernel_sweep`, `mosaic_sweep`, `mosaic_marks`, `mosaic_mlp`: `teal_thresholds`).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from wina_jax import families
from wina_jax import sites as S
from wina_jax.decode import decode_step, fuse_projections
from wina_jax.kernels import FusedThresholdSparsifier, KernelConfig, mosaic_gemv
from wina_jax.kernels.grid_sync import new_counter
from wina_jax.model import forward, init_cache
from wina_jax.testing import random_params


def teal_thresholds(x: jax.Array, sparsity: float, segments: int = 1) -> jax.Array:
  """float32 [segments]: TEAL's threshold for `sparsity` on x, the sparsity's quantile of |x| ('lower', so an
  input at it is dropped), every segment the same; -1 at sparsity 0 (every input kept)."""
  q = -1.0 if sparsity == 0 else jnp.quantile(jnp.abs(x.astype(jnp.float32)), sparsity, method="lower")
  return jnp.full((segments,), q, jnp.float32)


def abstract_fused_params(cfg0) -> tuple[dict, object]:
  """(params, cfg) of cfg0's shape as `fuse_projections` leaves them, bf16, as jax.ShapeDtypeStruct leaves: no
  weights made, for tracing and lowering a step (`experiments.decode.lower_cost`)."""
  box = {}

  def make():
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), random_params(cfg0, 0))
    fused, box["cfg"] = fuse_projections(params, cfg0)
    return fused

  params = jax.eval_shape(make)
  return params, box["cfg"]


def segment_widths(cfg, site: str) -> tuple[int, ...]:
  """Output widths of a site's kernel: q|k|v or gate|up for fused sites, else the one full width."""
  _, block, proj = S.parse_site(site)
  return families.get(cfg.model_type).segments(cfg, block, proj)


def prefix_caches(params, cfg, tokens, max_len) -> tuple[dict, dict]:
  """Two equal bf16 caches holding a dense decode of tokens[:, :-1] [B, T-1] (decode steps donate theirs)."""
  cache = init_cache(cfg, tokens.shape[0], max_len, jnp.bfloat16)
  for j in range(tokens.shape[1] - 1):
    _, _, cache = decode_step(params, tokens[:, j], cache, None, cfg=cfg)
  return cache, jax.tree.map(jnp.copy, cache)


def check_against_xla(params, cfg, sp, tokens, max_len, attention="xla") -> dict:
  """One decode step after `tokens` [B, T-1], from equal caches: the sparse step through the chosen
  backend vs the XLA mask-then-matmul path, both with `attention` (relative logits error, greedy-token
  agreement); for an attention other than XLA also the dense step against XLA attention
  ('attention_rel_err', 'attention_same_token'), kept apart because a sparse step's masks flip under
  rounding-level input changes and would hide the attention kernel's own error."""
  cache, twin = prefix_caches(params, cfg, tokens, max_len)
  tok, logits, _ = decode_step(params, tokens[:, -1], cache, sp, cfg=cfg, attention=attention)
  ref_tok, ref, _ = decode_step(
    params, tokens[:, -1], twin, sp.replace(backend="xla"), cfg=cfg, attention=attention
  )
  out = {
    "rel_err": float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref)),
    "same_token": bool(jnp.all(tok == ref_tok)),
  }
  if attention != "xla":
    cache, twin = prefix_caches(params, cfg, tokens, max_len)
    tok, logits, _ = decode_step(params, tokens[:, -1], cache, None, cfg=cfg, attention=attention)
    ref_tok, ref, _ = decode_step(params, tokens[:, -1], twin, None, cfg=cfg)
    out["attention_rel_err"] = float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref))
    out["attention_same_token"] = bool(jnp.all(tok == ref_tok))
  return out


def ulp_sensitivity(params, cfg, sp, tokens, max_len) -> dict:
  """Logits of one XLA-path decode step after `tokens` [B, T-1]: as is vs with the last token's
  embedding row scaled by 1 + 2^-7 (about one bf16 ulp) -> relative error and greedy agreement."""
  sp = sp.replace(backend="xla") if sp is not None else None
  cache, twin = prefix_caches(params, cfg, tokens, max_len)
  emb = params["embed_tokens"]["embedding"]
  last = tokens[:, -1]
  moved = emb.at[last].set((emb[last].astype(jnp.float32) * (1 + 2.0**-7)).astype(emb.dtype))
  moved_params = {**params, "embed_tokens": {"embedding": moved}}
  tok, ref, _ = decode_step(params, last, cache, sp, cfg=cfg)
  tok2, logits, _ = decode_step(moved_params, last, twin, sp, cfg=cfg)
  return {
    "rel_err": float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref)),
    "same_token": bool(jnp.all(tok == tok2)),
  }


def with_band(check: dict, band: dict) -> dict:
  """A `check_against_xla` result with the step's one-ulp band (`ulp_sensitivity`) beside it: 'ulp_rel_err' and
  'inside_band' (rel_err within the band: a difference the model's own rounding sensitivity explains)."""
  return {**check, "ulp_rel_err": band["rel_err"], "inside_band": check["rel_err"] <= band["rel_err"]}


def site_scores(params, cfg, tokens, with_scale) -> dict:
  """{fused site: (scores [S, B, T, d_in] float32, widths)} of the dense model on tokens [B, T]."""
  inputs = jax.jit(lambda p, t: forward(p, t, cfg, collect=("inputs",)).aux["inputs"])(params, tokens)
  out = {}
  for site, x in inputs.items():
    if S.parse_site(site)[2] == S.ACT:
      continue
    kernel = S.site_kernel(params, site)
    widths = segment_widths(cfg, site)
    ax = jnp.abs(x.astype(jnp.float32))
    if with_scale:
      bounds = np.cumsum((0,) + widths)
      norms = [
        jnp.linalg.norm(kernel[:, a:b].astype(jnp.float32), axis=1) for a, b in zip(bounds, bounds[1:])
      ]
      out[site] = (jnp.stack([ax * n for n in norms]), widths, jnp.stack(norms))
    else:
      out[site] = (ax[None], widths, None)
  return out


def make_sparsifier(scores, sparsity, batch, configs, backend):
  """Thresholds at the `sparsity` quantile of each segment's scores over the first `batch` rows ->
  (FusedThresholdSparsifier, {site: [kept-row fraction (union over the batch) per segment]})."""
  thr, scales, segs, kept = {}, {}, {}, {}
  for site, (sc, widths, norms) in scores.items():
    sc = sc[:, :batch]  # [S, B, T, d]
    flat = sc.reshape(sc.shape[0], -1)
    t = (
      jnp.full((sc.shape[0],), -1.0)
      if sparsity == 0
      else jnp.quantile(flat, sparsity, axis=1, method="lower")
    )
    frac = np.asarray(jnp.mean(jnp.any(sc > t[:, None, None, None], axis=1), axis=(1, 2)))
    kept[site] = np.broadcast_to(frac, (len(widths),))  # TEAL: one score for all segments
    thr[site] = jnp.broadcast_to(t, (len(widths),)) if len(widths) > 1 else t[0]
    if norms is not None:
      scales[site] = norms if len(widths) > 1 else norms[0]
    if len(widths) > 1:
      segs[site] = widths
  sp = FusedThresholdSparsifier.create(thr, scales, segs, backend=backend, configs=configs)
  return sp, kept


MOSAIC_MODES = ("", "fold", "mlp22", "mlp")  # `on_mosaic`'s modes, as the experiments' variants name them


def on_mosaic(sp, spec: str, mode: str = ""):
  """sp on backend 'mosaic' with the tiling `spec` (`mosaic_gemv.parse`). mode: '' (every site its own kernel,
  XLA's norms and residual adds around them), 'fold' (the same kernels also applying the RMSNorm before q|k|v
  and gate|up and adding the residual after o_proj and down: `kernels.mosaic_site`), 'mlp22' (each MLP as one
  persistent launch as session 22 ran it, the A / B baseline: XLA adds the residual after it, Pallas zeroes its
  semaphore before each launch), 'mlp' (the MLP launch adding the residual, with the attention half folded as
  in 'fold'). The folding modes' waits count on a counter made once (`grid_sync.new_counter`)."""
  if mode not in MOSAIC_MODES:
    raise ValueError(f"Mosaic mode {mode!r}: use one of {MOSAIC_MODES} ('' for per-site kernels)")
  fold = mode in ("fold", "mlp")
  return sp.replace(
    backend="mosaic",
    mosaic_config=mosaic_gemv.parse(spec),
    mosaic_mlp=mode.startswith("mlp"),
    mosaic_fold=fold,
    counter=new_counter() if fold else None,
  )


def linear_bytes(params, cfg, kept=None) -> float:
  """Bytes of the linear sites' weights, only the kept rows' when `kept` ({site: [fraction per segment]})."""
  total = 0
  for site in S.linear_sites(cfg):
    k = S.site_kernel(params, site)
    if kept is None:
      total += k.size * k.dtype.itemsize
    else:
      total += sum(
        f * k.shape[0] * w * k.dtype.itemsize for f, w in zip(kept[site], segment_widths(cfg, site))
      )
  return total


def load_configs(paths, reduce: str = "") -> dict:
  """{(d_in, d_out): KernelConfig} from the 'best' entries of kernel_sweep JSONs (later files win per
  shape); `reduce` overrides their split-K reduce."""
  configs, override = {}, {"reduce": reduce} if reduce else {}
  for path in paths:
    with open(path) as f:
      configs.update(
        {
          tuple(int(v) for v in k.split("x")): KernelConfig(**{**c, **override})
          for k, c in json.load(f)["best"].items()
        }
      )
  return configs


@struct.dataclass
class NoLinear:
  """A stand-in sparsifier whose linear sites read no weights (y = x's first feature, broadcast to the
  output width): a decode step with it times everything but the linear sites, the step's 'rest'
  (norms, RoPE, attention, cache writes, residual adds, lm_head, launch gaps)."""

  def __call__(self, site, x, kernel):
    return x

  def linear(self, site, x, kernel):
    return jnp.broadcast_to(x[..., :1], x.shape[:-1] + (kernel.shape[1],))

"""WINA tensor transform: rotate the residual stream so that k_proj and gate_proj become column-orthogonal.

For each transformed block (layer l, 'self_attn' or 'mlp') the basis Q [d, d] comes from the float64 SVD of
the block's key kernel K [d, n] (the family's `key_projs`: k_proj and gate_proj; the k / gate columns of
Phi-3's fused kernels, found by `Family.locate`) after the
block's RMSNorm gain is folded in: K = Q S U^T, so Q^T K = S U^T has orthogonal rows (torch columns). When
n < d (GQA k_proj) the SVD is full, so Q is still a d x d orthogonal basis.

The residual stream entering a block is carried in that block's basis. RMSNorm commutes with rotations,
so with gains folded into the following linears the dense model is unchanged:

  embedding      E @ Q_attn,0
  q/k/v, qkv     Q_attn,l^T diag(g_in) K            o_proj      W_o @ Q_mlp,l    (bias @ Q_mlp,l)
  gate/up        Q_mlp,l^T diag(g_post) K           down_proj   W_d @ Q_next     (bias @ Q_next)
  residual_attn  Q_attn,l^T Q_mlp,l                 residual_mlp  Q_mlp,l^T Q_next
  lm_head        Q_last^T diag(g_final) lm_head      (untied: the embedding and lm_head differ)

Q_next is Q_attn,l+1, or Q_mlp,l for the last layer (whose residual_mlp is then the identity and omitted).
When K has rank r < d (GQA k_proj) the last d - r columns of Q (a basis of K's null space) are free:
`basis=` picks them ('svd': LAPACK's, 'axis', 'learned'; see `wina_jax.bases`).
An untransformed block (see `blocks=`) has Q = I; shortcuts between two identity bases are omitted.
The embedding mean is NOT subtracted (that breaks invariance on RMSNorm models).

Post-block norms (Gemma 3's sandwich norms: each block's output y is RMS-normed with gain g before the
residual add) make this 'residual' placement inexact: RMSNorm commutes with Q only at unit gain, since
||y Q|| = ||y|| but g (y Q) != (g y) Q for a non-uniform g, and g cannot move into o_proj / down_proj because
the normalisation sits between them and the add. `rotate='inputs'` (the default for such models) is exact
instead: the residual stream stays in the original basis, each block's normed input is rotated by its Q
(`rotate_attn` / `rotate_mlp` [d, d]) and its input kernels become Q^T diag(g_in) K. The sites see the same
x Q as under 'residual' and o_proj / down_proj read the same inputs, so the sparsified model is the same
up to rounding; it costs one dense [d, d] per block (2 L, vs 2 L - 1 shortcuts), keeps tied embeddings.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl
from flax import traverse_util

from wina_jax import bases as B
from wina_jax import families
from wina_jax import sites as S
from wina_jax.config import ModelConfig

BLOCKS = ("self_attn", "mlp")
Block = tuple[int, str]  # (layer, 'self_attn' | 'mlp')
HI = jax.lax.Precision.HIGHEST


def _f64(a) -> np.ndarray:
  return np.asarray(a, np.float64)


def pre_gain(lp: dict, cfg: ModelConfig, block: str) -> np.ndarray:
  """[d] float64 gain of the block's pre-norm (the family's `norms`; `norm_offset` + scale)."""
  if block not in BLOCKS:
    raise ValueError(f"unknown block {block!r}; expected one of {BLOCKS}")
  return _f64(lp[families.get(cfg.model_type).norms[block][0]]["scale"]) + cfg.norm_offset


def key_kernel(lp: dict, cfg: ModelConfig, block: str) -> np.ndarray:
  """[d, n] float64 kernel whose SVD defines the block's basis, with the block's RMSNorm gain folded in."""
  g = pre_gain(lp, cfg, block)
  family = families.get(cfg.model_type)
  proj, cols = family.locate(cfg, block, family.key_projs[block])
  return g[:, None] * _f64(lp[block][proj]["kernel"])[:, cols]


def svd_basis(kernel: np.ndarray) -> tuple[np.ndarray, int]:
  """([d, d] orthogonal Q float64: the left singular vectors of kernel [d, n], its rank r): Q^T kernel has
  orthogonal rows, and Q[:, r:] is LAPACK's basis of the null space. Wide kernels (n > d) are first reduced
  by QR (kernel = R^T Q_r^T, R [d, d]), which leaves the left singular vectors unchanged and avoids
  computing the [n, d] right factor."""
  k = _f64(kernel)
  d, n = k.shape
  if n > d:
    k = np.linalg.qr(k.T, mode="r").T
  u, s, _ = np.linalg.svd(k, full_matrices=True)
  return u, B.null_rank(s, k.shape)


def orthogonalizing_basis(kernel: np.ndarray, basis: str = "svd") -> np.ndarray:
  """[d, d] orthogonal Q (float64) with Q^T kernel [d, n] row-orthogonal; the null-space part is LAPACK's
  ('svd') or the axis-aligned one ('axis'). 'learned' needs data: see `block_bases`."""
  if B.check_basis(basis) == "learned":
    raise ValueError(
      "basis='learned' is fitted on calibration inputs: use block_bases / transform with calib_windows=..."
    )
  q, r = svd_basis(kernel)
  if basis == "svd" or r == q.shape[0]:
    return q
  return np.concatenate([q[:, :r], B.axis_basis(q[:, r:])], axis=1)


def _check_blocks(blocks: Optional[Iterable[Block]], cfg: ModelConfig) -> set[Block]:
  if blocks is None:
    return {(l, b) for l in range(cfg.num_hidden_layers) for b in BLOCKS}
  out = set()
  for l, b in blocks:
    if b not in BLOCKS or not 0 <= l < cfg.num_hidden_layers:
      raise ValueError(
        f"bad block {(l, b)!r}; expected (layer in [0, {cfg.num_hidden_layers}), one of {BLOCKS})"
      )
    out.add((int(l), b))
  return out


def block_inputs(params: dict, cfg: ModelConfig, windows: np.ndarray) -> dict[Block, np.ndarray]:
  """{(layer, block): [N * T, d] RMS-normalised (unit gain) dense inputs of the block} on token windows."""
  from wina_jax.layers import rms_norm
  from wina_jax.model import forward  # the learned basis is fitted on the model's own activations

  windows = np.asarray(windows)
  if windows.ndim != 2 or windows.size == 0:
    raise ValueError(f"basis='learned' needs calibration token windows [N, T], got shape {windows.shape}")
  res = forward(params, jnp.asarray(windows), cfg, collect=("residual",)).aux["residual"]
  one = jnp.ones((cfg.hidden_size,), jnp.float32)
  return {
    (l, b): np.asarray(rms_norm(res[f"layers.{l}.{b}"].astype(jnp.float32), one, cfg.rms_norm_eps)).reshape(
      -1, cfg.hidden_size
    )
    for l in range(cfg.num_hidden_layers)
    for b in BLOCKS
  }


def input_kernels(lp: dict, cfg: ModelConfig, block: str) -> list[np.ndarray]:
  """The block's input-reading kernels [d, n_j] (q/k/v or gate/up, fused or not) with its gain folded."""
  g = pre_gain(lp, cfg, block)
  return [g[:, None] * _f64(lp[block][p]["kernel"]) for p in S.block_sites(cfg, block)[:-1]]


def block_bases(
  params: dict,
  cfg: ModelConfig,
  blocks: Optional[Iterable[Block]] = None,
  *,
  basis: str = "svd",
  calib_windows: Optional[np.ndarray] = None,
  basis_sparsity: float = 0.5,
  info: Optional[dict] = None,
) -> dict[Block, Optional[np.ndarray]]:
  """{(layer, block): Q [d, d] float64, or None (identity) for blocks not in `blocks` (default: all)}.

  basis: the null-space choice (`wina_jax.bases`); 'learned' fits it on `calib_windows` [N, T] at
  top-k sparsity `basis_sparsity` and, if `info` is a dict, records {(layer, block): fit summary} in it."""
  chosen = _check_blocks(blocks, cfg)
  B.check_basis(basis)
  # single-threaded LAPACK: small SVDs gain little from threads and stall badly on a busy CPU
  with threadpoolctl.threadpool_limits(1, user_api="blas"):
    svd = {blk: svd_basis(key_kernel(params["layers"][str(blk[0])], cfg, blk[1])) for blk in sorted(chosen)}
    out = {(l, b): None for l in range(cfg.num_hidden_layers) for b in BLOCKS}
    free = [blk for blk, (q, r) in svd.items() if r < q.shape[0]]
    if basis == "learned" and free and calib_windows is None:
      raise ValueError(
        "basis='learned' fits the null-space rotation on calibration activations: pass "
        "calib_windows=[N, T] token windows"
      )
    inputs = block_inputs(params, cfg, calib_windows) if basis == "learned" and free else {}
    for blk, (q, r) in svd.items():
      if basis == "svd" or r == q.shape[0]:
        out[blk] = q
        continue
      null = B.axis_basis(q[:, r:])
      if basis == "learned":
        kernels = input_kernels(params["layers"][str(blk[0])], cfg, blk[1])
        null, fit = B.learned_basis(inputs[blk], q[:, :r], null, kernels, sparsity=basis_sparsity)
        if info is not None:
          info[blk] = fit
      out[blk] = np.concatenate([q[:, :r], null], axis=1)
  return out


def _f32(a) -> jax.Array:
  return jnp.asarray(a, jnp.float32)


def _rot_in(q: Optional[np.ndarray], w: jax.Array) -> jax.Array:
  """Q^T w: rotate the input side of a [d, n] kernel (float32 at full precision)."""
  return w if q is None else jnp.matmul(_f32(q.T), w, precision=HI)


def _rot_out(w: jax.Array, q: Optional[np.ndarray]) -> jax.Array:
  """w Q: rotate the output side of a [n, d] kernel or a [d] bias."""
  return w if q is None else jnp.matmul(w, _f32(q), precision=HI)


def _shortcut(a: Optional[np.ndarray], b: Optional[np.ndarray]) -> Optional[np.ndarray]:
  """A^T B in float64 (None = identity), or None when both bases are the same object."""
  if a is b:
    return None
  if a is None or b is None:
    return b if a is None else a.T
  return a.T @ b


ROTATIONS = ("residual", "inputs")


def default_rotation(cfg: ModelConfig) -> str:
  """'inputs' for models with post-block norms (Gemma's sandwich norms), else 'residual'."""
  return "inputs" if families.get(cfg.model_type).post_norms else "residual"


def transform(
  params: dict,
  cfg: ModelConfig,
  *,
  blocks: Optional[Iterable[Block]] = None,
  basis: str = "svd",
  calib_windows: Optional[np.ndarray] = None,
  basis_sparsity: float = 0.5,
  rotate: Optional[str] = None,
) -> tuple[dict, ModelConfig]:
  """WINA-transformed `(params, cfg)`; dense outputs are unchanged (see the module docstring).

  blocks: (layer, 'self_attn' | 'mlp') pairs to orthogonalise; None = every block. basis: the free
  null-space basis of rank-deficient key kernels, 'svd' | 'axis' | 'learned' (fitted on `calib_windows`
  at top-k `basis_sparsity`; `wina_jax.bases`). rotate: where the bases live, one of ROTATIONS (None:
  `default_rotation`): 'residual' carries the residual stream in them (gains folded, embeddings untied);
  'inputs' keeps the residual stream and rotates each block's normed input (`rotate_attn` / `rotate_mlp`),
  the one exact choice with post-block norms. Bases and shortcuts in float64, the rotated weights as float32
  products at full precision; each array is cast back to its input dtype.
  """
  rotate = default_rotation(cfg) if rotate is None else rotate
  if rotate not in ROTATIONS:
    raise ValueError(f"rotate={rotate!r}; expected one of {ROTATIONS}")
  if rotate == "residual" and families.get(cfg.model_type).post_norms:
    raise ValueError(
      f"rotate='residual' is not exact for {cfg.model_type!r}: its blocks' outputs pass an RMSNorm with a "
      "per-channel gain before the residual add, and RMSNorm(y Q) * g != (RMSNorm(y) * g) Q, so the "
      "output-side rotation cannot be folded into o_proj / down_proj; use rotate='inputs'"
    )
  flat = traverse_util.flatten_dict(params, sep="/")
  if any("residual_" in k or "rotate_" in k for k in flat):
    raise ValueError("params already carry residual rotations (already transformed); transform the original")
  bases = block_bases(
    params, cfg, blocks, basis=basis, calib_windows=calib_windows, basis_sparsity=basis_sparsity
  )
  if rotate == "inputs":
    return _rotate_inputs(params, cfg, flat, bases), cfg
  dtypes = {k: v.dtype for k, v in flat.items()}
  out: dict[str, jax.Array] = {}
  n = cfg.num_hidden_layers
  norms = families.get(cfg.model_type).norms
  emb = _f32(flat["embed_tokens/embedding"])
  out["embed_tokens/embedding"] = _rot_out(emb, bases[(0, "self_attn")])
  for l in range(n):
    p, lp = f"layers/{l}", params["layers"][str(l)]
    qa, qm = bases[(l, "self_attn")], bases[(l, "mlp")]
    q_next = bases[(l + 1, "self_attn")] if l + 1 < n else qm
    for block, q_in, q_out in (("self_attn", qa, qm), ("mlp", qm, q_next)):
      norm = norms[block][0]
      g = _f32(lp[norm]["scale"]) + cfg.norm_offset
      out[f"{p}/{norm}/scale"] = _unit_scale(g, cfg)
      *ins, last = S.block_sites(cfg, block)
      for proj in ins:
        out[f"{p}/{block}/{proj}/kernel"] = _rot_in(q_in, g[:, None] * _f32(lp[block][proj]["kernel"]))
      for kind in ("kernel", "bias"):
        if kind in lp[block][last]:
          out[f"{p}/{block}/{last}/{kind}"] = _rot_out(_f32(lp[block][last][kind]), q_out)
      shortcut = _shortcut(q_in, q_out)
      if shortcut is not None:
        key = f"{p}/residual_{'attn' if block == 'self_attn' else 'mlp'}/kernel"
        out[key], dtypes[key] = _f32(shortcut), dtypes["embed_tokens/embedding"]
  g = _f32(flat["norm/scale"]) + cfg.norm_offset
  out["norm/scale"] = _unit_scale(g, cfg)
  head = emb.T if cfg.tie_word_embeddings else _f32(flat["lm_head/kernel"])
  out["lm_head/kernel"] = _rot_in(bases[(n - 1, "mlp")], g[:, None] * head)
  dtypes.setdefault("lm_head/kernel", dtypes["embed_tokens/embedding"])
  for k, v in flat.items():  # biases of q/k/v and gate/up are on the output side: unchanged
    out.setdefault(k, v)
  new = traverse_util.unflatten_dict({k: jnp.asarray(v, dtypes[k]) for k, v in out.items()}, sep="/")
  return new, cfg.replace(tie_word_embeddings=False)


def _unit_scale(g: jax.Array, cfg: ModelConfig) -> jax.Array:
  """The norm scale whose gain (`norm_offset` + scale) is 1."""
  return jnp.full_like(g, 1.0 - cfg.norm_offset)


def _rotate_inputs(params: dict, cfg: ModelConfig, flat: dict, bases: dict) -> dict:
  """rotate='inputs': per transformed block, x = RMSNorm(h) (unit gain) is rotated by `rotate_<b>` = Q and
  its input kernels become Q^T diag(g) K; the residual stream, output projections, post-norms, embedding
  and lm_head are unchanged (the block's output never left the original basis), so any norm after the
  block is untouched. The sites see x Q, as with 'residual'; the cost is one dense [d, d] per block."""
  out = dict(flat)
  norms = families.get(cfg.model_type).norms
  for (l, block), q in bases.items():
    if q is None:
      continue
    p, lp = f"layers/{l}", params["layers"][str(l)]
    norm = norms[block][0]
    g = _f32(lp[norm]["scale"]) + cfg.norm_offset
    out[f"{p}/{norm}/scale"] = _unit_scale(g, cfg).astype(flat[f"{p}/{norm}/scale"].dtype)
    for proj in S.block_sites(cfg, block)[:-1]:
      w = lp[block][proj]["kernel"]
      out[f"{p}/{block}/{proj}/kernel"] = _rot_in(q, g[:, None] * _f32(w)).astype(w.dtype)
    key = f"{p}/rotate_{'attn' if block == 'self_attn' else 'mlp'}/kernel"
    out[key] = _f32(q).astype(flat["embed_tokens/embedding"].dtype)
  return traverse_util.unflatten_dict(out, sep="/")


def shortcut_cost(params: dict, cfg: ModelConfig, base_cfg: Optional[ModelConfig] = None) -> dict:
  """Extra inference cost of the residual (or input) rotations in `params`, per token.

  Returns {'shortcuts': count, 'flops': 2 d^2 per shortcut, 'bytes': their weights, 'linear_flops' and
  'param_bytes' of the whole model, the fractions 'flops_frac' / 'bytes_frac', and 'untie_bytes': the new
  lm_head when `base_cfg` (the config before the transform) had tied embeddings}.
  """
  flat = traverse_util.flatten_dict(params, sep="/")
  rots = [v for k, v in flat.items() if "/residual_" in k or "/rotate_" in k]
  d = cfg.hidden_size
  flops = 2 * d * d * len(rots)
  nbytes = sum(int(v.size) * v.dtype.itemsize for v in rots)
  linear = 2 * (sum(S.site_param_counts(cfg).values()) + d * cfg.vocab_size)
  total = sum(int(v.size) * v.dtype.itemsize for v in flat.values())
  emb = flat["embed_tokens/embedding"]
  untie = (
    int(emb.size) * emb.dtype.itemsize
    if base_cfg is not None and base_cfg.tie_word_embeddings and not cfg.tie_word_embeddings
    else 0
  )
  return {
    "shortcuts": len(rots),
    "flops": flops,
    "bytes": nbytes,
    "linear_flops": linear,
    "param_bytes": total,
    "flops_frac": flops / linear,
    "bytes_frac": nbytes / total,
    "untie_bytes": untie,
  }

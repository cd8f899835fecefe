"""The transform's free choice: a basis of the key kernel's null space (`transform(..., basis=)`).

When a block's key kernel K [d, n] has rank r < d (GQA k_proj: n = kv_dim < d), its SVD K = U S V^T fixes
U's first r columns (up to signs) but not the last d - r: any orthonormal basis N of the null space of K^T
keeps Q = [U_r, N] orthogonal with Q^T K = [S V^T; 0]. N decides the coordinates the block's inputs are
sparsified in (every site reading the block's input: q/k/v or gate/up). Options (`BASES`):

  svd      LAPACK's own choice (`numpy.linalg.svd`): arbitrary, and it changes with the LAPACK build.
  axis     the basis of the null space closest to the original coordinate axes: the m = d - r axes with the
           largest projection onto the null space (row norms of N), then the orthogonal Procrustes rotation
           N R minimising ||N R - E_S||_F (E_S: those axes). That is the symmetric (Loewdin)
           orthonormalisation of the projected axes N N^T e_i, so no axis is favoured by an order, unlike
           Gram-Schmidt. Magnitude scores then see (nearly) the original, heavy-tailed coordinates.
  learned  the axis basis rotated by R = expm(A - A^T) in O(m), A fitted with optax (Adam) to minimise
           `objective`: the relative output error of the block's input-reading sites when each token keeps
           its top-k coordinates by magnitude (|x|: TEAL's score, and WINA's at q/v), on calibration
           activations. The mask is piecewise constant in R, so the gradient flows through the kept values
           only (straight-through); the best R seen (the init included) is returned, so the objective never
           rises above the axis basis's on the fitting data.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from wina_jax.sparsity.base import keep_count

BASES = ("svd", "axis", "learned")
HI = jax.lax.Precision.HIGHEST


def check_basis(basis: str) -> str:
  if basis not in BASES:
    raise ValueError(f"unknown basis {basis!r}; choose from {BASES} (see wina_jax.bases)")
  return basis


def null_rank(singular_values: np.ndarray, shape: tuple) -> int:
  """Numerical rank of a kernel with these singular values (numpy's matrix_rank tolerance)."""
  s = np.asarray(singular_values)
  return int((s > s.max(initial=0.0) * max(shape) * np.finfo(np.float64).eps).sum())


def axis_basis(null: np.ndarray) -> np.ndarray:
  """[d, m] orthonormal basis of span(null) (null [d, m] orthonormal) closest to m coordinate axes."""
  null = np.asarray(null, np.float64)
  m = null.shape[1]
  axes = np.sort(np.argsort(-np.linalg.norm(null, axis=1), kind="stable")[:m])
  u, _, vt = np.linalg.svd(null[axes].T)  # null^T E_S = null[axes]^T  [m, m]
  return null @ (u @ vt)


def axis_alignment(vectors: np.ndarray) -> float:
  """Mean over the columns of `vectors` [d, m] (unit norm) of the largest |component|^2: 1 when every
  column is a coordinate axis, about 2 log(d) / d for random directions."""
  v = np.asarray(vectors, np.float64)
  return float(np.mean(np.max(v * v, axis=0)))


def _rotation(a: jax.Array) -> jax.Array:
  return jax.scipy.linalg.expm(a - a.T)


def _gram(kernels: Sequence) -> jax.Array:
  """G = sum_j W_j W_j^T [d, d]: sum_j ||y W_j||^2 = y G y^T for any row y in original coordinates."""
  return sum(jnp.matmul(w, w.T, precision=HI) for w in (jnp.asarray(w, jnp.float32) for w in kernels))


def _loss(
  x: jax.Array,
  fixed: jax.Array,
  null: jax.Array,
  gram: jax.Array,
  rot: jax.Array,
  k: int,
  straight_through: bool,
) -> jax.Array:
  """Relative top-k output error of x [N, d] in the basis Q = [fixed, null rot] over the kernels behind
  `gram` (`_gram`, original coordinates, gains folded): sum ||(x Q - keep(x Q)) Q^T W_j||^2 over
  sum ||x W_j||^2."""
  q = jnp.concatenate([fixed, jnp.matmul(null, rot, precision=HI)], axis=1)
  xq = jnp.matmul(x, q, precision=HI)
  mag = jnp.abs(jax.lax.stop_gradient(xq) if straight_through else xq)
  kth = jax.lax.top_k(mag, k)[0][:, -1:]
  dropped = jnp.matmul(jnp.where(mag >= kth, 0.0, xq), q.T, precision=HI)  # back in original coordinates
  err = jnp.sum(jnp.matmul(dropped, gram, precision=HI) * dropped)
  return err / jnp.sum(jnp.matmul(x, gram, precision=HI) * x)


def objective(x, basis: np.ndarray, rank: int, kernels: Sequence, sparsity: float) -> float:
  """`_loss` of a full basis [d, d] (its first `rank` columns fixed) on inputs x [N, d] at `sparsity`."""
  b = jnp.asarray(basis, jnp.float32)
  m = b.shape[1] - rank
  return float(
    _loss(
      jnp.asarray(x, jnp.float32),
      b[:, :rank],
      b[:, rank:],
      _gram(kernels),
      jnp.eye(m, dtype=jnp.float32),
      keep_count(sparsity, b.shape[0]),
      False,
    )
  )


def learned_basis(
  x,
  fixed: np.ndarray,
  null: np.ndarray,
  kernels: Sequence,
  *,
  sparsity: float = 0.5,
  steps: int = 60,
  learning_rate: float = 1e-2,
  seed: int = 0,
) -> tuple[np.ndarray, dict]:
  """Fit R in O(m) for the null basis `null` [d, m] (the `axis_basis` init) on inputs x [N, d]
  (RMS-normalised, original coordinates), with `fixed` [d, r] the kernel's range basis and `kernels` the
  block's input-reading kernels [d, n_j] (gains folded). -> (null @ R [d, m] float64,
  {'init': objective at R = I, 'best': objective of the returned R, 'steps': steps run})."""
  import optax

  null64 = np.asarray(null, np.float64)
  x = jnp.asarray(x, jnp.float32)
  fixed, null = jnp.asarray(fixed, jnp.float32), jnp.asarray(null, jnp.float32)
  gram = _gram(kernels)
  m, k = null.shape[1], keep_count(sparsity, x.shape[1])
  # a tiny random start breaks the symmetry of A = 0 (where the skew part's gradient can vanish)
  a = 1e-4 * jax.random.normal(jax.random.PRNGKey(seed), (m, m), jnp.float32)
  opt = optax.adam(learning_rate)
  state = opt.init(a)
  # the straight-through loss has the true loss as its value: one call per step gives both
  step_fn = jax.jit(jax.value_and_grad(lambda a: _loss(x, fixed, null, gram, _rotation(a), k, True)))
  init = float(_loss(x, fixed, null, gram, jnp.eye(m, dtype=jnp.float32), k, False))
  best, best_a = init, None
  for _ in range(steps + 1):
    loss, g = step_fn(a)
    if float(loss) < best:
      best, best_a = float(loss), a
    updates, state = opt.update(g, state)
    a = optax.apply_updates(a, updates)
  if best_a is None:
    return null64, {"init": init, "best": init, "steps": steps}
  rot = np.asarray(_rotation(best_a), np.float64)
  # re-orthonormalise in float64 (the float32 expm is orthogonal to ~1e-6)
  out = np.linalg.qr(null64 @ rot)[0]
  out *= np.sign(np.sum(out * (null64 @ rot), axis=0))
  return out, {"init": init, "best": best, "steps": steps}

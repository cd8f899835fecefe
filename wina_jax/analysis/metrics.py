"""Per-site error metrics: masked-input output error, WINA's Lemma 3.1 value, orthogonality defect, KL.

Notation: a site's kernel K [d_in, d_out] (torch W = K^T), its input x [..., d_in] and the masked input
xs. The output error is ||(x - xs) K||^2; Lemma 3.1 (WINA) drops the cross terms between the rows c_i of
K (torch columns): sum_i (x_i - xs_i)^2 ||c_i||^2. The two agree exactly when K has orthogonal rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HI = jax.lax.Precision.HIGHEST


def column_orthogonality_defect(kernel) -> float:
  """Off-diagonal over diagonal energy of the Gram matrix of W's columns (K's rows), in float64.

  kernel: [d_in, d_out]. sum_{i != j} G_ij^2 / sum_i G_ii^2 with G = K K^T: 0 for orthogonal columns.
  ||K K^T||_F = ||K^T K||_F, so the smaller Gram is formed; rounding below ~1e-15 is clipped to 0.
  """
  k = np.asarray(kernel, np.float64)
  diag = float(np.sum(np.sum(k * k, axis=1) ** 2))
  g = k @ k.T if k.shape[0] <= k.shape[1] else k.T @ k
  return max(float(np.sum(g * g)) - diag, 0.0) / diag


@jax.jit
def error_sums(x: jax.Array, xs: jax.Array, kernel: jax.Array) -> dict[str, jax.Array]:
  """Sums over tokens, float32 at full precision. x, xs: [..., d_in]; kernel: [d_in, d_out].

  Returns {'ref': sum ||x K||^2, 'actual': sum ||(x - xs) K||^2, 'lemma': sum_i (x_i - xs_i)^2 ||c_i||^2,
  'dropped': fraction of entries of x zeroed by the mask}.
  """
  x, xs, kernel = (a.astype(jnp.float32) for a in (x, xs, kernel))
  diff = x - xs
  c2 = jnp.sum(kernel * kernel, axis=1)
  return {
    "ref": jnp.sum(jnp.square(jnp.matmul(x, kernel, precision=HI))),
    "actual": jnp.sum(jnp.square(jnp.matmul(diff, kernel, precision=HI))),
    "lemma": jnp.sum(jnp.square(diff) * c2),
    "dropped": jnp.mean(((xs == 0) & (x != 0)).astype(jnp.float32)),
  }


def logit_kl(dense_logits: jax.Array, logits: jax.Array) -> float:
  """Mean over tokens of KL(p_dense || p) in nats. Both: [B, T, vocab]."""
  lp = jax.nn.log_softmax(dense_logits.astype(jnp.float32), axis=-1)
  lq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), axis=-1)))

"""A sparsification method in its own module (notebooks/03_custom_sparsifier.ipynb): importing it registers
`wina_pow`, so the scripts take it with `--methods_module=my_methods` and the lm-eval model with
`methods_module=my_methods` (this folder on PYTHONPATH), no edit of the package.
"""

import dataclasses

import jax.numpy as jnp

from wina_jax import sites as S
from wina_jax import sparsity


@sparsity.register("wina_pow")
@dataclasses.dataclass(frozen=True)
class WinaPow(sparsity.Method):
  """Keep the largest |x_i| * c_i**p at every linear site (p=0: TEAL; p=1: WINA, c_sites='all')."""

  p: float = 1.0

  def state(self, params, cfg):
    # c_i**p, computed once from the weights; the sparsifier carries it as traced state
    return {s: sparsity.column_norms(S.site_kernel(params, s)) ** self.p for s in self.sites(cfg)}

  def score(self, site, x, state):
    return jnp.abs(x) * state.astype(x.dtype)

  def fast_scale(self, site, state):
    # the score is |x| * scale with scale = c**p: the fast decode kernels compute exactly this
    return sparsity.FastScale(scale=state)

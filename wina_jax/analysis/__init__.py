"""Layer-by-layer error analysis of activation sparsity: actual error, Lemma 3.1 value, orthogonality."""

from wina_jax.analysis.errors import (
  dense_run,
  isolated,
  orthogonality_defects,
  propagated,
  site_errors,
  site_input,
)
from wina_jax.analysis.metrics import column_orthogonality_defect, error_sums, logit_kl

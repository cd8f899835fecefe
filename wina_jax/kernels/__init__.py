"""Fast sparse decode kernels: the fused threshold linear (Pallas GPU / XLA) and its sparsifier."""

from wina_jax.kernels.config import MAX_ROWS, KernelConfig
from wina_jax.kernels.masked_linear import masked_linear, pick_backend
from wina_jax.kernels.reference import keep_mask, masked_linear_xla
from wina_jax.kernels.sparsifier import FusedThresholdSparsifier

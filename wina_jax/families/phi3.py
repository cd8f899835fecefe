"""Phi-3 / Phi-4: fused `qkv_proj` [d, (H + 2K) hd] (q|k|v) and `gate_up_proj` [d, 2 I] (gate|up).

The transform's key kernels are the k and gate column ranges of the fused kernels (`Family.locate`).
"""

from __future__ import annotations

from wina_jax.families.base import Family, register, window


def config_kwargs(d) -> dict:
  return dict(sliding_window=window(d), fused_qkv=True, fused_gate_up=True)


PHI3 = register(
  Family(
    name="phi3",
    config_kwargs=config_kwargs,
    hf_fields=frozenset({"sliding_window", "resid_pdrop", "embd_pdrop", "original_max_position_embeddings"}),
  )
)

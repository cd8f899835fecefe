"""Model families, one module each (`llama`, `mistral`, `qwen2`, `phi3`, `gemma3` for 'gemma3_text'),
registered by HF `model_type`.

To add a family, write `wina_jax/families/<name>.py` that calls `register(Family(...))` (see
`base.Family` for what it declares), import it below, and add its tiny-config parity test.
"""

from wina_jax.families import gemma3, llama, mistral, phi3, qwen2  # noqa: F401  (registers the families)
from wina_jax.families.base import Family, for_gguf_arch, get, known, register


def proj_shapes(cfg) -> dict[str, dict[str, tuple[int, int]]]:
  """{block: {proj: (d_in, d_out)}} of one layer of `cfg` in forward order (fused where `cfg` says)."""
  return get(cfg.model_type).proj_shapes(cfg)


def key_projections() -> frozenset[str]:
  """Projection names, over all families, whose kernels the WINA transform orthogonalises (k_proj,
  gate_proj) and the fused projections holding them (qkv_proj, gate_up_proj)."""
  out = set()
  for name in known():
    fam = get(name)
    out |= set(fam.key_projs.values())
    out |= {fused for block, (fused, parts) in fam.fused.items() if fam.key_projs.get(block) in parts}
  return frozenset(out)


def input_group(proj: str) -> str:
  """The projection naming `proj`'s input group: the parts of a fused projection, and the fused one, read
  the same input (q/k/v, qkv -> q_proj; gate/up, gate_up -> gate_proj); other projections are alone."""
  for name in known():
    for fused, parts in get(name).fused.values():
      if proj == fused or proj in parts:
        return parts[0]
  return proj


__all__ = [
  "Family",
  "for_gguf_arch",
  "get",
  "input_group",
  "key_projections",
  "known",
  "proj_shapes",
  "register",
]

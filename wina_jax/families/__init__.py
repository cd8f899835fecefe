"""Model families, one module each (`llama`, `mistral`, `qwen2`, `phi3`), registered by HF `model_type`.

To add a family, write `wina_jax/families/<name>.py` that calls `register(Family(...))` (see
`base.Family` for what it declares), import it below, and add its tiny-config parity test.
"""
from wina_jax.families.base import BLOCKS, FUSED, Family, for_gguf_arch, get, known, register
from wina_jax.families import llama, mistral, phi3, qwen2  # noqa: F401  (registers the families)


def proj_shapes(cfg) -> dict[str, dict[str, tuple[int, int]]]:
  """{block: {proj: (d_in, d_out)}} of one layer of `cfg` in forward order (fused where `cfg` says)."""
  return get(cfg.model_type).proj_shapes(cfg)


__all__ = ["BLOCKS", "FUSED", "Family", "for_gguf_arch", "get", "known", "proj_shapes", "register"]

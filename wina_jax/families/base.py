"""`Family`: everything the generic code asks of one HF `model_type`, and the registry of families.

The generic code (config conversion, name maps, sharding, transform, sites, decode, FLOPs) never
branches on `model_type`; it calls `get(cfg.model_type)` and reads the family's declarations. The
tables shared by the Llama-style families (`HF_RULES`, `GGUF_RULES`, `SHARDING_RULES`, `ROPE_KEYS`,
`FUSED`) live here; a family module passes them (or its own) to `Family`.

`proj_shapes(cfg)` is the one source of truth for the linear layers:
{block: {projection: (d_in, d_out)}} in forward order, fused projections where `cfg` says so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
  from wina_jax.config import ModelConfig

ProjShapes = dict[str, dict[str, tuple[int, int]]]

# HF tensor names -> params paths: (regex on the source name, target path template, hook). Hooks:
# 'linear' transposes a torch [out, in] weight into a Flax [in, out] kernel; 'copy' keeps the array.
HF_RULES = (
  (r"model\.embed_tokens\.weight", "embed_tokens/embedding", "copy"),
  (r"model\.norm\.weight", "norm/scale", "copy"),
  (r"lm_head\.weight", "lm_head/kernel", "linear"),
  (
    r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight",
    "layers/{0}/{1}/scale",
    "copy",
  ),
  (r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.weight", "layers/{0}/{1}/{2}/kernel", "linear"),
  (r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.bias", "layers/{0}/{1}/{2}/bias", "copy"),
)

# GGUF (llama.cpp) tensor names -> HF names, for the unfused llama layout.
GGUF_RULES = (
  (r"token_embd\.weight", "model.embed_tokens.weight"),
  (r"output_norm\.weight", "model.norm.weight"),
  (r"output\.weight", "lm_head.weight"),
  (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
  (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
  (r"blk\.(\d+)\.attn_q\.(weight|bias)", "model.layers.{0}.self_attn.q_proj.{1}"),
  (r"blk\.(\d+)\.attn_k\.(weight|bias)", "model.layers.{0}.self_attn.k_proj.{1}"),
  (r"blk\.(\d+)\.attn_v\.(weight|bias)", "model.layers.{0}.self_attn.v_proj.{1}"),
  (r"blk\.(\d+)\.attn_output\.weight", "model.layers.{0}.self_attn.o_proj.weight"),
  (r"blk\.(\d+)\.ffn_gate\.weight", "model.layers.{0}.mlp.gate_proj.weight"),
  (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{0}.mlp.up_proj.weight"),
  (r"blk\.(\d+)\.ffn_down\.weight", "model.layers.{0}.mlp.down_proj.weight"),
)

# Tensor-parallel partition rules: (path regex, candidate logical specs in order of preference, the
# config attribute giving the granularity of the TP dim). TP -> mesh axis 'model', FSDP -> 'data' or none;
# `wina_jax.sharding` resolves them (Megatron layout, see its docstring).
TP, FSDP = "tp", "fsdp"
SHARDING_RULES = (
  (r"embed_tokens/embedding", ((TP, FSDP), (FSDP, TP)), None),
  (r"lm_head/kernel", ((FSDP, TP), (TP, FSDP)), None),
  (r"self_attn/(q|k|v|qkv)_proj/kernel", ((FSDP, TP),), "head_dim"),
  (r"self_attn/(q|k|v|qkv)_proj/bias", ((TP,),), "head_dim"),
  (r"self_attn/o_proj/kernel", ((TP, FSDP),), "head_dim"),
  (r"mlp/(gate|up|gate_up)_proj/kernel", ((FSDP, TP),), None),
  (r"mlp/(gate|up|gate_up)_proj/bias", ((TP,),), None),
  (r"mlp/down_proj/kernel", ((TP, FSDP),), None),
  (r"(o_proj|down_proj)/bias", ((None,),), None),
  (r"(residual|rotate)_(attn|mlp)/kernel", ((TP, FSDP),), None),
  (r"(layernorm|norm)/scale", ((None,),), None),
)

# rope_type -> the rope_parameters keys it reads (the frequencies are computed in `wina_jax.layers`).
ROPE_KEYS = {
  "default": frozenset({"rope_type", "rope_theta", "partial_rotary_factor"}),
  "linear": frozenset({"rope_type", "rope_theta", "partial_rotary_factor", "factor"}),
}

# The fused decode layout: per block, the fused projection and the parts it concatenates (output dim).
FUSED = {
  "self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
  "mlp": ("gate_up_proj", ("gate_proj", "up_proj")),
}
_FUSED_FLAG = {"self_attn": "fused_qkv", "mlp": "fused_gate_up"}

# block -> (the RMSNorm before it, the RMSNorm of its output before the residual add or None): params
# names under `layers/<i>/`. Llama-style blocks are pre-norm only.
PRE_NORMS = {"self_attn": ("input_layernorm", None), "mlp": ("post_attention_layernorm", None)}


def llama_layout(cfg: ModelConfig) -> ProjShapes:
  """Unfused {block: {proj: (d_in, d_out)}} of a Llama-style layer, in forward order."""
  d, q, kv, i = cfg.hidden_size, cfg.q_dim, cfg.kv_dim, cfg.intermediate_size
  return {
    "self_attn": {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d)},
    "mlp": {"gate_proj": (d, i), "up_proj": (d, i), "down_proj": (i, d)},
  }


def window(d: Mapping[str, Any]) -> Optional[int]:
  """The one sliding window of an HF config dict (None: full attention); mixed layer kinds raise."""
  types = set(d.get("layer_types") or ["full_attention"])
  if len(types) > 1:
    raise ValueError(f"layer_types {sorted(types)} (mixed attention kinds) are not supported")
  return d.get("sliding_window")


@dataclasses.dataclass(frozen=True)
class Family:
  """One HF `model_type`: its config whitelist, name maps, sharding rules, layout and transform keys.

  name: the HF `model_type`.
  hf_fields: HF config fields of this family beyond the shared whitelist in `wina_jax.convert.hf_config`
    (read by `config_kwargs`, or irrelevant at inference).
  config_kwargs: HF config dict -> the `ModelConfig` fields the family decides (biases, window, fusion).
  rope_types: rope_type -> rope_parameters keys it reads.
  layout: cfg -> unfused {block: {proj: (d_in, d_out)}} in forward order.
  fused: block -> (fused projection, its parts in output order), the layout `cfg.fused_*` selects.
  key_projs: block -> the projection whose kernel the WINA transform orthogonalises.
  hf_rules / gguf_rules / sharding_rules: tensor name maps and partition rules (see the tables above).
  gguf_arch: llama.cpp's `general.architecture` read as this family (None: no GGUF support).
  gguf_permuted_qk: whether llama.cpp's converter interleaved q/k rows (undone on load).
  norms: block -> (pre-norm, post-norm or None), the params names of the block's RMSNorms (`PRE_NORMS`).
  gguf_norm_shift: subtracted from every GGUF norm weight on load (llama.cpp stores Gemma's gains as 1 + w).
  """

  name: str
  config_kwargs: Callable[[Mapping[str, Any]], dict]
  hf_fields: frozenset = frozenset()
  rope_types: Mapping[str, frozenset] = dataclasses.field(default_factory=lambda: dict(ROPE_KEYS))
  layout: Callable[[ModelConfig], ProjShapes] = llama_layout
  fused: Mapping[str, tuple[str, tuple[str, ...]]] = dataclasses.field(default_factory=lambda: dict(FUSED))
  key_projs: Mapping[str, str] = dataclasses.field(
    default_factory=lambda: {"self_attn": "k_proj", "mlp": "gate_proj"}
  )
  hf_rules: tuple = HF_RULES
  gguf_rules: tuple = GGUF_RULES
  sharding_rules: tuple = SHARDING_RULES
  gguf_arch: Optional[str] = None
  gguf_permuted_qk: bool = False
  norms: Mapping[str, tuple[str, Optional[str]]] = dataclasses.field(default_factory=lambda: dict(PRE_NORMS))
  gguf_norm_shift: float = 0.0

  @property
  def source(self) -> str:
    """The family's file, e.g. 'wina_jax/families/llama.py' (where its declarations live)."""
    return self.config_kwargs.__module__.replace(".", "/") + ".py"

  @property
  def post_norms(self) -> bool:
    """Whether a block's output is normalised before the residual add (Gemma's sandwich norms)."""
    return any(post is not None for _, post in self.norms.values())

  def is_fused(self, cfg: ModelConfig, block: str) -> bool:
    return block in self.fused and getattr(cfg, _FUSED_FLAG[block])

  def proj_shapes(self, cfg: ModelConfig) -> ProjShapes:
    """{block: {proj: (d_in, d_out)}} of one layer in forward order; fused where `cfg` says so."""
    out = {}
    for block, shapes in self.layout(cfg).items():
      if self.is_fused(cfg, block):
        fused, parts = self.fused[block]
        d_in = shapes[parts[0]][0]
        merged = {fused: (d_in, sum(shapes[p][1] for p in parts))}
        shapes = {**merged, **{p: s for p, s in shapes.items() if p not in parts}}
      out[block] = shapes
    return out

  def segments(self, cfg: ModelConfig, block: str, proj: str) -> tuple[int, ...]:
    """Output widths of a stored projection: its parts' widths if fused, else its one width."""
    shapes = self.layout(cfg)[block]
    if block in self.fused and proj == self.fused[block][0]:
      return tuple(shapes[p][1] for p in self.fused[block][1])
    return (self.proj_shapes(cfg)[block][proj][1],)

  def locate(self, cfg: ModelConfig, block: str, proj: str) -> tuple[str, slice]:
    """(stored projection, its output columns) holding the unfused projection `proj`."""
    if self.is_fused(cfg, block):
      fused, parts = self.fused[block]
      if proj in parts:
        widths = self.segments(cfg, block, fused)
        start = sum(widths[: parts.index(proj)])
        return fused, slice(start, start + widths[parts.index(proj)])
    width = self.proj_shapes(cfg)[block][proj][1]
    return proj, slice(0, width)


_FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
  """Adds `family` to the registry under its name (a family module calls this once at import)."""
  old = _FAMILIES.get(family.name)
  if old is not None and old.config_kwargs.__module__ != family.config_kwargs.__module__:  # reloads replace
    raise ValueError(f"model family {family.name!r} is already registered by {old.config_kwargs.__module__}")
  _FAMILIES[family.name] = family
  return family


def known() -> tuple[str, ...]:
  """Names (HF model_types) of the registered families."""
  return tuple(_FAMILIES)


def get(model_type: str) -> Family:
  """The family of an HF `model_type`; raises naming the supported ones."""
  if model_type not in _FAMILIES:
    raise ValueError(
      f"model_type {model_type!r} is not supported; expected one of {known()} "
      "(to add one, write wina_jax/families/<name>.py and its parity test)"
    )
  return _FAMILIES[model_type]


def for_gguf_arch(arch: str) -> Family:
  """The family that reads GGUF files of llama.cpp architecture `arch`."""
  fams = [f for f in _FAMILIES.values() if f.gguf_arch == arch]
  if not fams:
    raise ValueError(
      f"GGUF architecture {arch!r} is not supported; supported: "
      f"{sorted(f.gguf_arch for f in _FAMILIES.values() if f.gguf_arch)}"
    )
  return fams[0]

"""Declarative name maps: HF / GGUF tensor names -> params paths, with a per-tensor hook.

The rule tables belong to the model family (`Family.hf_rules`, `Family.gguf_rules`; the shared Llama-style
ones are in `wina_jax.families.base`). Each HF rule is (regex on the source name, target path template,
hook). Hooks: 'linear' transposes a torch [out, in] weight into a Flax [in, out] kernel; 'copy' keeps it.
"""

from __future__ import annotations

import re

import numpy as np

from wina_jax.families import Family

HOOKS = {"copy": lambda a: a, "linear": lambda a: np.ascontiguousarray(a.T)}


def _match(rules, name: str):
  for rule in rules:
    m = re.fullmatch(rule[0], name)
    if m:
      return m, rule
  return None, None


def hf_target(name: str, family: Family) -> tuple[str, str] | None:
  """('layers/3/mlp/down_proj/kernel', 'linear') for an HF tensor name, None for ignorable buffers."""
  m, rule = _match(family.hf_rules, name)
  if m is None:
    if name.endswith("rotary_emb.inv_freq"):
      return None
    raise KeyError(
      f"tensor {name!r} has no mapping into wina_jax params for model_type {family.name!r}; "
      f"add a rule to {family.source}"
    )
  return rule[1].format(*m.groups()), rule[2]


def gguf_to_hf(name: str, family: Family) -> str | None:
  """HF name of a GGUF tensor; None for tensors with no HF counterpart (e.g. rope_freqs)."""
  m, rule = _match(family.gguf_rules, name)
  if m is None:
    if name in ("rope_freqs.weight",):
      return None
    raise KeyError(
      f"GGUF tensor {name!r} has no mapping for GGUF architecture {family.gguf_arch!r}; "
      f"add a rule to {family.source}"
    )
  return rule[1].format(*m.groups())

"""Mistral: the Llama layout with one sliding attention window for every layer."""

from __future__ import annotations

from wina_jax.families.base import Family, register, window


def config_kwargs(d) -> dict:
  return dict(sliding_window=window(d))


MISTRAL = register(
  Family(name="mistral", config_kwargs=config_kwargs, hf_fields=frozenset({"sliding_window"}))
)

"""Run the dense model one decoder layer at a time with a single compiled layer function.

Calibration and allocation only need each layer's inputs and outputs, so they compile one layer (with
its sites renamed to layer 0) and reuse it for every layer instead of compiling the whole model. Layer i
runs as layer 0 of `cfg.layer_config(i)`, its own window and rope (Gemma's local / global layers): one
compile per distinct layer config. The residual entering layer 0 is `model.embed_tokens` (scaled embedding).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Optional

import jax

from wina_jax import families
from wina_jax import sites as S
from wina_jax.config import ModelConfig
from wina_jax.model import decoder_layer, decoder_layer_aux, embed_tokens


def local_site(site: str) -> str:
  """'layers.7.mlp.up_proj' -> 'layers.0.mlp.up_proj' (the name inside the shared layer function)."""
  _, block, proj = S.parse_site(site)
  return S.site_name(0, block, proj)


def layer_sites(sites, layer: int) -> list[str]:
  return [s for s in sites if S.parse_site(s)[0] == layer]


def local_state(state: dict, sites) -> dict:
  """The part of a per-site state dict for `sites` (one layer), renamed to layer 0."""
  return {local_site(s): state[s] for s in sites if s in state}


def input_group(site: str) -> str:
  """Sites reading the same input share a group: q/k/v (or qkv), gate/up (or gate_up); others alone."""
  return families.input_group(S.parse_site(site)[2])


@functools.partial(jax.jit, static_argnames=("cfg",))
def dense_layer(lp: dict, h: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Output residual [B, T, d] of one dense layer for its input residual `h` [B, T, d]; cfg:
  `cfg.layer_config(i)` of layer i."""
  return decoder_layer(cfg, lp, h, 0)


@functools.partial(jax.jit, static_argnames=("cfg",))
def sparse_layer(lp: dict, h: jax.Array, sparsifier, cfg: ModelConfig) -> jax.Array:
  """`dense_layer` with a pytree sparsifier keyed by layer-0 site names (see `local_site`); cfg:
  `cfg.layer_config(i)` of layer i."""
  return decoder_layer(cfg, lp, h, 0, sparsifier)


def residuals(params: dict, cfg: ModelConfig, tokens, upto: Optional[int] = None) -> Iterator[tuple]:
  """Yield (layer, residual entering it [B, T, d]) for layers 0 .. upto-1 of the dense model."""
  h = embed_tokens(params, tokens, cfg)
  for layer in range(cfg.num_hidden_layers if upto is None else upto):
    yield layer, h
    h = dense_layer(params["layers"][str(layer)], h, cfg.layer_config(layer))


def localize(sparsifier, layer: int):
  """The part of a `ScoreSparsifier` for one layer, renamed to layer 0 (for the shared layer function)."""
  mine = lambda site: S.parse_site(site)[0] == layer
  return sparsifier.replace(
    k={local_site(s): k for s, k in sparsifier.k.items() if mine(s)},
    thresholds={local_site(s): t for s, t in sparsifier.thresholds.items() if mine(s)},
    state={local_site(s): v for s, v in sparsifier.state.items() if mine(s)},
  )


@functools.partial(jax.jit, static_argnames=("cfg",))
def _counted_layer(lp, h, sparsifier, cfg):
  h, aux = decoder_layer_aux(cfg, lp, h, 0, sparsifier, collect=("zero_frac",))
  return h, aux["zero_frac"]


def zero_frac(params: dict, cfg: ModelConfig, sparsifier, tokens) -> dict:
  """{site: fraction of zeroed inputs} of a `ScoreSparsifier` over `tokens` [B, T], every token sparse:
  what `forward(..., collect=("zero_frac",))` reports, with one compiled layer instead of the model."""
  out = {}
  h = embed_tokens(params, tokens, cfg)
  for layer in range(cfg.num_hidden_layers):
    lp = params["layers"][str(layer)]
    h, zf = _counted_layer(lp, h, localize(sparsifier, layer), cfg.layer_config(layer))
    out.update({S.site_name(layer, *S.parse_site(s)[1:]): float(v) for s, v in zf.items()})
  return out

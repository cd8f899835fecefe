"""Static tiling of the sparse GEMV kernel and the rules that pick it."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

MAX_ROWS = 8  # batch*tokens rows the GEMV kernel takes; more rows go to the XLA path
# Rows up to which backend 'auto' picks the kernel. On the H200 (Llama-3-8B shape, TEAL 50 / 65 %) the union
# of masks over 2+ rows keeps 75-100 % of rows and the kernel lost to XLA's mask-then-matmul path at every
# B >= 2 (B = 2: 0.76x / 0.90x vs 0.97x / 0.97x of dense; B = 4: 0.40x vs 0.97x; B = 8: 0.22x vs 0.96x):
# benchmarks/results/bench_decode_h200_{xla_batches,auto_b2,loop_full}.json. 'pallas' still takes up to MAX_ROWS.
AUTO_MAX_ROWS = 1
MODES = ("compact", "masked", "balanced", "indexed")
REDUCES = ("partials", "atomic", "semaphore")
LOOPS = ("dynamic", "prefetch")
ACCS = ("vector", "tile")  # how a GEMV program sums its row tiles (KernelConfig.acc, PersistentConfig.acc)
WORKSPACE_BLOCKS = (
  4096  # column blocks per site in a semaphore workspace (`FusedThresholdSparsifier.workspace`)
)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tiling of `pallas_gemv`.

  mode: 'compact' (each program compacts the kept rows of its chunk, then loads only full row tiles),
    'masked' (TEAL-style: fixed row tiles, dropped rows masked out of the load) or 'balanced' (every
    program scans the whole input and takes the chunk-th share of all kept rows, so programs along K get
    equal full shares, K / chunk of them at 0 % and fewer as sparsity grows; the rest exit after the scan)
    or 'indexed' (the same shares of a kept-row list that XLA compacts once per input before the kernel,
    `pallas_gemv.kept_rows`; no RMSNorm prologue). On the H200 'balanced' and 'indexed' made the decode
    step 1.7-3x slower than 'compact' (benchmarks/results/decode_h200.md, session 7): fewer programs with
    longer chains of dependent loads lose to many short ones.
  chunk: input rows per program (C); block_k: rows per loaded tile (BK); block_n: output columns
    per program (BN); num_warps / num_stages: Triton's.
  reduce: how the split-K partial sums meet. 'partials': each program stores its fp32 partial, XLA
    sums them afterwards (one more kernel, fused into the consumer where XLA can; fastest in the H200
    decode step, session 7); 'atomic': atomic adds into an fp32 output that XLA zeroes
    first (one more kernel, a memset); 'semaphore': each program stores its partial and bumps a counter
    per column block, and the last program of the block sums the partials and writes the output in
    x's dtype, so the site is one launch. It needs a zeroed int32 workspace that the kernel leaves
    zeroed (`sparse_gemv`); without one, `masked_linear` runs 'partials' instead.
  loop: 'compact' mode's row-tile loop over ceil(kept / BK) tiles. 'dynamic' loads and sums one tile
    per step; 'prefetch' pipelines by hand: while tile j is summed, the loads of tile j + 1 and the row
    ids of tile j + 2 are in flight. ('masked' mode walks chunk / BK tiles; Triton pipelines them.)
  dense_at: 'compact' mode's dense fallback (the other modes ignore it). A program whose chunk keeps at
    least dense_at * chunk rows (the union over the batch) skips the compaction and walks the whole chunk
    in contiguous [BK, BN] tiles, dropped rows multiplied by zero, as a dense GEMV does; above 1 never.
  acc: 'vector' sums each loaded [BK, BN] tile over its rows into a [BN] float32 accumulator at every step
    (with the loads laid out along the columns, a reduction across warps each step); 'tile' keeps a
    [BK, BN] float32 accumulator per batch row, adds the products elementwise and reduces over rows once
    at the end (no reduction in the loop, BK * BN / (32 * num_warps) more registers per batch row). Sums in
    another order: equal to float32 rounding.
  pdl_trigger: each program starts with `griddepcontrol.launch_dependents` (`pallas_gemv.launch_dependents`):
    where XLA launches the kernel after this one with programmatic dependent launch (Hopper's PDL), that
    kernel may launch while this one runs and waits inside for its end before it reads. A scheduling hint:
    results are the same bits either way. On the H200 a loss (Llama-3-8B step, 50 %: 3.153 -> 5.273 ms;
    99.9 %: 1.190 -> 1.307; decode_h200.md, session 26): the next kernel's programs take SM slots while the
    GEMV's programs still wait to run.
  """

  mode: str = "compact"
  chunk: int = 512
  block_k: int = 32
  block_n: int = 256
  num_warps: int = 4
  num_stages: int = 2
  reduce: str = "partials"
  loop: str = "dynamic"
  dense_at: float = 0.875
  acc: str = "vector"
  pdl_trigger: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode {self.mode!r} is not one of {MODES}")
    if self.reduce not in REDUCES:
      raise ValueError(f"reduce {self.reduce!r} is not one of {REDUCES}")
    if self.loop not in LOOPS:
      raise ValueError(f"loop {self.loop!r} is not one of {LOOPS}")
    if self.acc not in ACCS:
      raise ValueError(f"acc {self.acc!r} is not one of {ACCS}")
    check_powers_of_two(self, ("chunk", "block_k", "block_n"))
    if not self.dense_at > 0:
      raise ValueError(
        f"dense_at={self.dense_at} must be > 0 (a kept fraction; above 1 turns the fallback off)"
      )
    if self.chunk % self.block_k:
      raise ValueError(f"chunk={self.chunk} must be a multiple of block_k={self.block_k}")


def check_powers_of_two(config, names: Sequence[str]) -> None:
  """ValueError unless each of the tiling fields `names` of `config` is a positive power of two."""
  for name in names:
    v = getattr(config, name)
    if v <= 0 or v & (v - 1):
      raise ValueError(f"{name}={v} must be a positive power of two")


_COUNTS = {3: "three", 4: "four"}


def spec_fields(cls, spec: str, required: int, what: str) -> dict:
  """{field: value} of the dataclass `cls` from `spec`, its fields' values in order, colon-separated, the
  first `required` of them at least: each parsed as its default's type (str, int, float; a bool from true |
  false). ValueError naming `what` and the spec for a wrong count or value."""
  fields = dataclasses.fields(cls)
  parts = spec.split(":")
  if not required <= len(parts) <= len(fields):
    raise ValueError(
      f"{what} {spec!r} is not {':'.join(f.name for f in fields)} (the first {_COUNTS[required]} at least)"
    )

  def value(f, v):
    if not isinstance(f.default, bool):
      return type(f.default)(v)
    if v not in ("true", "false"):
      raise ValueError(f"{f.name}={v!r} is not true | false")
    return v == "true"

  try:
    return {f.name: value(f, v) for f, v in zip(fields, parts)}
  except ValueError as e:
    raise ValueError(f"{what} {spec!r}: {e}") from None


def parse(spec: str) -> KernelConfig:
  """A config from
  'mode:chunk:block_k:block_n[:num_warps[:num_stages[:reduce[:loop[:dense_at[:acc[:pdl_trigger]]]]]]]',
  e.g. 'compact:256:32:256:4:3:partials:prefetch' (KernelConfig's fields in order; the rest default)."""
  return KernelConfig(**spec_fields(KernelConfig, spec, 4, "kernel config"))


def fits(cfg: KernelConfig, d_in: int, segments: Sequence[int]) -> bool:
  """Whether `cfg` tiles a [d_in, sum(segments)] kernel exactly (no ragged tiles)."""
  return d_in % cfg.chunk == 0 and all(w % cfg.block_n == 0 for w in segments)


def resolve(cfg: Optional[KernelConfig], d_in: int, segments: Sequence[int]) -> Optional[KernelConfig]:
  """`cfg` shrunk (chunk, block_n halved) until it tiles the kernel exactly; None if nothing fits."""
  cfg = cfg or KernelConfig()
  while not fits(cfg, d_in, segments):
    if d_in % cfg.chunk:
      if cfg.chunk <= cfg.block_k:
        return None
      cfg = dataclasses.replace(cfg, chunk=cfg.chunk // 2)
    elif cfg.block_n > 16:
      cfg = dataclasses.replace(cfg, block_n=cfg.block_n // 2)
    else:
      return None
  return cfg

"""The persistent layer kernel's tiling (`PersistentConfig`, its colon-separated spec) and the grid-size rules
that keep its grid-wide waits from deadlocking (`check_grid`: every program must be resident at once)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax

from wina_jax.kernels.config import ACCS, check_powers_of_two, spec_fields
from wina_jax.kernels.grid_sync import SPIN_LIMIT

# The most programs per SM check_grid accepts. 2 ran co-resident for every PersistentConfig measured (H200,
# 2026-12-02, 4 and 8 warps); 3-4 depend on the compiled kernel's registers and shared memory (4, with 4 warps
# and block_n 128, did not finish in 2 minutes in session 10, before the waits' watchdog): the watchdog
# (`grid_sync`, `PersistentConfig.spin_limit`) ends such a launch and `check_waits` raises WaitTimeout, so they
# can be tried. More than 4 would need more than 16 warps per SM of the kernel's 4-8.
MAX_PROGRAMS_PER_SM = 4
# how a GEMV tile skips dropped rows and in what order a program walks its tiles (PersistentConfig.mode)
MODES = ("compact", "masked", "resident", "column")
# the modes whose walk prefetches its own loads in registers, num_stages deep (not Triton's pipeliner)
PREFETCH_MODES = ("resident", "column")
PERSISTENT_ACCS = ACCS + ("dot",)  # 'dot': tensor cores ('resident' and 'column' only)


class GridError(ValueError):
  """A grid that could deadlock at a grid-wide wait (more programs than can be resident at once)."""


@dataclasses.dataclass(frozen=True)
class PersistentConfig:
  """Tiling of the persistent layer kernel (one for all four GEMVs).

  chunk (C): input rows per tile, compacted together; block_k (BK): rows per loaded weight tile; block_n
  (BN): output columns per tile; dense_at: a chunk keeping >= dense_at * C rows is read densely (> 1:
  never); block_s: cache slots per step of the attention loop; programs_per_sm: programs assumed
  co-resident per SM (the grid is at most SMs x this); num_warps / num_stages: Triton's.
  mode: 'compact' gathers each chunk's kept rows into a list, then loads [BK, BN] tiles of listed rows (a
  dependent load per tile, trips ~ kept rows); 'masked' walks the chunk's C / BK fixed tiles and masks the
  dropped rows out of each load (TEAL's design: no list, no dependent load, a static trip count that
  Triton can pipeline; dropped rows are not read, as in 'compact'). 'resident' keeps the chunk's masked input
  in registers (no scratch round trip) and reads each [C, BN] tile as C / BK masked [BK, BN] loads (the
  dropped rows masked out) summed elementwise into a [BK, BN] float32 tile, reduced over its rows once per
  tile (BK = C: one load, one reduction; BK < C: a taller tile, the reduction across warps paid once per C
  rows, measured 12-17 % slower at TEAL 50 % in session 16; acc 'vector' / 'tile' do not apply); num_stages
  is its prefetch depth: the next num_stages [BK, BN] loads are in flight, held in registers, while one is
  summed (Triton's own pipeliner, through shared memory, was 7.7 % slower at TEAL 50 %: decode_h200.md,
  session 13).
  'column' walks the tiles column-block-major instead (split-K: a program sums all its chunks of a column
  block in one accumulator and stores one partial per block, not one per tile; the readers add a few partial
  rows, not one per chunk): each tile one masked [C, BN] load as in 'resident', num_stages its prefetch depth,
  acc 'tile' keeping [C, BN] float32 across the block's tiles so that no tile reduces across warps.
  dense_at applies to 'compact' only.
  split: one launch per phase (named persistent_<phase>), the launch boundary standing in for the wait:
  interpret mode's only way to a grid > 1, and on a GPU the per-phase profile (each phase's kernel time).
  acc: 'vector' sums each [BK, BN] weight tile over its rows into a [BN] accumulator every step; 'tile'
  keeps a [BK, BN] float32 accumulator and reduces over rows once per tile (`KernelConfig.acc`); 'dot'
  ('resident' and 'column') hands each tile to the tensor cores as a [16, C] x [C, BN] product with the input
  in row 0 and zeros below (their smallest M), float32 sums: the bf16 unpacking, products and row sums that
  cost each tile ~385 instructions a thread (Nsight Compute, session 15) become a few mma instructions
  (measured slower: Triton moves each tile into the operand layout through shared memory).
  skip_empty ('resident' only): a chunk keeping no row for a segment stores zero partials for its tiles
  without walking them (one max over the chunk's mask; at 99.9 % most chunks, at 50 % none).
  timers: every program records the GPU's global nanosecond clock (low 32 bits) at the start of each phase and
  at its arrival at the next wait, in an extra output (`phase_marks`): the per-phase profile of the one-launch
  kernel itself (zeros in interpret mode; not with split, whose launches a profiler times).
  spin_limit: the watchdog's budget, spins a program may spend in all the waits of one launch before it gives
  up and counts the wait as given up (`grid_sync.check_waits` raises on it): a grid that was not co-resident
  then ends with wrong outputs and a clear error instead of hanging.
  """

  chunk: int = 256
  block_k: int = 32
  block_n: int = 256
  num_warps: int = 4
  num_stages: int = 2
  dense_at: float = 0.875
  block_s: int = 64
  programs_per_sm: int = 1
  mode: str = "compact"
  split: bool = False
  acc: str = "vector"
  skip_empty: bool = False
  timers: bool = False
  spin_limit: int = SPIN_LIMIT

  def __post_init__(self):
    check_powers_of_two(self, ("chunk", "block_k", "block_n", "block_s"))
    if self.chunk % self.block_k:
      raise ValueError(f"chunk={self.chunk} must be a multiple of block_k={self.block_k}")
    if self.spin_limit < 1:
      raise ValueError(f"spin_limit={self.spin_limit} must be >= 1")
    if self.programs_per_sm < 1:
      raise ValueError(f"programs_per_sm={self.programs_per_sm} must be >= 1")
    if self.mode not in MODES:
      raise ValueError(f"mode={self.mode!r} is not one of {MODES}")
    if self.acc not in PERSISTENT_ACCS:
      raise ValueError(f"acc={self.acc!r} is not one of {PERSISTENT_ACCS}")
    if self.acc == "dot" and self.mode not in PREFETCH_MODES:
      raise ValueError(f"acc='dot' applies to mode='resident' or 'column', not mode={self.mode!r}")
    if self.timers and self.split:
      raise ValueError(
        "timers time the phases inside one launch; with split=True a profiler times each launch"
      )
    if self.skip_empty and self.mode != "resident":
      raise ValueError(f"skip_empty applies to mode='resident' only, not mode={self.mode!r}")
    if self.mode == "column" and self.block_k != self.chunk:
      raise ValueError(
        f"mode='column' loads whole chunks: block_k={self.block_k} must equal chunk={self.chunk}"
      )
    if self.acc == "dot" and self.block_k != self.chunk:
      raise ValueError(
        f"acc='dot' multiplies whole chunks: block_k={self.block_k} must equal chunk={self.chunk}"
      )
    if self.mode in PREFETCH_MODES and self.num_stages < 1:
      raise ValueError(
        f"mode={self.mode!r} needs num_stages >= 1 (its prefetch depth), got {self.num_stages}"
      )


# What backend 'persistent' runs when no tiling is given (`FusedThresholdSparsifier.layer_config` None,
# `decoder_layer`): the fastest tiling measured on the H200 that is also co-resident in float32
# ('resident', 128 x 128 tiles one ahead, 2 programs of 4 warps per SM; 8 warps is 3.7 % faster in bfloat16
# but untested in float32, where the 'column' walk's 8 warps were not co-resident). Its single-layer GPU
# tests pass on both real shapes in float32 (sessions 12-15), its 32-step decodes in float32 and bfloat16
# (session 16). The dataclass defaults stay the first tiling's, so a spec that names fewer fields means
# what it meant when it was recorded.
DEFAULT_LAYER = PersistentConfig(
  chunk=128, block_k=128, block_n=128, num_warps=4, num_stages=1, programs_per_sm=2, mode="resident"
)


def parse_config(spec: str) -> PersistentConfig:
  """A config from the fields of `PersistentConfig` in order, colon-separated, the first three required:
  'chunk:block_k:block_n[:num_warps[:num_stages[:dense_at[:block_s[:programs_per_sm[:mode[:split[:acc
  [:skip_empty[:timers[:spin_limit]]]]]]]]]]]]' (split, skip_empty, timers: true | false)."""
  values = spec_fields(PersistentConfig, spec, 3, "persistent config")
  try:
    return PersistentConfig(**values)
  except ValueError as e:
    raise ValueError(f"persistent config {spec!r}: {e}") from None


def sm_count(device=None) -> Optional[int]:
  """Streaming multiprocessors of a GPU device (its `core_count`), None when the device does not say."""
  device = device or jax.devices()[0]
  n = getattr(device, "core_count", None)
  return int(n) if n else None


def check_grid(grid: int, sms: Optional[int], programs_per_sm: int = 1) -> int:
  """`grid` if all its programs can be resident at once (<= sms * programs_per_sm), else GridError.

  A program spinning at a grid-wide wait holds its SM; programs that never got one never arrive, so a
  grid larger than the co-resident count hangs instead of failing. sms None (unknown) is refused too."""
  if sms is None:
    raise GridError(
      "the persistent layer kernel needs the device's SM count to size a grid that cannot deadlock, and "
      "this device reports none; pass sms= (the SM count) or use the per-site kernels (backend='auto')"
    )
  if programs_per_sm > MAX_PROGRAMS_PER_SM:
    raise GridError(
      f"programs_per_sm={programs_per_sm} is more than the {MAX_PROGRAMS_PER_SM} programs per SM check_grid "
      "accepts: beyond the kernel's registers and shared memory the grid-wide waits would hang (end on the "
      f"watchdog with WaitTimeout). Use programs_per_sm <= {MAX_PROGRAMS_PER_SM} (2 is measured co-resident)"
    )
  limit = sms * programs_per_sm
  if not 1 <= grid <= limit:
    raise GridError(
      f"grid of {grid} programs exceeds the {limit} that can be co-resident ({sms} SMs x "
      f"{programs_per_sm} per SM): its grid-wide waits would deadlock. Use grid <= {limit} (grid=None "
      "picks it), or raise programs_per_sm only if the kernel's registers and shared memory allow it"
    )
  return grid


def default_grid(config: PersistentConfig, interpret: bool, device=None) -> int:
  """One program per co-resident slot on a GPU (SMs x programs_per_sm); 1 in interpret mode."""
  if interpret:
    return 1
  sms = sm_count(device)
  return check_grid((sms or 0) * config.programs_per_sm, sms, config.programs_per_sm)

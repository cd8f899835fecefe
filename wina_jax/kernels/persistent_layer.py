"""Pallas (Triton backend) persistent decode kernel: one launch runs a whole decoder layer at batch 1.

A grid of P programs (at most one per SM, `check_grid`) walks the layer's phases, each partitioned by program
id, with a grid-wide wait between phases that read another program's results:

  0 qkv        x = RMSNorm(h) (every program computes the norm itself: no wait before), q|k|v GEMV
  1 attention  per query head: sum of q|k|v partials (+ bias), RoPE, KV-cache write, flash-decoding loop
  2 o_proj     GEMV of the attention output
  3 residual   h_mid = h + o (the o_proj partials summed)
  4 gate_up    x = RMSNorm(h_mid), gate|up GEMV
  5 down       x = SiLU(gate) * up (from the gate|up partials), down GEMV
  6 residual   h_out = h_mid + down

Every GEMV is split into tiles of C input rows (a chunk) x BN output columns; program p takes the tiles
[p T / P, (p + 1) T / P) in chunk-major order, so it compacts each chunk's kept rows once (|x| * scale >
threshold per output segment, TEAL: scale 1, WINA: column norms) for all its column blocks of that chunk,
then reads only kept weight rows; a chunk keeping >= dense_at * C rows is read as dense contiguous tiles.
In 'column' mode (`_column_walk`) the order is column-block-major instead (split-K): a program sums its chunks
of a column block into one accumulator and stores one partial per block.
Split-K partial sums go to float32 buffers that the next phase adds up, so no buffer needs zeroing.

The waits (`grid_sync`): every program adds 1 to a global counter and spins until it reads P * k at the k-th
wait; the last program to leave resets the counter, so one zeroed int32 [3] buffer (`grid_sync.new_counter`)
serves every launch (XLA sees it as a read-only input: launches on one stream never overlap). Programs
spinning on programs that cannot become resident deadlock, hence `persistent_config.check_grid`, and a
watchdog (`PersistentConfig.spin_limit`) that gives up the wait and leaves a count `grid_sync.check_waits`
raises on. The tiling is a `PersistentConfig`
(`persistent_config`). With one program or in interpret mode the wait is compiled out, so grid 1 runs the
fused layer on a CPU; `split=True` runs each phase as its own launch
(the launch boundary is the wait), which tests the multi-program partitioning in interpret mode.

Numerics follow the XLA path (`model._layer` with `masked_linear`): RMSNorm in float32 rounded to the
activations' dtype, products accumulated in float32 and rounded to the dtype per site, RoPE in the dtype,
attention in float32 (as `decode_attention`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from wina_jax import families
from wina_jax import layers as L
from wina_jax import sites as S
from wina_jax.config import ModelConfig
from wina_jax.kernels.grid_sync import grid_leave, grid_wait, read_clock, sync_threads
from wina_jax.kernels.pallas_gemv import acc_add, acc_total, acc_zeros, compiler_params
from wina_jax.kernels.persistent_config import (
  DEFAULT_LAYER,
  PREFETCH_MODES,
  PersistentConfig,
  check_grid,
  default_grid,
  sm_count,
)

PHASES = ("qkv", "attention", "o_proj", "residual_attn", "gate_up", "down", "residual_mlp")
# the layer's linear sites as the persistent kernel reads them: (block, fused projection)
SITES = (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj"))
SCAN = 4096  # rows per step of a whole-input pass (the norms' sums of squares)
PROLOGUE = 2 * len(PHASES)  # timers: the marks' column of site 0's prologue mark (then one per site)
GEMV_PHASE = (0, 2, 4, 5)  # the phase of each site of SITES
_NEG = -1e30


def unsupported(cfg: ModelConfig, lp: dict, batch: int, tokens: int, site_keys, config: PersistentConfig):
  """Why the kernel cannot run this layer step (a sentence), or None when it can.

  lp: the layer's params (fused q|k|v and gate|up); site_keys: the sparsifier's sites of this layer."""
  family = families.get(cfg.model_type)
  own = {proj for _, proj in SITES}
  if batch != 1 or tokens != 1:
    return f"batch {batch} x {tokens} tokens (the kernel takes one token of batch 1)"
  if not (cfg.fused_qkv and cfg.fused_gate_up):
    return "unfused params (use decode.fuse_projections)"
  if family.post_norms or cfg.qk_norm or cfg.norm_offset or cfg.hidden_act != "silu":
    return "a layer with post-norms, q/k norms, an offset norm gain or a non-SiLU MLP"
  if any(k in lp for k in ("rotate_attn", "rotate_mlp", "residual_attn", "residual_mlp")):
    return "the transform's rotations or shortcuts"
  if any("bias" in lp[b][p] for b, p in SITES[1:]):
    return "biases on o_proj, gate|up or down"
  if cfg.head_dim & (cfg.head_dim - 1):
    return f"head_dim {cfg.head_dim} is not a power of two"
  if any(S.parse_site(k)[2] not in own for k in site_keys):
    return "a threshold at a site the kernel does not read (e.g. the MLP activation)"
  d, q, kv, i = cfg.hidden_size, cfg.q_dim, cfg.kv_dim, cfg.intermediate_size
  c, bn = config.chunk, config.block_n
  if any(k % c for k in (d, q, i)) or any(w % bn for w in (d, q, kv, i)):
    return f"dims (d {d}, q {q}, kv {kv}, I {i}) not tiled by chunk {c} / block_n {bn}"
  return None


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static shape of one launch: the layer's dims, attention settings, tiling and grid."""

  d: int
  q_dim: int
  kv_dim: int
  inter: int
  heads: int
  kv_heads: int
  head_dim: int
  rotary_dim: int
  window: Optional[int]
  attn_scale: float
  eps: float
  has_bias: bool
  scaled: tuple  # per site of SITES: whether it has a scale [S, d_in]
  config: PersistentConfig
  programs: int
  interpret: bool

  @property
  def sync(self) -> bool:
    """Whether waits run: several programs on a GPU (one program, or interpret mode, needs none)."""
    return self.programs > 1 and not self.interpret

  def site(self, i: int) -> tuple[int, tuple[int, ...]]:
    """(d_in, output segments) of site i of SITES."""
    return [
      (self.d, (self.q_dim, self.kv_dim, self.kv_dim)),
      (self.q_dim, (self.d,)),
      (self.d, (self.inter, self.inter)),
      (self.inter, (self.d,)),
    ][i]

  def parts(self, i: int) -> int:
    """Rows of site i's split-K partials buffer: one per chunk (C input rows); in 'column' mode one per
    program sharing a column block (the most of any block; `_column_walk`)."""
    d_in, widths = self.site(i)
    nk = d_in // self.config.chunk
    if self.config.mode != "column":
      return nk
    nn, p = sum(widths) // self.config.block_n, self.programs
    if nk * nn < p:  # a program with no tile would leave a slot between its neighbours' unwritten
      raise ValueError(
        f"mode='column' needs a tile per program: {SITES[i][1]} has {nk * nn} tiles of {self.config.chunk} x "
        f"{self.config.block_n} for {p} programs; use a smaller chunk or block_n, or a smaller grid"
      )
    owner = lambda t: ((t + 1) * p - 1) // (nk * nn)  # the program whose share holds tile t (`_share`)
    return max(owner((n + 1) * nk - 1) - owner(n * nk) + 1 for n in range(nn))


def _iota(n: int) -> jax.Array:
  return jax.lax.iota(jnp.int32, n)


def _i32(v) -> jax.Array:
  return jnp.asarray(v, jnp.int32)


def _mark(marks_ref, pid, i: int, after, plan: Plan):
  """marks[pid, i] = `read_clock(after)` (pid: the program id, read outside any loop or branch)."""
  plgpu.store(marks_ref.at[pid, i + _iota(1)], read_clock(after, plan.interpret))


def _share(n: int, plan: Plan) -> tuple[jax.Array, jax.Array]:
  """This program's items [start, end) of n, contiguous and balanced."""
  pid = pl.program_id(0)
  return pid * n // plan.programs, (pid + 1) * n // plan.programs


def _load_shared(ref, plan: Plan, **kw):
  return plgpu.load(ref, **({} if plan.interpret else {"volatile": True}), **kw)


def _load_parts(part_ref, cols, n_parts: int, plan: Plan) -> jax.Array:
  """part[k, cols] for the n_parts split-K partials -> [npad, len(cols)] float32 (rows past n_parts: 0)."""
  npad = 1 << (n_parts - 1).bit_length()
  ks = _iota(npad)
  inside = None if npad == n_parts else jnp.broadcast_to((ks < n_parts)[:, None], (npad, cols.shape[0]))
  kw = {} if inside is None else dict(mask=inside, other=0.0)
  return _load_shared(part_ref.at[ks[:, None], cols[None, :]], plan, **kw)


def _sum_parts(part_ref, cols, n_parts: int, plan: Plan) -> jax.Array:
  """sum_k part[k, cols] over the n_parts split-K partials -> [len(cols)] float32."""
  return jnp.sum(_load_parts(part_ref, cols, n_parts, plan), axis=0)


class Input(NamedTuple):
  """A GEMV's input at given rows in two steps, so that a walk can issue a tile's loads before the math that
  needs them: load(rows [C]) -> raw arrays (a pytree); finish(raw) -> the input at those rows, [C] float32."""

  load: Callable
  finish: Callable

  def __call__(self, rows):
    return self.finish(self.load(rows))


def _inv_rms(x_ref, d: int, eps: float, plan: Plan, shared: bool) -> jax.Array:
  """1 / rms of x [d] in float32 (`layers.rms_norm`'s), over the whole input."""
  piece = min(SCAN, 1 << (d - 1).bit_length())

  def step(j, acc):
    ids = j * piece + _iota(piece)
    kw = {} if d % piece == 0 else dict(mask=ids < d, other=0)
    x = (_load_shared(x_ref.at[ids], plan, **kw) if shared else plgpu.load(x_ref.at[ids], **kw)).astype(
      jnp.float32
    )
    return acc + jnp.sum(x * x)

  ss = jax.lax.fori_loop(_i32(0), _i32(-(-d // piece)), step, jnp.float32(0.0))
  return jax.lax.rsqrt(ss / d + eps)


def _normed(x_ref, g_ref, inv, plan: Plan, shared: bool) -> Input:
  """The `Input` `layers.rms_norm` of x at given rows, as float32 (rounded to x's dtype as it rounds)."""

  def load(rows):
    x = _load_shared(x_ref.at[rows], plan) if shared else plgpu.load(x_ref.at[rows])
    return x, plgpu.load(g_ref.at[rows])

  def finish(raw):
    x, g = raw
    y = (x.astype(jnp.float32) * inv).astype(x.dtype)
    return (y.astype(jnp.float32) * g.astype(jnp.float32)).astype(x.dtype).astype(jnp.float32)

  return Input(load, finish)


def _dot_rows(xm: jax.Array, w: jax.Array) -> jax.Array:
  """A tile's products through the tensor cores: xm [C] float32 in row 0 of a [16, C] left operand (their
  smallest M; rows 1-15 zero), w [C, BN] -> [16, BN] float32 whose row 0 is xm @ w (exact products, float32
  sums; float32 weights at IEEE precision, not TF32)."""
  lhs = jnp.where(_iota(16)[:, None] == 0, xm[None, :], 0.0).astype(w.dtype)
  return jnp.dot(lhs, w, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)


def _site_refs(r: dict, site: int) -> tuple:
  """GEMV site `site`'s (weights, thresholds, scales, partials) refs."""
  name = ("qkv", "o", "gu", "down")[site]
  return r[f"w_{name}"], r[f"t_{name}"], r[f"s_{name}"], r[f"{name}_part"]


def _column_walk(r: dict, plan: Plan, site: int, x_in: Input):
  """Phase work of GEMV site `site` in 'column' mode (split-K): tile t = n * nk + kc is chunk kc of column
  block n, so a program's share walks down its column blocks, summing every tile into one accumulator per
  block, and stores one partial per block: part[j, n] with j = pid - (the first program sharing block n).
  The last program of a block zeroes the slots past its own, so readers add `Plan.parts` rows whatever the
  block. A tile is one masked [C, BN] load; its input's loads are issued one tile before the mask they give,
  the weights num_stages tiles before their products (both in the loop's carry). acc 'dot' sums the tiles'
  products from the tensor cores (`_dot_rows`) into a [16, BN] accumulator."""
  w_ref, t_ref, s_ref, part_ref = _site_refs(r, site)
  cfg = plan.config
  c, bn, depth = cfg.chunk, cfg.block_n, cfg.num_stages
  d_in, widths = plan.site(site)
  nk, nn = d_in // c, sum(widths) // bn
  bounds = [sum(widths[:s]) // bn for s in range(1, len(widths))]  # first column block of segments 1..
  slots, n_tiles = plan.parts(site), nk * nn
  dot = cfg.acc == "dot"
  pid = pl.program_id(0)
  start, end = _share(n_tiles, plan)

  def block(n, carry):
    lo, hi = jnp.maximum(start - n * nk, 0), jnp.minimum(end - n * nk, nk)  # this program's chunks of n
    seg = sum(((n >= b).astype(jnp.int32) for b in bounds), _i32(0))
    thr = plgpu.load(t_ref.at[seg])
    cols = n * bn + _iota(bn)
    rows_of = lambda kc: jnp.minimum(kc, hi - 1) * c + _iota(c)  # past hi (the prefetch's tail): masked

    def raw(kc):  # the loads of chunk kc's input (and WINA's scale)
      rows = rows_of(kc)
      return x_in.load(rows), (plgpu.load(s_ref.at[seg, rows]) if plan.scaled[site] else None)

    def tile(kc, raw_kc):  # chunk kc's masked input [C] and its kept rows' weights [C, BN] (loads issued)
      xr, scale = raw_kc
      x = x_in.finish(xr)
      keep = ((jnp.abs(x) * scale if plan.scaled[site] else jnp.abs(x)) > thr) & (kc < hi)
      w = plgpu.load(
        w_ref.at[rows_of(kc)[:, None], cols[None, :]],
        mask=jnp.broadcast_to(keep[:, None], (c, bn)),
        other=0,
        eviction_policy="evict_first",
      )
      return jnp.where(keep, x, 0.0), w

    def step(kc, carry):
      acc, ahead, raw_next = carry
      raw_after = raw(kc + depth + 1)  # issued first: the next step's mask needs it
      nxt = tile(kc + depth, raw_next)
      xm, w = ahead[0]
      acc = (acc + _dot_rows(xm, w)) if dot else acc_add(acc, xm[:, None] * w.astype(jnp.float32))
      return acc, ahead[1:] + (nxt,), raw_after

    @pl.when(lo < hi)
    def _():
      ahead = tuple(tile(lo + j, raw(lo + j)) for j in range(depth))
      if cfg.timers:  # the prologue: the clock once the program's first tile's input is computed

        @pl.when(n == start // nk)
        def _():
          _mark(r["marks"], pid, PROLOGUE + site, (jnp.sum(ahead[0][0]) != 0.0).astype(jnp.int32), plan)

      init = (jnp.zeros((16, bn), jnp.float32) if dot else acc_zeros(cfg.acc, c, bn), ahead, raw(lo + depth))
      acc = jax.lax.fori_loop(lo, hi, step, init)[0]
      j = pid - ((n * nk + 1) * plan.programs - 1) // n_tiles  # this program's slot of block n
      plgpu.store(part_ref.at[j, cols], acc_total(acc))
      npad = 1 << (slots - 1).bit_length()
      ks = _iota(npad)

      @pl.when(hi == nk)
      def _():  # the block's last program: the slots no program of this block holds read as zeros
        unused = jnp.broadcast_to(((ks > j) & (ks < slots))[:, None], (npad, bn))
        plgpu.store(part_ref.at[ks[:, None], cols[None, :]], jnp.zeros((npad, bn), jnp.float32), mask=unused)

    return carry

  jax.lax.fori_loop(start // nk, (end + nk - 1) // nk, block, _i32(0))


def _gemv(r: dict, plan: Plan, site: int, x_at: Input):
  """Phase work of GEMV site `site`: this program's tiles of part[kc, n] = sum over chunk kc's kept rows
  of x * W[:, n] (float32). x_at(rows [C]) -> the site's input at those rows, float32."""
  if plan.config.mode == "column":
    return _column_walk(r, plan, site, x_at)
  w_ref, t_ref, s_ref, part_ref = _site_refs(r, site)
  idx_ref, xv_ref = r["idx"], r["xv"]
  cfg = plan.config
  c, bk, bn = cfg.chunk, cfg.block_k, cfg.block_n
  d_in, widths = plan.site(site)
  nk, nn = d_in // c, sum(widths) // bn
  bounds = [sum(widths[:s]) // bn for s in range(len(widths) + 1)]  # column blocks of each segment
  dense_rows = min(c + 1, math.ceil(cfg.dense_at * c))  # c + 1: never dense
  pid = pl.program_id(0)
  start, end = _share(nk * nn, plan)
  masked = cfg.mode == "masked"
  acc0 = acc_zeros(cfg.acc, bk, bn)

  def add(acc, xs, w):
    """acc plus the rows' products xs [BK] x w [BK, BN]."""
    return acc_add(acc, xs[:, None] * w.astype(jnp.float32))

  def masked_tile(kc, t, carry):
    """Tile t of chunk kc in 'masked' mode: C / BK fixed [BK, BN] loads, dropped rows masked out."""
    cols = (t - kc * nn) * bn + _iota(bn)

    def step(j, acc):
      p = j * bk + _iota(bk)
      xs = plgpu.load(xv_ref.at[pid, p])
      w = plgpu.load(
        w_ref.at[(kc * c + p)[:, None], cols[None, :]],
        mask=jnp.broadcast_to((xs != 0.0)[:, None], (bk, bn)),
        other=0,
        eviction_policy="evict_first",
      )
      return add(acc, xs, w)

    plgpu.store(part_ref.at[kc, cols], acc_total(jax.lax.fori_loop(_i32(0), _i32(c // bk), step, acc0)))
    return carry

  def resident_tiles(kc, rows, keep, x, lo, hi):
    """Tiles [lo, hi) of chunk kc in 'resident' mode. rows, keep, x: lists over the tile's G = C / BK row
    blocks, [BK] each. A tile is G masked [BK, BN] loads summed elementwise into a [BK, BN] float32 tile
    and reduced over its rows once (G = 1: one [C, BN] load); the next num_stages row blocks' loads are in
    flight (registers, the loop's carry) while a block is summed."""
    xm = [jnp.where(k, v, 0.0) for k, v in zip(keep, x)]
    g_n, depth = len(rows), cfg.num_stages

    def load(t, g):  # row block g of tile t's kept rows; nothing past hi (the prefetch's tail)
      cols = (jnp.minimum(t, hi - 1) - kc * nn) * bn + _iota(bn)
      mask = jnp.broadcast_to((keep[g] & (t < hi))[:, None], (rows[g].shape[0], bn))
      return plgpu.load(
        w_ref.at[rows[g][:, None], cols[None, :]], mask=mask, other=0, eviction_policy="evict_first"
      )

    def later(t, s):  # the load s row blocks past tile t's first
      return load(t + s // g_n, s % g_n)

    def tile(t, ahead):
      acc = None
      for g in range(g_n):
        ahead, w = ahead[1:] + (later(t, g + depth),), ahead[0]  # the next load issued before this sum
        products = _dot_rows(xm[g], w) if cfg.acc == "dot" else xm[g][:, None] * w.astype(jnp.float32)
        acc = products if acc is None else acc + products
      plgpu.store(part_ref.at[kc, (t - kc * nn) * bn + _iota(bn)], jnp.sum(acc, axis=0))
      return ahead

    def walk():
      jax.lax.fori_loop(lo, hi, tile, tuple(later(lo, s) for s in range(depth)))

    if not cfg.skip_empty:
      return walk()
    kept = functools.reduce(jnp.maximum, [jnp.max(k.astype(jnp.int32)) for k in keep]) > 0
    pl.when(kept)(walk)

    @pl.when(jnp.logical_not(kept))
    def _():  # no row of the chunk kept for this segment: zero partials, no loads
      def zero(t, carry):
        plgpu.store(part_ref.at[kc, (t - kc * nn) * bn + _iota(bn)], jnp.zeros((bn,), jnp.float32))
        return carry

      jax.lax.fori_loop(lo, hi, zero, _i32(0))

  def chunk(kc, carry):
    k0 = kc * c
    rows = k0 + _iota(c)
    # the input in the pieces the mode reads: 'resident' its G = C / BK row blocks ([BK] each), else the chunk
    blocks = [k0 + g * bk + _iota(bk) for g in range(c // bk)] if cfg.mode == "resident" else [rows]
    xs = [x_at(b) for b in blocks]
    x = xs[0]
    if cfg.timers:  # the prologue: the clock once the program's first chunk's input is in registers

      @pl.when(kc == start // nn)
      def _():
        after = sum(jnp.sum(v) for v in xs) != 0.0
        _mark(r["marks"], pid, PROLOGUE + site, after.astype(jnp.int32), plan)

    for s in range(len(widths)):
      lo = jnp.maximum(start, kc * nn + bounds[s])
      hi = jnp.minimum(end, kc * nn + bounds[s + 1])

      @pl.when(lo < hi)
      def _():
        thr = plgpu.load(t_ref.at[_i32(s)])

        def mask_of(x, rows):  # the rows of x kept for segment s
          return (jnp.abs(x) * plgpu.load(s_ref.at[_i32(s), rows]) if plan.scaled[site] else jnp.abs(x)) > thr

        if cfg.mode == "resident":
          resident_tiles(kc, blocks, [mask_of(v, b) for v, b in zip(xs, blocks)], xs, lo, hi)
          return
        keep = mask_of(x, rows)
        if masked:  # the chunk's masked inputs in place: a zero (dropped or zero) input's row is not read
          sync_threads(plan.interpret)  # the previous tile's loop has read the scratch
          plgpu.store(xv_ref.at[pid, _iota(c)], jnp.where(keep, x, 0.0))
          sync_threads(plan.interpret)
          jax.lax.fori_loop(lo, hi, functools.partial(masked_tile, kc), _i32(0))
          return
        k32 = keep.astype(jnp.int32)
        kept = jnp.sum(k32)
        dense = kept >= dense_rows
        pos = jnp.where(dense, _iota(c), jnp.cumsum(k32) - k32)
        put = keep | dense
        sync_threads(plan.interpret)  # the previous tile's loop has read the scratch
        plgpu.store(idx_ref.at[pid, pos], rows, mask=put)
        plgpu.store(xv_ref.at[pid, pos], jnp.where(keep, x, 0.0), mask=put)
        sync_threads(plan.interpret)
        dense_trips = dense.astype(jnp.int32) * (c // bk)
        sparse_trips = (1 - dense.astype(jnp.int32)) * ((kept + bk - 1) // bk)

        def tile(t, carry):
          cols = (t - kc * nn) * bn + _iota(bn)

          def dense_step(j, acc):
            p = j * bk + _iota(bk)
            w = plgpu.load(w_ref.at[(k0 + p)[:, None], cols[None, :]], eviction_policy="evict_first")
            return add(acc, plgpu.load(xv_ref.at[pid, p]), w)

          def sparse_step(j, acc):
            p = j * bk + _iota(bk)
            valid = p < kept
            ids = plgpu.load(idx_ref.at[pid, p], mask=valid, other=0)
            xs = plgpu.load(xv_ref.at[pid, p], mask=valid, other=0.0)
            w = plgpu.load(
              w_ref.at[ids[:, None], cols[None, :]],
              mask=jnp.broadcast_to(valid[:, None], (bk, bn)),
              other=0,
              eviction_policy="evict_first",
            )
            return add(acc, xs, w)

          acc = jax.lax.fori_loop(_i32(0), dense_trips, dense_step, acc0)
          acc = jax.lax.fori_loop(_i32(0), sparse_trips, sparse_step, acc)
          plgpu.store(part_ref.at[kc, cols], acc_total(acc))
          return carry

        jax.lax.fori_loop(lo, hi, tile, _i32(0))

    return carry

  jax.lax.fori_loop(start // nn, (end + nn - 1) // nn, chunk, _i32(0))


def _attention(r: dict, plan: Plan):
  """Phase work of the attention: this program's query heads, as `decode_attention` does them, from the
  q|k|v partials; the first query head of each KV head writes the cache slot `length`."""
  hd, group = plan.head_dim, plan.heads // plan.kv_heads
  nk = plan.parts(0)
  part, dtype = r["qkv_part"], r["h"].dtype
  kc_ref, vc_ref = r["cache_k_out"], r["cache_v_out"]
  length = plgpu.load(r["length"].at[_i32(0)])
  dims = _iota(hd)
  half = plan.rotary_dim // 2
  rotary = dims < plan.rotary_dim
  partner = jnp.where(dims < half, dims + half, jnp.where(rotary, dims - half, dims))
  ang = length.astype(jnp.float32) * plgpu.load(r["inv"].at[dims])
  cos = jnp.where(rotary, jnp.cos(ang), 1.0).astype(dtype)
  sin = jnp.where(rotary, jnp.sin(ang) * jnp.where(dims < half, -1.0, 1.0), 0.0).astype(dtype)

  def proj(col0, idx):
    """Column col0 + idx of the site's output in the dtype (+ bias), as `masked_linear` returns it."""
    y = _sum_parts(part, col0 + idx, nk, plan).astype(dtype)
    if plan.has_bias:
      y = (y.astype(jnp.float32) + plgpu.load(r["b_qkv"].at[col0 + idx]).astype(jnp.float32)).astype(dtype)
    return y

  rope = lambda col0: proj(col0, dims) * cos + proj(col0, partner) * sin
  start, end = _share(plan.heads, plan)

  def head(hq, carry):
    kh = hq // group
    k_new = rope(plan.q_dim + kh * hd).astype(kc_ref.dtype)
    v_new = proj(plan.q_dim + plan.kv_dim + kh * hd, dims).astype(vc_ref.dtype)
    inside = (dims >= 0) & (length < kc_ref.shape[1]) & (hq % group == 0)
    plgpu.store(kc_ref.at[_i32(0), length, kh, dims], k_new, mask=inside)
    plgpu.store(vc_ref.at[_i32(0), length, kh, dims], v_new, mask=inside)
    q = rope(hq * hd).astype(jnp.float32)
    first = _i32(0) if plan.window is None else jnp.maximum(length - plan.window + 1, 0)
    bs = plan.config.block_s

    def block(j, carry):
      m, l, acc = carry
      pos = j * bs + _iota(bs)
      valid = (pos < length) & (pos >= first)
      mask = jnp.broadcast_to(valid[:, None], (bs, hd))
      kb = plgpu.load(kc_ref.at[_i32(0), pos[:, None], kh, dims[None, :]], mask=mask, other=0)
      vb = plgpu.load(vc_ref.at[_i32(0), pos[:, None], kh, dims[None, :]], mask=mask, other=0)
      s = jnp.sum(kb.astype(jnp.float32) * q[None, :], axis=1) * plan.attn_scale
      s = jnp.where(valid, s, -jnp.inf)
      m_new = jnp.maximum(m, jnp.max(s))
      p, alpha = jnp.exp(s - m_new), jnp.exp(m - m_new)
      return m_new, l * alpha + jnp.sum(p), acc * alpha + jnp.sum(p[:, None] * vb.astype(jnp.float32), axis=0)

    init = (jnp.float32(_NEG), jnp.float32(0.0), jnp.zeros((hd,), jnp.float32))
    m, l, acc = jax.lax.fori_loop(first // bs, (length + bs - 1) // bs, block, init)
    s = jnp.sum(q * k_new.astype(jnp.float32)) * plan.attn_scale  # the new token, from registers
    m_new = jnp.maximum(m, s)
    alpha, p = jnp.exp(m - m_new), jnp.exp(s - m_new)
    o = (acc * alpha + p * v_new.astype(jnp.float32)) / (l * alpha + p)
    plgpu.store(r["attn"].at[hq * hd + dims], o.astype(dtype))
    return carry

  jax.lax.fori_loop(start, end, head, _i32(0))


def _residual(r: dict, plan: Plan, h_name: str, site: int, out_name: str):
  """Phase work: out = h + (the site's partials summed, rounded to the dtype), this program's blocks."""
  bn = plan.config.block_n
  n_parts = plan.parts(site)
  part = _site_refs(r, site)[3]
  shared = h_name != "h"
  start, end = _share(plan.d // bn, plan)

  def block(b, carry):
    cols = b * bn + _iota(bn)
    h = _load_shared(r[h_name].at[cols], plan) if shared else plgpu.load(r[h_name].at[cols])
    a = _sum_parts(part, cols, n_parts, plan).astype(h.dtype)
    plgpu.store(r[out_name].at[cols], (h.astype(jnp.float32) + a.astype(jnp.float32)).astype(h.dtype))
    return carry

  jax.lax.fori_loop(start, end, block, _i32(0))


def _act(r: dict, plan: Plan) -> Input:
  """The `Input` SiLU(gate) * up at given rows of the MLP (float32), rounded as the XLA path rounds."""
  n_parts, dtype = plan.parts(2), r["h"].dtype

  def load(rows):
    return _load_parts(r["gu_part"], rows, n_parts, plan), _load_parts(
      r["gu_part"], plan.inter + rows, n_parts, plan
    )

  def finish(raw):
    gate = jnp.sum(raw[0], axis=0).astype(dtype).astype(jnp.float32)
    up = jnp.sum(raw[1], axis=0).astype(dtype)
    act = (gate / (1.0 + jnp.exp(-gate))).astype(dtype)  # SiLU
    return (act.astype(jnp.float32) * up.astype(jnp.float32)).astype(dtype).astype(jnp.float32)

  return Input(load, finish)


def _phase(r: dict, plan: Plan, name: str):
  if name == "qkv":
    _gemv(r, plan, 0, _normed(r["h"], r["g1"], _inv_rms(r["h"], plan.d, plan.eps, plan, False), plan, False))
  elif name == "attention":
    _attention(r, plan)
  elif name == "o_proj":
    _gemv(
      r, plan, 1, Input(lambda rows: _load_shared(r["attn"].at[rows], plan), lambda a: a.astype(jnp.float32))
    )
  elif name == "residual_attn":
    _residual(r, plan, "h", 1, "h_mid")
  elif name == "gate_up":
    inv = _inv_rms(r["h_mid"], plan.d, plan.eps, plan, True)
    _gemv(r, plan, 2, _normed(r["h_mid"], r["g2"], inv, plan, True))
  elif name == "down":
    _gemv(r, plan, 3, _act(r, plan))
  else:
    _residual(r, plan, "h_mid", 3, "h_out")


IN_NAMES = (
  "h",
  "g1",
  "g2",
  "w_qkv",
  "b_qkv",
  "w_o",
  "w_gu",
  "w_down",
  "t_qkv",
  "t_o",
  "t_gu",
  "t_down",
  "s_qkv",
  "s_o",
  "s_gu",
  "s_down",
  "length",
  "inv",
  "counter",
  "cache_k",
  "cache_v",
)
SCRATCH = ("qkv_part", "attn", "o_part", "h_mid", "gu_part", "down_part", "idx", "xv")


def _kernel(*refs, plan: Plan, phases: tuple[str, ...], in_names: tuple, out_names: tuple):
  r = dict(zip(in_names, refs[: len(in_names)]))
  r.update(zip(out_names, refs[len(in_names) :]))  # an aliased buffer is used through its output ref
  pid = pl.program_id(0)
  timed = plan.config.timers

  def mark(i, after):
    if timed:
      _mark(r["marks"], pid, i, pid if after is None else after, plan)

  mark(0, pid)
  if timed:  # a program with no tile of a site leaves its prologue mark at 0 (`phase_times`: NaN)
    plgpu.store(r["marks"].at[pid, PROLOGUE + _iota(len(SITES))], jnp.zeros((len(SITES),), jnp.int32))
  spins = _i32(plan.config.spin_limit)
  for k, name in enumerate(phases):
    if k:
      arrived, left, spins = grid_wait(r["counter"], k, plan.programs, plan.sync, spins)
      mark(2 * k - 1, arrived)
      mark(2 * k, left)
    _phase(r, plan, name)
  if len(phases) > 1:
    if timed:
      sync_threads(plan.interpret)  # every thread's last phase work is done before the final mark
    mark(2 * len(phases) - 1, grid_leave(r["counter"], plan.programs, plan.sync))


def _out_shapes(plan: Plan, dtype, cache_k, cache_v) -> dict:
  c, f32 = plan.config.chunk, jnp.float32
  n_qkv = plan.q_dim + 2 * plan.kv_dim
  parts = [plan.parts(i) for i in range(len(SITES))]
  return {
    "h_out": jax.ShapeDtypeStruct((plan.d,), dtype),
    "cache_k_out": jax.ShapeDtypeStruct(cache_k.shape, cache_k.dtype),
    "cache_v_out": jax.ShapeDtypeStruct(cache_v.shape, cache_v.dtype),
    "qkv_part": jax.ShapeDtypeStruct((parts[0], n_qkv), f32),
    "attn": jax.ShapeDtypeStruct((plan.q_dim,), dtype),
    "o_part": jax.ShapeDtypeStruct((parts[1], plan.d), f32),
    "h_mid": jax.ShapeDtypeStruct((plan.d,), dtype),
    "gu_part": jax.ShapeDtypeStruct((parts[2], 2 * plan.inter), f32),
    "down_part": jax.ShapeDtypeStruct((parts[3], plan.d), f32),
    "idx": jax.ShapeDtypeStruct((plan.programs, c), jnp.int32),
    "xv": jax.ShapeDtypeStruct((plan.programs, c), f32),
  } | (
    {"marks": jax.ShapeDtypeStruct((plan.programs, PROLOGUE + len(SITES)), jnp.int32)}
    if plan.config.timers
    else {}
  )


def _launch(args: dict, plan: Plan, phases: tuple[str, ...], carried: dict) -> dict:
  """One pallas_call running `phases`; `carried` (output name -> array) are earlier launches' buffers,
  passed in aliased to their outputs (split mode), else the outputs start unwritten."""
  shapes = _out_shapes(plan, args["h"].dtype, args["cache_k"], args["cache_v"])
  out_names = tuple(shapes)
  in_names = IN_NAMES + tuple(f"{k}_in" for k in carried)
  aliases = {IN_NAMES.index("cache_k"): 1, IN_NAMES.index("cache_v"): 2}
  aliases.update({len(IN_NAMES) + i: out_names.index(k) for i, k in enumerate(carried)})
  body = functools.partial(_kernel, plan=plan, phases=phases, in_names=in_names, out_names=out_names)
  cfg = plan.config
  # Triton's own pipeliner off where num_stages is the walk's own register prefetch depth
  stages = 1 if cfg.mode in PREFETCH_MODES else cfg.num_stages
  call = pl.pallas_call(
    body,
    out_shape=tuple(shapes.values()),
    grid=(plan.programs,),
    interpret=plan.interpret,
    input_output_aliases=aliases,
    compiler_params=None if plan.interpret else compiler_params(cfg.num_warps, stages),
    name="persistent_layer" if len(phases) > 1 else f"persistent_{phases[0]}",
  )
  outs = call(*[args[k] for k in IN_NAMES], *carried.values())
  return dict(zip(out_names, outs))


@functools.partial(jax.jit, static_argnames=("plan",))
def run_layer(args: dict, plan: Plan) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The kernel on its arguments (`layer_args`) -> (h_out [d], cache_k, cache_v): one launch for the layer,
  or one per phase with `PersistentConfig.split`."""
  if not plan.config.split:
    out = _launch(args, plan, PHASES, {})
  else:
    carried: dict = {}
    for name in PHASES:
      out = _launch(args, plan, (name,), carried)
      carried = {k: v for k, v in out.items() if k not in ("cache_k_out", "cache_v_out")}
      args = {**args, "cache_k": out["cache_k_out"], "cache_v": out["cache_v_out"]}
  return out["h_out"], out["cache_k_out"], out["cache_v_out"]


def layer_args(cfg: ModelConfig, lp: dict, h, kv: dict, length, thresholds: dict, scales: dict, counter):
  """Kernel arguments of one layer. h [d]; kv {'k', 'v': [1, S, K, hd]}; thresholds / scales: {fused
  projection name: [S] / [S, d_in]} (absent: keep every row / TEAL's |x|); counter: `grid_sync.new_counter`."""
  if tuple(counter.shape) != (3,) or counter.dtype != jnp.int32:
    raise ValueError(
      f"counter must be int32 [3] (grid_sync.new_counter()), got {counter.dtype} {tuple(counter.shape)}"
    )
  dtype = h.dtype
  args = {
    "h": h,
    "g1": lp["input_layernorm"]["scale"].astype(dtype),
    "g2": lp["post_attention_layernorm"]["scale"].astype(dtype),
    "b_qkv": lp["self_attn"]["qkv_proj"].get("bias", jnp.zeros((1,), dtype)).astype(dtype),
    "length": jnp.reshape(length, (1,)).astype(jnp.int32),
    "counter": counter,
    "cache_k": kv["k"],
    "cache_v": kv["v"],
  }
  inv = L.rope_inv_freq(cfg)
  args["inv"] = jnp.zeros((cfg.head_dim,), jnp.float32).at[: cfg.rotary_dim].set(jnp.tile(inv, 2))
  for (block, proj), name in zip(SITES, ("qkv", "o", "gu", "down")):
    w = lp[block][proj]["kernel"]
    n_seg = len(families.get(cfg.model_type).segments(cfg, block, proj))
    t = thresholds.get(proj)
    args[f"w_{name}"] = w
    args[f"t_{name}"] = jnp.broadcast_to(
      jnp.asarray(-1.0 if t is None else t, jnp.float32), (n_seg,)
    )  # -1: every row kept
    s = scales.get(proj)
    args[f"s_{name}"] = (
      jnp.zeros((1, 1), jnp.float32)
      if s is None
      else jnp.broadcast_to(s, (n_seg, w.shape[0])).astype(jnp.float32)
    )
  return args


def make_plan(cfg: ModelConfig, lp: dict, scales: dict, config: PersistentConfig, grid: int, interpret: bool):
  """The static `Plan` of a layer (cfg: `cfg.layer_config(layer)`)."""
  return Plan(
    d=cfg.hidden_size,
    q_dim=cfg.q_dim,
    kv_dim=cfg.kv_dim,
    inter=cfg.intermediate_size,
    heads=cfg.num_attention_heads,
    kv_heads=cfg.num_key_value_heads,
    head_dim=cfg.head_dim,
    rotary_dim=cfg.rotary_dim,
    window=cfg.sliding_window,
    attn_scale=float(cfg.attn_scale),
    eps=float(cfg.rms_norm_eps),
    has_bias="bias" in lp["self_attn"]["qkv_proj"],
    scaled=tuple(proj in scales for _, proj in SITES),
    config=config,
    programs=grid,
    interpret=interpret,
  )


def _prepare(
  cfg, lp, h, kv, length, thresholds, scales, counter, config, grid=None, interpret=False, sms=None
):
  """The checked (plan, kernel arguments) of one layer step (`decoder_layer`'s arguments)."""
  reason = unsupported(cfg, lp, h.shape[0], h.shape[1], (), config)
  if reason:
    raise ValueError(f"the persistent layer kernel does not take this step: {reason}")
  if grid is None:
    grid = default_grid(config, interpret)
  elif not interpret:
    check_grid(grid, sms or sm_count(), config.programs_per_sm)
  if interpret and grid > 1 and not config.split:
    raise ValueError(
      f"interpret mode runs programs one after another, so a grid of {grid} would deadlock at its first "
      "wait; use grid=1 or a config with split=True"
    )
  plan = make_plan(cfg, lp, scales, config, grid, interpret)
  return plan, layer_args(cfg, lp, h.reshape(-1), kv, length, thresholds, scales, counter)


def decoder_layer(
  cfg: ModelConfig,
  lp: dict,
  h: jax.Array,
  kv: dict,
  length,
  thresholds: dict,
  scales: dict,
  counter: jax.Array,
  *,
  config: PersistentConfig = DEFAULT_LAYER,
  grid: Optional[int] = None,
  interpret: bool = False,
  sms: Optional[int] = None,
) -> tuple[jax.Array, dict]:
  """One decoder layer step through the kernel: residual h [1, 1, d] at position `length` -> (h_out
  [1, 1, d], {'k', 'v'} with slot `length` written). cfg: `cfg.layer_config(layer)`; thresholds, scales,
  counter as `layer_args`; grid: programs (None: `default_grid`), checked against the SM count (`sms`, else
  the device's) with `check_grid`; `config.split`: one launch per phase (interpret mode's only way to a grid
  > 1)."""
  plan, args = _prepare(cfg, lp, h, kv, length, thresholds, scales, counter, config, grid, interpret, sms)
  h_out, k, v = run_layer(args, plan)
  return h_out.reshape(h.shape), {"k": k, "v": v}


@functools.partial(jax.jit, static_argnames=("plan",))
def _run_marks(args: dict, plan: Plan) -> jax.Array:
  return _launch(args, plan, PHASES, {})["marks"]


def phase_marks(
  cfg: ModelConfig, lp: dict, h, kv: dict, length, thresholds: dict, scales: dict, counter, **kw
) -> jax.Array:
  """`decoder_layer`'s launch with `config.timers` on -> marks [programs, 2 * len(PHASES) + len(SITES)] int32:
  per program, the global nanosecond clock's low 32 bits at the start of phase k (column 2k: the launch's
  start, then the departure from wait k) and at the end of its work in phase k (column 2k + 1: the arrival at
  wait k + 1, or at the final departure); then per GEMV site i (column PROLOGUE + i) once its first chunk's
  input is computed (0 if it has no tile of the site). Phase k's work = marks[:, 2k + 1] -
  marks[:, 2k], the wait after it = marks[:, 2k + 2] - marks[:, 2k + 1], both modulo 2^32. Zeros in interpret
  mode. kw: `decoder_layer`'s keyword arguments (config, grid, interpret, sms)."""
  config = dataclasses.replace(kw.pop("config", DEFAULT_LAYER), timers=True)
  plan, args = _prepare(cfg, lp, h, kv, length, thresholds, scales, counter, config, **kw)
  return _run_marks(args, plan)


def phase_times(marks) -> dict:
  """marks [P, 2 * phases + sites] int32 (`phase_marks`) -> {'marks_us': [P, 2 * phases] since the launch's
  first start, 'work_us': [phases, P], 'wait_us': [phases - 1, P], 'prologue_us': [sites, P] (a GEMV phase's
  start to its first chunk's input; NaN for a program with no tile of the site or no clock), 'span_us': first
  start to last end}: microseconds, differences taken modulo 2^32 ns from the first start (the marks are the clock's
  low 32 bits), so a wrap inside a launch shorter than 4.29 s is harmless."""
  m = np.asarray(marks, np.int64)
  rel_all = ((m - m[:, 0].min()) % (1 << 32)) / 1e3
  rel, first = rel_all[:, :PROLOGUE], rel_all[:, PROLOGUE:]
  work = rel[:, 1::2] - rel[:, 0::2]
  wait = rel[:, 2::2] - rel[:, 1:-1:2]
  prologue = np.where(m[:, PROLOGUE:] != 0, first - rel[:, [2 * k for k in GEMV_PHASE]], np.nan)
  return {
    "marks_us": rel,
    "work_us": work.T,
    "wait_us": wait.T,
    "prologue_us": prologue.T,
    "span_us": float(rel[:, -1].max()),
  }

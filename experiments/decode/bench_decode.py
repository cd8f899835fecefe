"""Decode benchmark: dense vs threshold-mode TEAL / WINA (with and without the transform's shortcuts).

Llama-3-8B- and Qwen-2.5-7B-shaped models with random bf16 weights; a jitted decode step (layers
unrolled, cache donated), all steps of a run in one on-device loop (`decode_loop`). The `*_host` rows
dispatch one step per token instead, as runs before 2026-11-29 did; `no_linear` times the step with
linear sites that read no weights (its 'rest': `experiments.decode.decode_ceiling` turns it into the ceiling
of any sparse GEMV kernel). Thresholds are set per site (per segment of fused q|k|v and gate|up)
to the target sparsity's quantile of the dense model's own scores at the benchmark's decode positions
(TEAL's protocol), so each target is hit on these inputs. Reports ms/step, tokens/s, speedup over our
dense, bytes moved per step (kept rows only, union over the batch) and GB/s against a copy bandwidth
measured in the same run.

GPU:  PYTHONPATH=. python3 -m experiments.decode.bench_decode --out=$OUT/bench_decode.json
      (--attention=pallas: the Pallas decode-attention kernel instead of XLA's attention;
       --persistent_configs=256:32:256: also batch 1 through the persistent layer kernel, one launch per
       layer, rows with attention 'persistent', speedups over the run's per-site dense)
CI:   PYTHONPATH=. .venv/bin/python -m experiments.decode.bench_decode --tiny
"""

from __future__ import annotations

import itertools
import json
import platform
import statistics
import time
from dataclasses import replace

import jax
import jax.numpy as jnp
from absl import app, flags
from tqdm import tqdm

from experiments import common
from wina_jax import checks
from wina_jax.bench.decode_setup import (
  MOSAIC_MODES,
  NoLinear,
  check_against_xla,
  linear_bytes,
  load_configs,
  make_sparsifier,
  on_mosaic,
  site_scores,
  ulp_sensitivity,
  with_band,
)
from wina_jax.bench.shapes import SHAPES
from wina_jax.bench.timing import run_record
from wina_jax.decode import decode_loop, decode_step, fuse_projections
from wina_jax.kernels import FusedThresholdSparsifier
from wina_jax.kernels import mosaic_gemv as MG
from wina_jax.kernels import persistent_config as PC
from wina_jax.kernels import persistent_layer as PL
from wina_jax.model import init_cache
from wina_jax.testing import add_shortcuts, random_params

common.check(
  flags.DEFINE_list("models", ["llama3_8b", "qwen25_7b"], "model shapes (wina_jax.bench.shapes.SHAPES)"),
  checks.each(checks.one_of(SHAPES), str, nonempty=True),
)
common.sparsities_flag(["0", "0.25", "0.4", "0.5", "0.65"], "target sparsities")
common.check(
  flags.DEFINE_list("batches", ["1", "2", "4", "8"], "batch sizes (>1: dense and teal only)"),
  checks.each(checks.count(), int),
)
flags.DEFINE_list("methods", ["teal", "wina", "wina_sc"], "sparse variants at batch 1")
common.sparsities_flag(["0.5", "0.65"], "sparsities timed at batch > 1", name="batch_sparsities")
common.check(
  flags.DEFINE_integer("steps", 32, "decode steps timed per repetition (positions 0..steps-1)"),
  checks.count(),
)
common.check(
  flags.DEFINE_integer("reps", 3, "timed repetitions (median); one more untimed warm-up"), checks.count()
)
common.check(flags.DEFINE_integer("max_len", 512, "KV cache slots"), checks.count())
common.check(
  flags.DEFINE_list(
    "configs",
    [],
    "JSONs of tuned kernel configs (experiments.decode.kernel_sweep; later files win per shape)",
  ),
  checks.each(checks.json_file(empty=False), str),
)
common.check(
  flags.DEFINE_list(
    "config_sets",
    [],
    "alternative tilings timed side by side in one run: each entry is '+'-joined kernel_sweep JSONs laid over "
    "--configs (later files win per shape), e.g. a.json,a.json+b.json; empty = --configs alone",
  ),
  checks.each(checks.json_file(empty=False), str, split="+"),
)
flags.DEFINE_string("reduce", "", "override the configs' split-K reduce (partials | atomic | semaphore)")
flags.DEFINE_enum(
  "backend",
  "auto",
  ["auto", "pallas", "xla"],
  "masked_linear backend of the sparse variants "
  "(auto: Pallas for batch 1 on GPU, else XLA; pallas: up to MAX_ROWS rows; xla: mask-then-matmul)",
)
flags.DEFINE_list(
  "attention",
  ["xla"],
  "decode attentions to time, each in the same run: xla (XLA ops) and / or pallas (the Pallas kernel, "
  "wina_jax.kernels.decode_attention; interpret mode off the GPU)",
)
common.check(
  flags.DEFINE_list(
    "dense_at",
    [],
    "sparse kernels' dense-fallback kept fractions to time, each in the same run (KernelConfig.dense_at; "
    "above 1: off); empty = the configs' own",
  ),
  checks.each(checks.real(0.0)),
)
flags.DEFINE_list(
  "fuse_norm",
  ["false"],
  "RMSNorm in the sparse kernels' prologue (FusedThresholdSparsifier.fuse_norm), each value timed in the "
  "same run: false, true or false,true",
)
flags.DEFINE_list(
  "pdl_trigger",
  ["false"],
  "the per-site Triton kernels' early griddepcontrol.launch_dependents (KernelConfig.pdl_trigger), each value "
  "timed in the same run: false, true or false,true",
)
common.check(
  flags.DEFINE_list(
    "persistent_configs",
    [],
    "persistent layer kernel tilings (persistent_config.parse_config: chunk:block_k:block_n[:num_warps[:num_stages"
    "[:dense_at[:block_s[:programs_per_sm[:mode[:split[:acc[:skip_empty[:timers]]]]]]]]]]]), each timed at batch 1"
    " for dense and every sparse variant but wina_sc; empty = none",
  ),
  checks.each(checks.parses(PC.parse_config), str),
)
common.check(
  flags.DEFINE_list(
    "mosaic_configs",
    [],
    "Mosaic GPU kept-row kernel tilings (mosaic_gemv.parse: "
    "block_k:block_n:stages[:splits[:programs[:gather[:compact]]]]), each timed at batch 1 for every sparse variant but wina_sc as backend 'mosaic'; empty = none",
  ),
  checks.each(checks.parses(MG.parse), str),
)
common.check(
  flags.DEFINE_list(
    "mosaic_modes",
    [],
    "also time each --mosaic_configs tiling in these modes (decode_setup.on_mosaic), labelled '<spec>+<mode>': "
    "fold (each site's launch also runs the RMSNorm before it / the residual add after it), mlp22 (each MLP as "
    "one persistent launch, as session 22 ran it), mlp (the MLP launch adding the residual, the rest as fold)",
  ),
  checks.each(checks.one_of(MOSAIC_MODES[1:]), str),
)
flags.DEFINE_bool("host_rows", True, "time the host-dispatch rows (no_linear_host, dense_host)")
common.check(flags.DEFINE_string("out", "", "write results JSON here"), checks.out_path())
flags.DEFINE_bool("tiny", False, "CPU smoke test: tiny model, XLA path, 1 rep")
FLAGS = flags.FLAGS


def copy_bandwidth() -> dict:
  """Device copy bandwidths in GB/s (bytes read + written): XLA `a * 2` on 2 GiB, and torch's copy."""
  out = {}
  if jax.default_backend() == "gpu":
    try:
      import torch

      a = torch.empty(2**30, dtype=torch.bfloat16, device="cuda").normal_()
      b = torch.empty_like(a)
      ts = []
      for _ in range(12):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        torch.cuda.synchronize()
        ts.append(s.elapsed_time(e) / 1e3)
      out["torch_copy"] = 2 * a.numel() * 2 / statistics.median(ts[2:]) / 1e9
      del a, b
      torch.cuda.empty_cache()
    except Exception as e:  # torch missing or without CUDA: keep the XLA figure
      out["torch_copy_error"] = repr(e)
  n = 2**30 if jax.default_backend() == "gpu" else 2**22
  a = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.bfloat16)
  f = jax.jit(lambda a: a * 2)
  out["xla_scale"] = 2 * n * 2 / _median_time(lambda: f(a), 10) / 1e9
  return out


def booleans(name: str) -> list[bool]:
  """The list flag --name (false / true entries) as booleans."""
  values = {"false": False, "true": True}
  bad = [v for v in getattr(FLAGS, name) if v.lower() not in values]
  if bad:
    raise ValueError(f"--{name} takes false / true, got {bad}")
  return [values[v.lower()] for v in getattr(FLAGS, name)]


def attention_backend(name: str) -> str:
  """An --attention entry as a `model.ATTENTION_BACKENDS` name: 'pallas' runs in interpret mode off the GPU."""
  if name not in ("xla", "pallas"):
    raise ValueError(f"--attention entry {name!r} is not 'xla' or 'pallas'")
  return "interpret" if name == "pallas" and jax.default_backend() != "gpu" else name


def row_label(row: dict) -> str:
  """What ran a row's sparse sites beyond its variant: the Mosaic tiling and mode, the persistent tiling, the
  fused norm, the dense-at switch or the config set ('' for the per-site Triton kernels as configured)."""
  parts = [f"mosaic={row['mosaic']}"] if "mosaic" in row else []
  parts += [f"persistent={row['persistent']}"] if "persistent" in row else []
  parts += ["fuse_norm"] if row.get("fuse_norm") else []
  parts += ["pdl_trigger"] if row.get("pdl_trigger") else []
  parts += [f"dense_at={row['dense_at']:g}"] if "dense_at" in row else []
  parts += [f"set={row['config_set']}"] if "config_set" in row else []
  return " ".join(parts)


def _median_time(fn, n) -> float:
  jax.block_until_ready(fn())
  ts = []
  for _ in range(n):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts)


def time_decode(params, cfg, sparsifier, tokens, max_len, reps, host_loop=False, attention="xla") -> list:
  """Seconds per decode step of each of `reps` runs of tokens [B, T] from an empty cache (after one untimed
  run): one `decode_loop` call per run, or (host_loop) one `decode_step` dispatch per token. A row reports
  their median, and their range as its band within the call."""
  times = []
  for r in range(reps + 1):
    cache = init_cache(cfg, tokens.shape[0], max_len, jnp.bfloat16)
    jax.block_until_ready(cache)
    t0 = time.perf_counter()
    if host_loop:
      for j in range(tokens.shape[1]):
        _, _, cache = decode_step(params, tokens[:, j], cache, sparsifier, cfg=cfg, attention=attention)
    else:
      _, _, cache = decode_loop(params, tokens, cache, sparsifier, cfg=cfg, attention=attention)
    jax.block_until_ready(cache)
    if r:
      times.append((time.perf_counter() - t0) / tokens.shape[1])
  return times


def step_bytes(params, cfg, batch, max_len, kept=None, shortcuts=False) -> int:
  """Bytes one decode step must move: kept weight rows, lm_head, embedding rows, KV cache (all slots)."""
  total = linear_bytes(params, cfg, kept)
  d, L = cfg.hidden_size, cfg.num_hidden_layers
  total += d * cfg.vocab_size * 2 + batch * d * 2
  total += 2 * L * batch * max_len * cfg.kv_dim * 2
  if shortcuts:
    total += 2 * L * d * d * 2
  return int(total)


def bench_model(name, key, config_sets, backend) -> list[dict]:
  """Rows of one model shape: every --attention entry times dense (per batch), the step without linear
  sites and each sparse variant; speedups are over the fastest dense of the run at the same batch."""
  cfg0 = SHAPES[name]
  steps, reps, max_len = FLAGS.steps, FLAGS.reps, FLAGS.max_len
  sparsities = [float(s) for s in FLAGS.sparsities]
  batches = [int(b) for b in FLAGS.batches]
  attentions = [attention_backend(a) for a in FLAGS.attention]
  bmax = max(batches)
  tokens = jax.random.randint(jax.random.fold_in(key, 1), (bmax, steps), 0, cfg0.vocab_size)
  rows = []

  def record(variant, sparsity, batch, times, nbytes, attention, kept=None, **extra):
    secs = statistics.median(times)
    row = dict(
      model=name,
      variant=variant,
      attention=attention,
      sparsity=sparsity,
      batch=batch,
      ms_per_step=secs * 1e3,
      ms_range=[min(times) * 1e3, max(times) * 1e3],
      tokens_per_s=batch / secs,
      bytes_per_step=nbytes,
      gb_per_s=nbytes / secs / 1e9,
      **extra,
    )
    if kept is not None:
      row["kept_weight_fraction"] = float(linear_bytes(params, cfg, kept) / linear_bytes(params, cfg))
    rows.append(row)
    label = row_label(row)
    tqdm.write(
      f"{name:10s} {variant:12s} {attention:9s} s={sparsity:.2f} b={batch} {secs * 1e3:8.3f} ms "
      + f"({min(times) * 1e3:.3f}-{max(times) * 1e3:.3f}) "
      + (label + " ") * bool(label)
      + f"{nbytes / secs / 1e9:8.1f} GB/s {extra.get('check_vs_xla', '')}"
    )

  bands = {}  # (method, sparsity, batch) -> the XLA step's one-ulp sensitivity, measured once

  def checked(sp, key, batch, attention="xla"):
    """`check_against_xla` of sp's step with the band its XLA path's one-ulp sensitivity sets."""
    if key not in bands:
      bands[key] = ulp_sensitivity(params, cfg, sp, tokens[:batch], max_len)
    return with_band(check_against_xla(params, cfg, sp, tokens[:batch], max_len, attention), bands[key])

  params = random_params(cfg0, key)
  t = time_decode(params, cfg0, None, tokens[:1], max_len, reps)
  record("dense_unfused", 0.0, 1, t, step_bytes(params, cfg0, 1, max_len), "xla")
  params, cfg = fuse_projections(params, cfg0)
  jax.block_until_ready(params)
  dense = {b: statistics.median(t) if b == 1 else float("inf") for b in batches}
  rest_bytes = step_bytes(params, cfg, 1, max_len) - linear_bytes(params, cfg)
  for att in attentions:
    for b in batches:
      t = time_decode(params, cfg, None, tokens[:b], max_len, reps, attention=att)
      dense[b] = min(dense[b], statistics.median(t))
      record("dense", 0.0, b, t, step_bytes(params, cfg, b, max_len), att)
    t = time_decode(params, cfg, NoLinear(), tokens[:1], max_len, reps, attention=att)
    record("no_linear", 0.0, 1, t, rest_bytes, att)
  if FLAGS.host_rows:  # the host loop's floor: one dispatch per token of a step that reads no weights
    t = time_decode(params, cfg, NoLinear(), tokens[:1], max_len, reps, host_loop=True)
    record("no_linear_host", 0.0, 1, t, rest_bytes, "xla")
    t = time_decode(params, cfg, None, tokens[:1], max_len, reps, host_loop=True)
    record("dense_host", 0.0, 1, t, step_bytes(params, cfg, 1, max_len), "xla")

  def persistent(variant, sparsity, sp, kept=None):
    """Rows of `sp` through the persistent layer kernel, one per --persistent_configs entry; a failure
    (compilation, a refused grid) becomes the row's 'error' instead of ending the run."""
    for spec in FLAGS.persistent_configs:
      config = PC.parse_config(spec)
      psp, extra = sp.as_persistent(config), {"persistent": spec}
      reason = PL.unsupported(cfg, params["layers"]["0"], 1, 1, (), config)
      if reason:  # the step then runs the per-site kernels: say so in the row
        extra["persistent_fallback"] = reason
      try:
        # One step first: a grid that is not co-resident ends each launch on the waits' watchdog (~0.05 s),
        # and check_waits raises here, before a timed run of thousands of such launches.
        cache = init_cache(cfg, 1, max_len, jnp.bfloat16)
        jax.block_until_ready(decode_step(params, tokens[:1, 0], cache, psp, cfg=cfg))
        psp.check_waits()
        t = time_decode(params, cfg, psp, tokens[:1], max_len, reps)
        psp.check_waits()
        if sparsity == 0.5:
          extra["check_vs_xla"] = checked(psp, (variant, sparsity, 1), 1)
      except Exception as e:  # recorded: the other rows still run
        tqdm.write(f"persistent {variant} {sparsity} {spec}: {e!r}")
        rows.append(
          dict(
            model=name,
            variant=variant,
            attention="persistent",
            sparsity=sparsity,
            batch=1,
            error=repr(e)[:2000],
            **extra,
          )
        )
        continue
      record(variant, sparsity, 1, t, step_bytes(params, cfg, 1, max_len, kept), "persistent", kept, **extra)

  persistent("dense", 0.0, FusedThresholdSparsifier.create({}))
  variants = [m for m in FLAGS.methods if m != "wina_sc"]
  for method in tqdm(variants, desc=f"{name} methods"):
    scores = site_scores(params, cfg, tokens, with_scale=method == "wina")
    for b in batches if method == "teal" else [1]:
      for s in sparsities if b == 1 else [float(x) for x in FLAGS.batch_sparsities]:
        for set_i, dense_at, fuse, trigger in itertools.product(
          range(len(config_sets)),
          [float(v) for v in FLAGS.dense_at] or [None],
          booleans("fuse_norm"),
          booleans("pdl_trigger"),
        ):
          cs = config_sets[set_i]
          cs = cs if dense_at is None else {k: replace(c, dense_at=dense_at) for k, c in cs.items()}
          cs = {k: replace(c, pdl_trigger=True) for k, c in cs.items()} if trigger else cs
          sp, kept = make_sparsifier(scores, s, b, cs, backend)
          sp = sp.replace(fuse_norm=fuse)
          for att in attentions:
            t = time_decode(params, cfg, sp, tokens[:b], max_len, reps, attention=att)
            is_checked = s == 0.5 and b in (1, bmax)
            check = checked(sp, (method, s, b), b, att) if is_checked else None
            extra = {"check_vs_xla": check} if check else {}
            if dense_at is not None:
              extra["dense_at"] = dense_at
            if len(FLAGS.fuse_norm) > 1 or fuse:
              extra["fuse_norm"] = fuse
            if len(FLAGS.pdl_trigger) > 1 or trigger:
              extra["pdl_trigger"] = trigger
            if len(config_sets) > 1:
              extra["config_set"] = FLAGS.config_sets[set_i]
            record(method, s, b, t, step_bytes(params, cfg, b, max_len, kept), att, kept, **extra)
        if b == 1 and FLAGS.persistent_configs:
          persistent(method, s, *make_sparsifier(scores, s, 1, config_sets[0], backend))
        mosaic_runs = [(spec, mode) for spec in FLAGS.mosaic_configs for mode in [""] + FLAGS.mosaic_modes]
        for spec, mode in mosaic_runs if b == 1 else []:
          sp, kept = make_sparsifier(scores, s, 1, config_sets[0], backend)
          sp = on_mosaic(sp, spec, mode)
          for att in attentions:
            t = time_decode(params, cfg, sp, tokens[:1], max_len, reps, attention=att)
            extra = {"mosaic": spec + "+" * bool(mode) + mode}
            if s == 0.5:
              extra["check_vs_xla"] = checked(sp, (method, s, 1), 1, att)
            sp.check_waits()  # the modes that wait on the sparsifier's counter: raises if one gave up
            record(method, s, 1, t, step_bytes(params, cfg, 1, max_len, kept), att, kept, **extra)
    del scores
  if "wina_sc" in FLAGS.methods:
    params = add_shortcuts(params, seed=2)
    scores = site_scores(params, cfg, tokens, with_scale=True)
    for att in attentions:
      t = time_decode(params, cfg, None, tokens[:1], max_len, reps, attention=att)
      record("dense_sc", 0.0, 1, t, step_bytes(params, cfg, 1, max_len, shortcuts=True), att)
      for s in sparsities:
        sp, kept = make_sparsifier(scores, s, 1, config_sets[0], backend)
        t = time_decode(params, cfg, sp, tokens[:1], max_len, reps, attention=att)
        record("wina_sc", s, 1, t, step_bytes(params, cfg, 1, max_len, kept, shortcuts=True), att, kept)
  for r in rows:
    if "ms_per_step" in r:
      r["speedup"] = dense[r["batch"]] / (r["ms_per_step"] / 1e3)
  return rows


def main(argv):
  declared = common.setup(jnp.bfloat16)  # `random_params`, the cache
  del argv
  if FLAGS.tiny:
    FLAGS.models, FLAGS.steps, FLAGS.reps, FLAGS.max_len = ["tiny"], 4, 1, 16
    FLAGS.batches, FLAGS.sparsities = ["1", "2"], ["0", "0.5"]
  backend = FLAGS.backend if jax.default_backend() == "gpu" else "xla"
  config_sets = [
    load_configs(FLAGS.configs + (entry.split("+") if entry else []), FLAGS.reduce)
    for entry in FLAGS.config_sets or [""]
  ]
  result = {
    **run_record(declared),
    "host": platform.node(),
    "flags": {
      f: getattr(FLAGS, f)
      for f in (
        "models",
        "sparsities",
        "batches",
        "methods",
        "steps",
        "reps",
        "max_len",
        "configs",
        "config_sets",
        "reduce",
        "backend",
        "attention",
        "dense_at",
        "fuse_norm",
        "pdl_trigger",
        "persistent_configs",
        "host_rows",
      )
    },
    "copy_gb_per_s": copy_bandwidth(),
    "rows": [],
  }
  tqdm.write(f"copy bandwidth GB/s: {result['copy_gb_per_s']}")
  for i, name in enumerate(FLAGS.models):
    result["rows"] += bench_model(name, jax.random.PRNGKey(i), config_sets, backend)
    if FLAGS.out:
      with open(FLAGS.out, "w") as f:
        json.dump(result, f, indent=1)
  copy = max(v for k, v in result["copy_gb_per_s"].items() if not k.endswith("error"))
  print(
    f"\n{'model':10s} {'variant':13s} {'spars':>5s} {'B':>2s} {'ms':>8s} {'tok/s':>8s} {'x dense':>7s} "
    f"{'GB/step':>8s} {'GB/s':>7s} {'%copy':>6s}  {'range ms':>13s}  sites"
  )
  for r in result["rows"]:
    if "error" in r:
      print(f"{r['model']:10s} {r['variant']}+persistent {r['sparsity']:5.2f} error: {r['error'][:200]}")
      continue
    print(
      f"{r['model']:10s} {r['variant'] + {'xla': '', 'persistent': '+pl'}.get(r['attention'], '+pallas_attn'):13s} {r['sparsity']:5.2f} {r['batch']:2d} {r['ms_per_step']:8.3f} "
      f"{r['tokens_per_s']:8.1f} {r['speedup']:7.2f} {r['bytes_per_step'] / 1e9:8.3f} {r['gb_per_s']:7.0f} "
      f"{100 * r['gb_per_s'] / copy:6.1f}  {r['ms_range'][0]:6.3f}-{r['ms_range'][1]:6.3f}  {row_label(r)}"
    )


if __name__ == "__main__":
  app.run(main)

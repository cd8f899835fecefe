"""Where the sparse decode step's fixed cost goes (issue 6): one process, one GPU, under a time budget.

Per model shape (random bf16 weights, batch 1, TEAL thresholds at each target sparsity as in
`experiments.decode.bench_decode`), it times one decode step of three variants:
  dense     our fused dense step;
  teal      the sweep's tiling per shape, with the sweep's reduce ('atomic' / 'partials': each sparse
            site is the Pallas kernel plus one XLA kernel, a memset or a partial-sum reduction);
  teal_sem  the same tilings with the 'semaphore' reduce (one launch per site, output in bf16);
each compiled once per XLA option set (`Lowered.compile(compiler_options=...)`, so one process covers
all sets): 'default'; 'cb_off' (no command buffers, i.e. no CUDA graphs); 'cb_min1' (command buffers
for fusions, cuBLAS(Lt), custom calls and cuDNN from one command up). Thresholds are traced, so one
executable serves every sparsity. It also records
  - the compiled module's kernel-level op counts (fusions, custom calls) per variant;
  - a profile of a few steps per variant (`wina_jax.bench.trace`): kernel time per step by
    category (sparse_gemv, matmul, copy, fusion), kernel count, busy time and span;
  - correctness of the semaphore reduce on every sparse site shape (vs the 'partials' reduce, and
    bitwise repeatability) and of one teal_sem step vs one teal step.
Jobs run in priority order (first model: semaphore check, default set, profile, 'cb_off'; the other
models' default set; first model 'cb_min1'); a job is skipped once `--budget_s` has passed, and the
JSON is rewritten after every job.

GPU:  PYTHONPATH=. python3 -m experiments.decode.decode_overhead --out=$OUT/decode_overhead.json
CPU smoke test (Pallas kernels in interpret mode):
  PYTHONPATH=. .venv/bin/python -m experiments.decode.decode_overhead --tiny
"""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from wina_jax import checks
from wina_jax.bench import decode_setup as B
from wina_jax.bench.shapes import SHAPES
from wina_jax.bench.timing import run_record
from wina_jax.bench.trace import summarize, trace_events
from wina_jax.decode import decode_step, fuse_projections, fused_site_shapes
from wina_jax.kernels import KernelConfig, masked_linear
from wina_jax.kernels.config import WORKSPACE_BLOCKS, resolve
from wina_jax.model import init_cache
from wina_jax.testing import random_params

common.check(
  flags.DEFINE_list(
    "sweeps",
    ["benchmarks/results/kernel_sweep_h200_a.json", "benchmarks/results/kernel_sweep_h200_b.json"],
    "kernel_sweep JSONs whose 'best' tilings are merged (later files win per shape)",
  ),
  checks.each(checks.json_file(empty=False), str),
)
common.check(
  flags.DEFINE_integer("profile_steps", 4, "decode steps profiled per variant (0: no profile)"),
  checks.count(0),
)
common.check(
  flags.DEFINE_float("budget_s", 290.0, "no new job starts after this many seconds"), checks.real(0.0)
)
common.check(
  flags.DEFINE_list(
    "models",
    ["llama3_8b", "qwen25_7b"],
    "model shapes (wina_jax.bench.shapes.SHAPES); the first also gets the option-set comparison",
  ),
  checks.each(checks.one_of(SHAPES), str, nonempty=True),
)
common.sparsities_flag(["0.5", "0.65"], "TEAL target sparsities")
common.check(
  flags.DEFINE_integer("steps", 32, "decode steps timed per repetition (positions 0..steps-1)"),
  checks.count(),
)
common.check(
  flags.DEFINE_integer("reps", 5, "timed repetitions (median); one more untimed warm-up"), checks.count()
)
common.check(flags.DEFINE_integer("max_len", 512, "KV cache slots"), checks.count())
common.check(
  flags.DEFINE_string("out", "", "write results JSON here (rewritten after every job)"), checks.out_path()
)
flags.DEFINE_bool(
  "tiny", False, "CPU smoke test: tiny model, Pallas kernels in interpret mode, default options only"
)
FLAGS = flags.FLAGS

OPTION_SETS = {
  "default": {},
  "cb_off": {"xla_gpu_enable_command_buffer": ""},
  "cb_min1": {
    "xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN",
    "xla_gpu_graph_min_graph_size": 1,
  },
}
VARIANTS = ("dense", "teal", "teal_sem")


def kernel_counts(compiled) -> dict:
  """Kernel-level ops of the compiled module's entry computation."""
  text = compiled.as_text()
  entry = text[text.rfind("ENTRY") :]
  return {
    k: len(re.findall(p, entry))
    for k, p in (("fusion", r"= [^=]*? fusion\("), ("custom_call", r"custom-call\("), ("call", r" call\("))
  }


def run_steps(compiled, params, sp, tokens, max_len, cfg, reps) -> float:
  """Median seconds per step over `reps` runs of tokens [1, T] from an empty cache (one warm-up run),
  one dispatch per token: steps faster than the host's ~2.6 ms dispatch floor on the H200 read as that
  floor (`experiments.decode.bench_decode` times in one on-device loop instead)."""
  times = []
  for r in range(reps + 1):
    cache = init_cache(cfg, 1, max_len, jnp.bfloat16)
    jax.block_until_ready(cache)
    t0 = time.perf_counter()
    for j in range(tokens.shape[1]):
      _, _, cache = compiled(params, tokens[:, j], cache, sp)
    jax.block_until_ready(cache)
    if r:
      times.append((time.perf_counter() - t0) / tokens.shape[1])
  return statistics.median(times)


def check_semaphore(cfg, configs, backend) -> list[dict]:
  """Per sparse site shape at 50%: the semaphore reduce vs the 'partials' reduce (rel. error) and
  vs itself (bitwise, five runs), and whether its workspace is zero afterwards."""
  rows = []
  for i, (d_in, segs) in enumerate(fused_site_shapes(cfg)):
    n = sum(segs)
    tiling = configs.get((d_in, n), KernelConfig())
    key = jax.random.fold_in(jax.random.PRNGKey(11), i)
    x = jax.random.normal(key, (1, d_in), jnp.bfloat16)
    w = jax.random.normal(jax.random.fold_in(key, 1), (d_in, n), jnp.bfloat16)
    t = jnp.full((len(segs),), jnp.quantile(jnp.abs(x.astype(jnp.float32)), 0.5))
    ws = jnp.zeros((1, WORKSPACE_BLOCKS), jnp.int32)
    f = jax.jit(
      lambda x, w, t, ws, c: masked_linear(x, w, t, None, segs, backend=backend, config=c, workspace=ws),
      static_argnums=4,
    )
    sem = dataclasses.replace(tiling, reduce="semaphore")
    ref = f(x, w, t, ws, dataclasses.replace(tiling, reduce="partials")).astype(jnp.float32)
    outs = [np.asarray(f(x, w, t, ws, sem).astype(jnp.float32)) for _ in range(5)]
    rows.append(
      {
        "shape": f"{d_in}x{n}",
        "config": dataclasses.asdict(resolve(sem, d_in, segs)),
        "rel_err_vs_partials": float(np.linalg.norm(outs[0] - ref) / np.linalg.norm(ref)),
        "bitwise_repeatable": all(np.array_equal(o, outs[0]) for o in outs),
        "workspace_zero": bool(jnp.all(ws == 0)),
      }
    )
  return rows


class Runner:
  def __init__(self, out_path: str, declared: dict):
    self.t0 = time.time()
    self.out_path = out_path
    self.res = {
      **run_record(declared),
      "timings": [],
      "profiles": {},
      "kernel_counts": {},
      "checks": {},
      "skipped": [],
      "errors": [],
      "compile_s": {},
    }

  def elapsed(self) -> float:
    return time.time() - self.t0

  def save(self):
    self.res["elapsed_s"] = self.elapsed()
    if self.out_path:
      with open(self.out_path, "w") as f:
        json.dump(self.res, f, indent=1)

  def job(self, name: str, fn):
    """Runs fn() unless over budget; failures are recorded, not fatal."""
    if self.elapsed() > FLAGS.budget_s:
      self.res["skipped"].append(name)
      print(f"[{self.elapsed():6.1f}s] skip {name} (budget)", flush=True)
      return None
    try:
      t = time.time()
      out = fn()
      print(f"[{self.elapsed():6.1f}s] {name} done in {time.time() - t:.1f}s", flush=True)
      return out
    except Exception as e:  # a flag XLA rejects, a kernel Triton rejects: record and go on
      self.res["errors"].append({"job": name, "error": f"{type(e).__name__}: {str(e)[:600]}"})
      print(f"[{self.elapsed():6.1f}s] {name} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
      return None
    finally:
      self.save()


class Model:
  """One model shape: params, thresholds, lowered steps per variant, compiled steps per (variant, option set)."""

  def __init__(self, name, configs, backend, runner: Runner):
    self.name, self.runner = name, runner
    cfg0 = SHAPES[name]
    params, self.cfg = fuse_projections(random_params(cfg0, jax.random.PRNGKey(0)), cfg0)
    self.params = jax.block_until_ready(params)
    del params
    self.tokens = jax.random.randint(jax.random.PRNGKey(1), (1, FLAGS.steps), 0, self.cfg.vocab_size)
    scores = B.site_scores(self.params, self.cfg, self.tokens, with_scale=False)
    sem = {k: dataclasses.replace(c, reduce="semaphore") for k, c in configs.items()}
    self.sps = {}
    for s in (float(v) for v in FLAGS.sparsities):
      self.sps[("teal", s)], kept = B.make_sparsifier(scores, s, 1, configs, backend)
      self.sps[("teal_sem", s)], _ = B.make_sparsifier(scores, s, 1, sem, backend)
      self.runner.res.setdefault("kept_weight_fraction", {})[f"{name}/{s}"] = float(
        B.linear_bytes(self.params, self.cfg, kept) / B.linear_bytes(self.params, self.cfg)
      )
    del scores
    self.lowered, self.compiled = {}, {}

  def sp(self, variant, s=None):
    return (
      None if variant == "dense" else self.sps[(variant, s if s is not None else float(FLAGS.sparsities[0]))]
    )

  def compile(self, variant, opts):
    if variant not in self.lowered:
      cache = init_cache(self.cfg, 1, FLAGS.max_len, jnp.bfloat16)
      self.lowered[variant] = decode_step.lower(
        self.params, self.tokens[:, 0], cache, self.sp(variant), cfg=self.cfg
      )
    t = time.time()
    c = self.lowered[variant].compile(compiler_options=OPTION_SETS[opts] or None)
    self.runner.res["compile_s"][f"{self.name}/{variant}/{opts}"] = time.time() - t
    self.compiled[(variant, opts)] = c
    if opts == "default":
      self.runner.res["kernel_counts"][f"{self.name}/{variant}"] = kernel_counts(c)
    return c

  def time(self, variant, opts):
    c = self.compiled.get((variant, opts)) or self.compile(variant, opts)
    sps = [None] if variant == "dense" else [float(v) for v in FLAGS.sparsities]
    for s in sps:
      secs = run_steps(c, self.params, self.sp(variant, s), self.tokens, FLAGS.max_len, self.cfg, FLAGS.reps)
      row = dict(model=self.name, variant=variant, options=opts, sparsity=s or 0.0, ms_per_step=secs * 1e3)
      self.runner.res["timings"].append(row)
      print(
        f"  {self.name:10s} {variant:9s} {opts:8s} s={row['sparsity']:.2f} {secs * 1e3:8.3f} ms", flush=True
      )

  def profile(self, variant):
    c = self.compiled[(variant, "default")]
    s = float(FLAGS.sparsities[0])
    steps = FLAGS.profile_steps

    def go():
      cache = init_cache(self.cfg, 1, FLAGS.max_len, jnp.bfloat16)
      sp = self.sp(variant, s)
      for j in range(steps):
        _, _, cache = c(self.params, self.tokens[:, j], cache, sp)
      return cache

    go()
    self.runner.res["profiles"][f"{self.name}/{variant}/{s}"] = summarize(trace_events(go), steps, top=12)

  def check_steps(self):
    """One step at the last position after a dense prefix: teal_sem vs teal logits, and teal_sem twice."""
    s = float(FLAGS.sparsities[0])
    dense = self.compiled[("dense", "default")]
    cache = init_cache(self.cfg, 1, FLAGS.max_len, jnp.bfloat16)
    for j in range(self.tokens.shape[1] - 1):
      _, _, cache = dense(self.params, self.tokens[:, j], cache, None)
    outs = {}
    for key in ("teal", "teal_sem", "teal_sem_again"):
      variant = key.replace("_again", "")
      outs[key] = self.compiled[(variant, "default")](
        self.params, self.tokens[:, -1], jax.tree.map(jnp.copy, cache), self.sp(variant, s)
      )
    (ta, la, _), (tb, lb, _), (_, lc, _) = outs["teal"], outs["teal_sem"], outs["teal_sem_again"]
    self.runner.res["checks"][f"{self.name}/step"] = {
      "rel_err_sem_vs_teal": float(jnp.linalg.norm(lb - la) / jnp.linalg.norm(la)),
      "same_token": bool(jnp.all(ta == tb)),
      "sem_bitwise_repeatable": bool(jnp.array_equal(lb, lc)),
    }


def summary(res) -> str:
  rows = res["timings"]
  base = {(r["model"], r["options"]): r["ms_per_step"] for r in rows if r["variant"] == "dense"}
  ref = {r["model"]: r["ms_per_step"] for r in rows if r["variant"] == "dense" and r["options"] == "default"}
  lines = [
    f"{'model':10s} {'variant':9s} {'options':8s} {'spars':>5s} {'ms/step':>8s} {'x dense(same opts)':>18s} "
    f"{'x dense(default)':>16s}"
  ]
  for r in rows:
    b, d = base.get((r["model"], r["options"])), ref.get(r["model"])
    lines.append(
      f"{r['model']:10s} {r['variant']:9s} {r['options']:8s} {r['sparsity']:5.2f} {r['ms_per_step']:8.3f} "
      f"{(b / r['ms_per_step']) if b else float('nan'):18.2f} {(d / r['ms_per_step']) if d else float('nan'):16.2f}"
    )
  for k, p in res["profiles"].items():
    if p["kernels_per_step"]:
      kinds = ", ".join(
        f"{n} {v['per_step']:.0f}x {v['ms'] * 1e3:.0f}us" for n, v in sorted(p["categories"].items())
      )
      lines.append(
        f"profile {k}: {p['kernels_per_step']:.0f} kernels, busy {p['busy_ms'] * 1e3:.0f} us, "
        f"span {p['span_ms'] * 1e3:.0f} us per step; {kinds}"
      )
    else:
      lines.append(f"profile {k}: no kernel events")
  for k, c in res["checks"].items():
    lines.append(f"check {k}: {c}")
  for k, c in res["kernel_counts"].items():
    lines.append(f"kernel counts {k}: {c}")
  lines.append("compile s: " + ", ".join(f"{k} {v:.0f}" for k, v in res["compile_s"].items()))
  if res["skipped"]:
    lines.append(f"skipped (budget): {res['skipped']}")
  for e in res["errors"]:
    lines.append(f"ERROR {e['job']}: {e['error'][:300]}")
  return "\n".join(lines)


def main(argv):
  declared = common.setup(jnp.bfloat16)  # `random_params`, the cache
  del argv
  gpu = jax.default_backend() == "gpu"
  if FLAGS.tiny:
    FLAGS.models, FLAGS.steps, FLAGS.reps, FLAGS.max_len = ["tiny"], 4, 1, 16
    FLAGS.sparsities, FLAGS.profile_steps = ["0.5"], 2
  # CPU smoke test: the Pallas kernels in interpret mode on tilings that fit the tiny shapes, so teal
  # ('partials' reduce) and teal_sem ('semaphore') run different code and check_steps compares them
  backend = "auto" if gpu else "interpret" if FLAGS.tiny else "xla"
  option_sets = list(OPTION_SETS) if gpu else ["default"]
  configs = B.load_configs(FLAGS.sweeps)
  if FLAGS.tiny:
    configs = {
      (d_in, sum(segs)): KernelConfig(chunk=64, block_k=16, block_n=32)
      for d_in, segs in fused_site_shapes(SHAPES["tiny"])
    }
  run = Runner(FLAGS.out, declared)
  run.res["backend"] = backend

  def other_options(m, sets):
    for opts in sets:
      for v in ("teal_sem", "dense", "teal"):
        run.job(f"{m.name}/{v}/{opts}", lambda: m.time(v, opts))

  first = None
  for i, name in enumerate(FLAGS.models):
    m = run.job(f"{name}/setup", lambda: Model(name, configs, backend, run))
    if m is None:
      continue
    if gpu and i == 0:
      run.job(
        f"{name}/check_semaphore",
        lambda: run.res["checks"].__setitem__(
          f"{name}/semaphore_kernel", check_semaphore(m.cfg, configs, backend)
        ),
      )
    for v in VARIANTS:
      run.job(f"{name}/{v}/default", lambda: m.time(v, "default"))
    if all((v, "default") in m.compiled for v in VARIANTS):
      run.job(f"{name}/check_steps", m.check_steps)
    if i == 0:
      first = m
      if FLAGS.profile_steps:
        for v in VARIANTS:
          if (v, "default") in m.compiled:
            run.job(f"{name}/{v}/profile", lambda: m.profile(v))
      other_options(m, option_sets[1:2])
  if first is not None:
    other_options(first, option_sets[2:])
  run.save()
  print("\n" + summary(run.res))


if __name__ == "__main__":
  app.run(main)

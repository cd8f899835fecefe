"""Where a decode step's time goes: the device kernels of `decode_loop`, from a JAX profiler trace.

  python -m experiments.profile_decode --models=llama3_8b,qwen25_7b --variants=dense,teal:0.5,teal:0.65 \
      --configs=benchmarks/results/kernel_sweep_h200_b.json --out=$OUT/profile.json
  python -m experiments.profile_decode --tiny          # CPU smoke test (host XLA ops, no device plane)

Per variant it traces one `decode_loop` run (random bf16 weights, thresholds at the sparsity quantile,
as `bench_decode`) and reports per step: kernels launched, busy time (the union of kernel intervals),
span (first kernel start to last kernel end) and the gap between them (idle device time: launch and
dispatch latency), plus busy time and count per kernel category. Uses `jax.profiler.ProfileData`, so it
needs no Nsight tools (Nsight Compute hung on XLA programs on the H200: decode_h200.md).
"""
from __future__ import annotations

import collections
import glob
import json
import os
import tempfile

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.bench_decode import load_configs, make_sparsifier, site_scores
from experiments.decode_models import SHAPES, random_params
from wina_jax.decode import decode_loop, fuse_projections
from wina_jax.model import init_cache

FLAGS = flags.FLAGS
# --models, --steps, --max_len, --configs, --out and --tiny are bench_decode's flags (imported).
flags.DEFINE_list("variants", ["dense", "teal:0.5", "teal:0.65", "wina:0.5"], "dense | METHOD:SPARSITY")
flags.DEFINE_integer("top", 12, "kernel names listed per variant")

CATEGORIES = (("sparse_gemv", ("sparse_gemv",)), ("matmul", ("gemm", "gemv", "cublas", "cutlass", "dot")),
              ("copy", ("memcpy", "memset", "copy")), ("fusion", ("fusion", "loop_", "input_", "wrapped_")))


def category(name: str) -> str:
  low = name.lower()
  return next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")


def kernel_events(xspace_path: str) -> list[tuple[str, float, float]]:
  """(name, start_ns, duration_ns) of every device kernel in a trace; on a host without a device
  plane, the XLA ops of the host's XLA threads instead (CPU smoke runs)."""
  pd = jax.profiler.ProfileData.from_file(xspace_path)
  device = [p for p in pd.planes if p.name.startswith("/device:")]
  out = []
  for plane in device:
    for line in plane.lines:
      if line.name.startswith("Stream") or "stream" in line.name.lower():
        out += [(e.name, e.start_ns, e.duration_ns) for e in line.events]
  if device:
    return out
  for plane in pd.planes:
    if plane.name == "/host:CPU":
      for line in plane.lines:
        if line.name.startswith("tf_XLA"):
          out += [(e.name, e.start_ns, e.duration_ns) for e in line.events
                  if not e.name.startswith("ThreadpoolListener")]
  return out


def summarize(events, steps: int, top: int) -> dict:
  """Per-step figures (ms, counts) of kernel events from one run of `steps` decode steps."""
  if not events:
    return {"kernels_per_step": 0}
  spans = sorted((s, s + d) for _, s, d in events)
  busy, cur_s, cur_e = 0.0, *spans[0]
  for s, e in spans[1:]:
    if s > cur_e:
      busy, cur_s, cur_e = busy + cur_e - cur_s, s, e
    else:
      cur_e = max(cur_e, e)
  busy += cur_e - cur_s
  span = max(e for _, e in spans) - spans[0][0]
  per_cat, per_name = collections.defaultdict(lambda: [0, 0.0]), collections.defaultdict(lambda: [0, 0.0])
  for name, _, d in events:
    for table, key in ((per_cat, category(name)), (per_name, name)):
      table[key][0] += 1
      table[key][1] += d
  ms = lambda ns: ns / steps / 1e6
  return {"kernels_per_step": len(events) / steps, "busy_ms": ms(busy), "span_ms": ms(span),
          "gap_ms": ms(span - busy),
          "categories": {c: {"per_step": n / steps, "ms": ms(t)} for c, (n, t) in
                         sorted(per_cat.items(), key=lambda kv: -kv[1][1])},
          "top_kernels": [{"name": k[:120], "per_step": n / steps, "ms": ms(t), "us_each": t / n / 1e3}
                          for k, (n, t) in sorted(per_name.items(), key=lambda kv: -kv[1][1])[:top]]}


def trace_run(params, cfg, sp, tokens, max_len) -> list:
  """Kernel events of one traced `decode_loop` run (compiled and warmed up first)."""
  def run():
    cache = init_cache(cfg, tokens.shape[0], max_len, jnp.bfloat16)
    return jax.block_until_ready(decode_loop(params, tokens, cache, sp, cfg=cfg))
  run()
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      run()
    path = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
    return kernel_events(path)


def profile_model(name: str, key, configs, backend: str, variants, steps: int, max_len: int, top: int):
  params, cfg = fuse_projections(random_params(SHAPES[name], key), SHAPES[name])
  tokens = jax.random.randint(jax.random.fold_in(key, 1), (1, steps), 0, cfg.vocab_size)
  scores, rows = {}, []
  for v in variants:
    method, _, s = v.partition(":")
    if method == "dense":
      sp = None
    else:
      if method not in scores:
        scores[method] = site_scores(params, cfg, tokens, with_scale=method == "wina")
      sp = make_sparsifier(scores[method], float(s), 1, configs, backend)[0]
    row = {"model": name, "variant": v, **summarize(trace_run(params, cfg, sp, tokens, max_len), steps, top)}
    rows.append(row)
    print(f"{name} {v:10s} kernels/step {row['kernels_per_step']:7.1f}  busy {row.get('busy_ms', 0):.3f} ms  "
          f"span {row.get('span_ms', 0):.3f} ms  gap {row.get('gap_ms', 0):.3f} ms", flush=True)
    for c, r in row.get("categories", {}).items():
      print(f"    {c:12s} {r['per_step']:7.1f}/step {r['ms']:.3f} ms", flush=True)
  return rows


def main(argv):
  del argv
  if FLAGS.tiny:
    FLAGS.models, FLAGS.steps, FLAGS.max_len = ["tiny"], 4, 16
  backend = "auto" if jax.default_backend() == "gpu" else "xla"
  configs = load_configs(FLAGS.configs)
  rows = []
  for i, name in enumerate(FLAGS.models):
    rows += profile_model(name, jax.random.PRNGKey(i), configs, backend, FLAGS.variants, FLAGS.steps,
                          FLAGS.max_len, FLAGS.top)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"jax": jax.__version__, "device": str(jax.devices()[0].device_kind), "flags": {
          "variants": FLAGS.variants, "steps": FLAGS.steps, "configs": FLAGS.configs}, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)

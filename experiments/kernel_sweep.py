"""Tune the sparse GEMV kernel on one GPU: time tilings per fused weight shape, check each against XLA.

Each shape is timed as a stack of distinct weight buffers (>= 240 MB, 4x the L2 never holds them) inside one
jit, like the unrolled decoder; rows of x are kept at the target sparsity by a threshold on |x|.

GPU:  PYTHONPATH=. python3 -m experiments.kernel_sweep --out=$OUT/sweep.json
"""
from __future__ import annotations

import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.decode_models import SHAPES
from wina_jax.decode import fused_site_shapes
from wina_jax.kernels import KernelConfig, masked_linear
from wina_jax.kernels.config import WORKSPACE_BLOCKS, fits

flags.DEFINE_list("models", ["llama3_8b", "qwen25_7b"], "model shapes to tune")
flags.DEFINE_float("sparsity", 0.5, "sparsity the tilings are ranked at")
flags.DEFINE_list("check_sparsities", ["0", "0.65"], "sparsities the best tilings are also timed at")
flags.DEFINE_integer("top", 3, "best tilings per shape re-timed with other pipeline depths")
flags.DEFINE_float("budget_s", 60.0, "seconds per shape after which untried tilings are skipped")
flags.DEFINE_string("out", "", "write results JSON here")
FLAGS = flags.FLAGS

_BASE = [KernelConfig("masked", 128, 128, 128, 4), KernelConfig("masked", 32, 32, 512, 4),
         KernelConfig("masked", 128, 64, 512, 4), KernelConfig("masked", 64, 64, 256, 4),
         KernelConfig("compact", 256, 32, 256, 4), KernelConfig("compact", 512, 64, 128, 8),
         KernelConfig("compact", 256, 64, 128, 8), KernelConfig("compact", 128, 32, 256, 4),
         KernelConfig("masked", 64, 64, 128, 2), KernelConfig("compact", 256, 32, 256, 2)]
CANDIDATES = [dataclasses.replace(c, reduce=r) for c in _BASE for r in ("atomic", "partials", "semaphore")]


def timed(fn, *args, n=30, reps=3) -> float:
  """Seconds per call: n calls dispatched back to back (host overhead hidden), median of `reps`."""
  jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(reps):
    t0 = time.perf_counter()
    outs = [fn(*args) for _ in range(n)]
    jax.block_until_ready(outs)
    ts.append((time.perf_counter() - t0) / n)
  return statistics.median(ts)


def main(argv):
  del argv
  key = jax.random.PRNGKey(0)
  res = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "jax": jax.__version__,
         "device": str(jax.devices()[0].device_kind), "shapes": {}, "best": {}}
  for model in FLAGS.models:
    for d_in, segs in fused_site_shapes(SHAPES[model]):
      n = sum(segs)
      name = f"{d_in}x{n}"
      if name in res["shapes"]:
        continue
      nbytes = d_in * n * 2
      copies = max(2, -(-240_000_000 // nbytes))
      ws = [jax.random.normal(jax.random.fold_in(key, i), (d_in, n), jnp.bfloat16) for i in range(copies)]
      x = jax.random.normal(jax.random.fold_in(key, 99), (1, d_in), jnp.bfloat16)

      def thr(s):
        return jnp.full((len(segs),), -1.0) if s == 0 else jnp.full(
            (len(segs),), jnp.quantile(jnp.abs(x.astype(jnp.float32)), s, method="lower"))

      space = jnp.zeros((copies, WORKSPACE_BLOCKS), jnp.int32)   # 'semaphore' reduce: one row per copy

      def run(cfg, backend):
        return jax.jit(lambda x, t, ws: [masked_linear(x, w, t, None, segs, backend=backend, config=cfg,
                                                       workspace=space, slot=i) for i, w in enumerate(ws)])

      xla = run(None, "xla")
      dense = jax.jit(lambda x, ws: [x @ w for w in ws])
      entry = {"copies": copies, "bytes": nbytes, "xla_dense_us": timed(dense, x, ws) / copies * 1e6,
               "xla_masked_us": {}, "configs": []}
      for s in [FLAGS.sparsity] + [float(v) for v in FLAGS.check_sparsities]:
        entry["xla_masked_us"][str(s)] = timed(xla, x, thr(s), ws) / copies * 1e6

      def measure(cfg, s):
        f = run(cfg, "pallas")
        t = thr(s)
        got, ref = f(x, t, ws[:1])[0].astype(jnp.float32), xla(x, t, ws[:1])[0].astype(jnp.float32)
        err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
        return timed(f, x, t, ws) / copies * 1e6, err

      rows, start = [], time.time()
      for cfg in CANDIDATES:
        if not fits(cfg, d_in, segs) or time.time() - start > FLAGS.budget_s:
          continue
        try:
          us, err = measure(cfg, FLAGS.sparsity)
        except Exception as e:   # a tiling Triton rejects (registers, shared memory): skip it
          print(f"{name} {cfg} failed: {str(e)[:200]}")
          continue
        rows.append({"config": dataclasses.asdict(cfg), "sparsity": FLAGS.sparsity, "us": us, "rel_err": err})
        print(f"{name} {cfg.mode:7s} C{cfg.chunk:5d} BK{cfg.block_k:4d} BN{cfg.block_n:4d} w{cfg.num_warps} "
              f"s{cfg.num_stages} {cfg.reduce:8s}: {us:8.1f} us {nbytes / us / 1e3:6.0f} GB/s(dense-equiv) "
              f"err {err:.1e}", flush=True)
      rows.sort(key=lambda r: r["us"])
      for r in list(rows[:FLAGS.top]):
        for stages in (1, 3):
          cfg = KernelConfig(**{**r["config"], "num_stages": stages})
          us, err = measure(cfg, FLAGS.sparsity)
          rows.append({"config": dataclasses.asdict(cfg), "sparsity": FLAGS.sparsity, "us": us, "rel_err": err})
      rows.sort(key=lambda r: r["us"])
      best = KernelConfig(**rows[0]["config"])
      for s in [float(v) for v in FLAGS.check_sparsities]:
        us, err = measure(best, s)
        rows.append({"config": dataclasses.asdict(best), "sparsity": s, "us": us, "rel_err": err})
      entry["configs"] = rows
      res["shapes"][name] = entry
      res["best"][name] = rows[0]["config"]
      print(f"== {name}: dense {entry['xla_dense_us']:.1f} us ({nbytes / entry['xla_dense_us'] / 1e3:.0f} GB/s), "
            f"xla masked {entry['xla_masked_us']}, best {rows[0]['us']:.1f} us at {FLAGS.sparsity} "
            f"({entry['xla_dense_us'] / rows[0]['us']:.2f}x), {best}", flush=True)
      del ws
      if FLAGS.out:
        with open(FLAGS.out, "w") as f:
          json.dump(res, f, indent=1)


if __name__ == "__main__":
  app.run(main)

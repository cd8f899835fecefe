"""Tune the sparse GEMV kernel on one GPU: time tilings per fused weight shape, check each against XLA.

Each shape is timed as a stack of distinct weight buffers (>= 600 MB: the L2 never holds them, and one
call's GPU time hides its dispatch) inside one jit, like the unrolled decoder; rows of x are kept at the
target sparsity by a threshold on |x|.

GPU:  PYTHONPATH=. python3 -m experiments.decode.kernel_sweep --out=$OUT/sweep.json
Chosen tilings only (kernels.config.parse), on some shapes:
      PYTHONPATH=. python3 -m experiments.decode.kernel_sweep --shapes=4096x6144,4096x4096 \
        --candidates=balanced:128:32:256:4:3:semaphore:prefetch,compact:256:32:256:4:3:atomic --out=...
CPU smoke test (interpret mode):
      .venv/bin/python -m experiments.decode.kernel_sweep --models=tiny --backend=interpret --copies=2 --budget_s=0 --top=1
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import common
from wina_jax import checks
from wina_jax.bench.decode_setup import teal_thresholds
from wina_jax.bench.shapes import SHAPES
from wina_jax.bench.timing import fixed_cost_fit, run_record, timed
from wina_jax.decode import fused_site_shapes
from wina_jax.kernels import KernelConfig, masked_linear
from wina_jax.kernels.config import WORKSPACE_BLOCKS, parse, resolve

common.check(
  flags.DEFINE_list("models", ["llama3_8b", "qwen25_7b"], "model shapes to tune"),
  checks.each(checks.one_of(SHAPES), str, nonempty=True),
)
common.check(flags.DEFINE_float("sparsity", 0.5, "sparsity the tilings are ranked at"), checks.fraction())
common.check(
  flags.DEFINE_list("check_sparsities", ["0", "0.65"], "sparsities the best tilings are also timed at"),
  checks.each(checks.fraction()),
)
common.check(
  flags.DEFINE_integer(
    "top", 3, "best tilings per shape re-timed with the other reduces and another pipeline depth"
  ),
  checks.count(),
)
common.check(
  flags.DEFINE_float(
    "budget_s", 60.0, "seconds per shape after which untried tilings are skipped (one is always tried)"
  ),
  checks.real(0.0),
)
common.check(flags.DEFINE_string("out", "", "write results JSON here"), checks.out_path())
flags.DEFINE_enum("backend", "pallas", ["pallas", "interpret"], "'interpret': CPU smoke test of the script")
common.check(
  flags.DEFINE_integer(
    "copies",
    0,
    "weight buffers per shape (0: enough for 600 MB, 10x the H200's L2, so one call's GPU time hides its dispatch)",
  ),
  checks.count(0),
)
flags.DEFINE_list(
  "candidates",
  [],
  "tilings to try instead of the built-in list, each 'mode:chunk:block_k:block_n[:warps[:stages[:reduce[:loop]]]]' "
  "(kernels.config.parse), e.g. balanced:128:32:256:4:3:semaphore",
)
flags.DEFINE_list("shapes", [], "only these fused shapes, as d_inxd_out (e.g. 4096x6144); empty = all")
FLAGS = flags.FLAGS

# Tried in this order within --budget_s per shape, with the 'atomic' reduce; the --top best are re-timed
# with the other reduces and another pipeline depth. Masked mode's static loops let Triton pipeline
# the weight loads, compact mode's loop='prefetch' pipelines them by hand; short chunks (<= 128 rows)
# are nearly one-shot tiles; block_n 512 / 1024 reads each kept row in 1-2 KB runs (sessions 2-3 found
# the large shapes streaming at ~3 TB/s of kept rows in 512-byte runs, below XLA's dense ~4 TB/s).
_BASE = [
  KernelConfig("compact", 256, 32, 256, 4, 3, loop="prefetch"),
  KernelConfig("compact", 256, 32, 256, 4, 3),
  KernelConfig("masked", 128, 128, 128, 4, 2),
  KernelConfig("masked", 32, 32, 512, 4, 1),
  KernelConfig("compact", 256, 16, 512, 8, 2),
  KernelConfig("compact", 512, 16, 1024, 8, 2),
  KernelConfig("compact", 128, 32, 256, 4, 2, loop="prefetch"),
  KernelConfig("compact", 128, 32, 256, 4, 2),
  KernelConfig("masked", 256, 32, 256, 4, 3),
  KernelConfig("compact", 512, 32, 256, 4, 3, loop="prefetch"),
  KernelConfig("compact", 256, 64, 128, 8, 2, loop="prefetch"),
  KernelConfig("compact", 512, 64, 256, 8, 2, loop="prefetch"),
  KernelConfig("masked", 512, 32, 256, 4, 4),
  KernelConfig("masked", 64, 64, 256, 4, 2),
  KernelConfig("compact", 256, 64, 128, 8, 2),
]
CANDIDATES = [dataclasses.replace(c, reduce="atomic") for c in _BASE]


def main(argv):
  declared = common.setup(jnp.bfloat16)  # weights and inputs
  del argv
  key = jax.random.PRNGKey(0)
  res = {
    **run_record(declared),
    "shapes": {},
    "best": {},
  }
  for model in FLAGS.models:
    for d_in, segs in fused_site_shapes(SHAPES[model]):
      n = sum(segs)
      name = f"{d_in}x{n}"
      if name in res["shapes"] or (FLAGS.shapes and name not in FLAGS.shapes):
        continue
      nbytes = d_in * n * 2
      copies = FLAGS.copies or max(2, -(-600_000_000 // nbytes))
      ws = [jax.random.normal(jax.random.fold_in(key, i), (d_in, n), jnp.bfloat16) for i in range(copies)]
      x = jax.random.normal(jax.random.fold_in(key, 99), (1, d_in), jnp.bfloat16)

      def thr(s):
        return teal_thresholds(x, s, len(segs))

      space = jnp.zeros((copies, WORKSPACE_BLOCKS), jnp.int32)  # 'semaphore' reduce: one row per copy

      def run(cfg, backend):
        return jax.jit(
          lambda x, t, weights: [
            masked_linear(x, w, t, None, segs, backend=backend, config=cfg, workspace=space, slot=i)
            for i, w in enumerate(weights)
          ]
        )

      xla = run(None, "xla")
      dense = jax.jit(lambda x, weights: [x @ w for w in weights])
      entry = {
        "copies": copies,
        "bytes": nbytes,
        "xla_dense_us": timed(dense, x, ws) / copies * 1e6,
        "xla_masked_us": {},
        "configs": [],
      }
      for s in [FLAGS.sparsity] + [float(v) for v in FLAGS.check_sparsities]:
        entry["xla_masked_us"][str(s)] = timed(xla, x, thr(s), ws) / copies * 1e6

      def measure(cfg, s):
        f = run(cfg, FLAGS.backend)
        t = thr(s)
        got, ref = f(x, t, ws[:1])[0].astype(jnp.float32), xla(x, t, ws[:1])[0].astype(jnp.float32)
        err = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
        return timed(f, x, t, ws) / copies * 1e6, err

      rows, start = [], time.time()
      tried = set()
      for cfg in [parse(c) for c in FLAGS.candidates] or CANDIDATES:
        cfg = resolve(cfg, d_in, segs)  # shrunk to tile the shape exactly (small test models)
        if cfg is None or cfg in tried or (rows and time.time() - start > FLAGS.budget_s):
          continue
        tried.add(cfg)
        try:
          us, err = measure(cfg, FLAGS.sparsity)
        except Exception as e:  # a tiling Triton rejects (registers, shared memory): skip it
          print(f"{name} {cfg} failed: {str(e)[:200]}")
          continue
        rows.append({"config": dataclasses.asdict(cfg), "sparsity": FLAGS.sparsity, "us": us, "rel_err": err})
        print(
          f"{name} {cfg.mode:7s} C{cfg.chunk:5d} BK{cfg.block_k:4d} BN{cfg.block_n:4d} w{cfg.num_warps} "
          f"s{cfg.num_stages} {cfg.reduce:8s}: {us:8.1f} us {nbytes / us / 1e3:6.0f} GB/s(dense-equiv) "
          f"err {err:.1e}",
          flush=True,
        )
      rows.sort(key=lambda r: r["us"])
      for r in list(rows[: FLAGS.top]):
        base = KernelConfig(**r["config"])
        for cfg in {
          dataclasses.replace(base, reduce="semaphore"),
          dataclasses.replace(base, reduce="partials"),
          dataclasses.replace(base, num_stages=1 if base.num_stages > 1 else 3),
        }:
          us, err = measure(cfg, FLAGS.sparsity)
          rows.append(
            {"config": dataclasses.asdict(cfg), "sparsity": FLAGS.sparsity, "us": us, "rel_err": err}
          )
      rows.sort(key=lambda r: r["us"])
      best = KernelConfig(**rows[0]["config"])
      points = [(FLAGS.sparsity, rows[0]["us"])]
      for s in [float(v) for v in FLAGS.check_sparsities]:
        us, err = measure(best, s)
        rows.append({"config": dataclasses.asdict(best), "sparsity": s, "us": us, "rel_err": err})
        points.append((s, us))
      entry["configs"] = rows
      entry["best_fit"] = fixed_cost_fit(points, nbytes)
      res["shapes"][name] = entry
      res["best"][name] = rows[0]["config"]
      print(
        f"   fit: {entry['best_fit']['fixed_us']:.1f} us fixed, marginal "
        f"{entry['best_fit']['marginal_gb_per_s'] or 0:.0f} GB/s of kept weights",
        flush=True,
      )
      print(
        f"== {name}: dense {entry['xla_dense_us']:.1f} us ({nbytes / entry['xla_dense_us'] / 1e3:.0f} GB/s), "
        f"xla masked {entry['xla_masked_us']}, best {rows[0]['us']:.1f} us at {FLAGS.sparsity} "
        f"({entry['xla_dense_us'] / rows[0]['us']:.2f}x), {best}",
        flush=True,
      )
      ws = None  # frees this shape's weight copies before the next shape allocates its own
      if FLAGS.out:
        with open(FLAGS.out, "w") as f:
          json.dump(res, f, indent=1)


if __name__ == "__main__":
  app.run(main)

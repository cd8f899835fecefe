"""The Mosaic GPU GEMV (`wina_jax.kernels.mosaic_gemv`) against XLA's dense matmul and the Pallas-Triton
per-site kernel, per fused weight shape of a model, on one Hopper GPU: parity first, then us per call.

Each shape is timed as a stack of distinct weight buffers (>= 600 MB, so the L2 never holds them and one call's
GPU time hides its dispatch; every buffer's call lowers the Mosaic kernel anew, so small shapes compile longer)
inside one jit. Per-shape rows leave out the decode step's context: bench_decode --mosaic_configs times that. Kept rows are the inputs with |x| above the sparsity's quantile (TEAL).

GPU:  PYTHONPATH=. python3 -m experiments.decode.mosaic_sweep --out=$OUT/mosaic_sweep.json
CPU smoke test of the script (XLA rows only; the GPU kernels' rows record their errors):
      .venv/bin/python -m experiments.decode.mosaic_sweep --models=tiny --copies=2 --sparsities=0,0.5 --triton=
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import common
from wina_jax import checks
from wina_jax.bench.decode_setup import load_configs, teal_thresholds
from wina_jax.bench.shapes import SHAPES
from wina_jax.bench.timing import fixed_cost_fit, run_record, timed
from wina_jax.decode import fused_site_shapes
from wina_jax.kernels import masked_linear
from wina_jax.kernels import mosaic_gemv as mg

common.check(
  flags.DEFINE_list("models", ["llama3_8b"], "model shapes"),
  checks.each(checks.one_of(SHAPES), str, nonempty=True),
)
common.check(
  flags.DEFINE_list("sparsities", ["0", "0.5", "0.65", "0.999"], "sparsities the sparse kernels run at"),
  checks.each(checks.fraction()),
)
flags.DEFINE_list(
  "dense", ["64:64:8", "128:128:4", "64:64:4:0:264"], "dense_partials tilings (mosaic_gemv.parse)"
)
flags.DEFINE_list(
  "rows",
  ["64:64:4:0:264", "64:64:4:0:132:cp_async:kernel", "64:64:2:0:264:cp_async:kernel"],
  "kept-row tilings (mosaic_gemv.parse; block_n 64): XLA's compaction then rows_partials, or fused_partials "
  "where a spec ends in :kernel",
)
flags.DEFINE_list(
  "triton",
  ["benchmarks/configs/h200_partials.json"],
  "kernel_sweep JSONs: the Pallas-Triton per-site tilings",
)
flags.DEFINE_list("shapes", [], "only these fused shapes, as d_inxd_out, in this order; empty = all")
common.check(
  flags.DEFINE_float("budget_s", 400.0, "stop starting new rows after this many seconds"), checks.real(0.0)
)
common.check(
  flags.DEFINE_integer(
    "copies",
    0,
    "weight buffers per shape (0: enough for 600 MB, as kernel_sweep; session 17's 200 MB left the small shapes' "
    "calls shorter than their dispatch)",
  ),
  checks.count(0),
)
common.check(flags.DEFINE_string("out", "", "write results JSON here"), checks.out_path())
FLAGS = flags.FLAGS


def rel_err(got, ref) -> float:
  """|got - ref| / |ref|; |got| where ref is zero (no row kept: a 99.9 % threshold over 4096 bfloat16 inputs can
  tie the largest, and then nothing passes it)."""
  got, ref = got.astype(jnp.float32), ref.astype(jnp.float32)
  norm = jnp.linalg.norm(ref)
  return float(jnp.linalg.norm(got - ref) / jnp.where(norm > 0, norm, 1.0))


def sweep_shape(name, d_in, segs, entry, save, deadline, triton, key) -> None:
  """Time XLA dense, the Mosaic kernels (FLAGS.dense, FLAGS.rows) and the Triton tiling on one fused shape,
  filling `entry` (saved after every row) until `deadline` (time.time())."""
  n = sum(segs)
  nbytes = d_in * n * 2
  copies = FLAGS.copies or max(2, -(-600_000_000 // nbytes))
  ws = [jax.random.normal(jax.random.fold_in(key, i), (d_in, n), jnp.bfloat16) for i in range(copies)]
  x = jax.random.normal(jax.random.fold_in(key, 99), (1, d_in), jnp.bfloat16)
  x8 = jnp.pad(x, ((0, mg.ROWS - 1), (0, 0)))

  def thr(s):
    return teal_thresholds(x, s, len(segs))

  dense = jax.jit(lambda x, ws: [x @ w for w in ws])
  entry.update(copies=copies, bytes=nbytes, segments=segs, rows=[])
  entry["xla_dense_us"] = timed(dense, x, ws) / copies * 1e6
  print(
    f"== {name}: XLA dense {entry['xla_dense_us']:.1f} us ({nbytes / entry['xla_dense_us'] / 1e3:.0f} GB/s)"
  )

  def record(kind, spec, s, f, check):
    if time.time() > deadline:
      return
    row = {"kind": kind, "config": spec, "sparsity": s, "kept": float(jnp.mean(jnp.abs(x) > thr(s)[0]))}
    try:
      row["rel_err"] = check()
      row["us"] = timed(f, x, thr(s), ws) / copies * 1e6
      row["x_xla_dense"] = entry["xla_dense_us"] / row["us"]
      row["dense_equiv_gb_s"] = nbytes / row["us"] / 1e3
    except Exception as e:  # a tiling the compiler refuses, or a kernel fault: recorded, not fatal
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    entry["rows"].append(row)
    print(
      f"{name} {kind:6s} {spec:14s} s={s:<6} kept {row['kept']:.4f} "
      + (
        f"{row['us']:8.1f} us {row['x_xla_dense']:5.2f}x err {row['rel_err']:.1e}"
        if "us" in row
        else row["error"]
      ),
      flush=True,
    )
    save()

  ref_dense = x.astype(jnp.float32) @ ws[0].astype(jnp.float32)
  for spec in FLAGS.dense:
    cfg = mg.parse(spec)
    f = jax.jit(lambda x, t, ws, cfg=cfg: [jnp.sum(mg.dense_partials(x8, w, cfg), 0)[:, 0] for w in ws])
    record("dense", spec, 0.0, f, lambda f=f: rel_err(f(x, thr(0), ws[:1])[0], ref_dense[0]))
  for s in [float(v) for v in FLAGS.sparsities]:
    ref = masked_linear(x, ws[0], thr(s), None, segs, backend="xla")
    for spec in FLAGS.rows:
      cfg = mg.parse(spec)
      f = jax.jit(lambda x, t, ws, cfg=cfg: [mg.masked_linear_mosaic(x, w, t, None, segs, cfg) for w in ws])
      record("rows", spec, s, f, lambda f=f, s=s, ref=ref: rel_err(f(x, thr(s), ws[:1])[0], ref))
    tcfg = triton.get((d_in, n))
    f = jax.jit(
      lambda x, t, ws: [masked_linear(x, w, t, None, segs, backend="pallas", config=tcfg) for w in ws]
    )
    record("triton", "h200_partials", s, f, lambda f=f, s=s, ref=ref: rel_err(f(x, thr(s), ws[:1])[0], ref))
  for kind, spec in [("rows", r) for r in FLAGS.rows] + [("triton", "h200_partials")]:
    pts = [
      (r["sparsity"], r["us"])
      for r in entry["rows"]
      if (r["kind"], r["config"]) == (kind, spec) and "us" in r
    ]
    if len(pts) >= 2:
      entry.setdefault("fits", {})[f"{kind} {spec}"] = fit = fixed_cost_fit(pts, nbytes)
      print(
        f"   fit {kind} {spec}: {fit['fixed_us']:.1f} us fixed, {fit['marginal_gb_per_s'] or 0:.0f} GB/s marginal"
      )


def main(argv):
  del argv
  declared = common.setup(jnp.bfloat16)
  key, start = jax.random.PRNGKey(0), time.time()
  triton = load_configs(FLAGS.triton)
  res = {
    **run_record(declared),
    "shapes": {},
  }

  def save():
    if FLAGS.out:
      with open(FLAGS.out, "w") as f:
        json.dump(res, f, indent=1)

  sites = {f"{d}x{sum(g)}": (d, g) for model in FLAGS.models for d, g in fused_site_shapes(SHAPES[model])}
  for name in FLAGS.shapes or list(sites):
    if name not in sites:
      raise common.InputError(f"--shapes: {name} is not one of {sorted(sites)}")
  for name in FLAGS.shapes or list(sites):
    res["shapes"][name] = {}
    sweep_shape(name, *sites[name], res["shapes"][name], save, start + FLAGS.budget_s, triton, key)
    save()


if __name__ == "__main__":
  app.run(main)

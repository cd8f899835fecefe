"""Is a logits gap between the Pallas and XLA decode paths a kernel error or the model's sensitivity?

For Llama-3-8B shapes with random weights: logits of one decode step through the Pallas kernel vs the
XLA mask-then-matmul path, for 2 and 32 layers, at 0% (every row kept: only summation order differs)
and at 50% TEAL (where a 1-ulp difference in a site's input can also flip its mask bit). Beside each,
the model's own sensitivity: the XLA path against itself with the last token's embedding moved by
about one bf16 ulp (x * (1 + 2^-7)). A Pallas-vs-XLA gap of the size of that sensitivity is rounding
amplified by the model, not a kernel error (the kernels alone match to ~1e-4: kernel_sweep, tests).

--mosaic=SPEC runs the sparse step on the Mosaic GPU kernels instead (`mosaic_gemv.parse`; --mosaic_mode: fold,
mlp22 or mlp, `decode_setup.on_mosaic`), the same check against the same XLA path.

GPU:  PYTHONPATH=. python3 -m experiments.decode.check_decode
      PYTHONPATH=. python3 -m experiments.decode.check_decode --mosaic=64:256:3:0:132:cp_async:kernel --mosaic_mode=mlp
CPU smoke (XLA path only, so pallas_vs_xla is 0): python -m experiments.decode.check_decode --model=tiny --layers=2
      (with --mosaic off the GPU: the Mosaic kernels' jnp contracts)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments import common
from wina_jax import checks
from wina_jax.bench import decode_setup as B
from wina_jax.bench.shapes import SHAPES
from wina_jax.decode import fuse_projections
from wina_jax.kernels import mosaic_gemv as MG
from wina_jax.testing import random_params

FLAGS = flags.FLAGS
common.check(
  flags.DEFINE_string("model", "llama3_8b", "model shape (wina_jax.bench.shapes.SHAPES)"),
  checks.one_of(SHAPES),
)
common.check(
  flags.DEFINE_list("layers", ["2", "32"], "layer counts checked"), checks.each(checks.count(), int)
)
common.check(
  flags.DEFINE_string(
    "mosaic", "", "check backend 'mosaic' with this tiling (mosaic_gemv.parse); empty: 'auto'"
  ),
  lambda spec: checks.parses(MG.parse)(spec) if spec else None,
)
flags.DEFINE_enum(
  "mosaic_mode",
  "",
  list(B.MOSAIC_MODES),
  "with --mosaic: '' (per-site kernels), fold, mlp22 or mlp (on_mosaic)",
)


def main(argv):
  declared = common.setup(jnp.bfloat16)  # `random_params`
  print(f"declared numerics: {declared}", flush=True)
  del argv
  if FLAGS.mosaic_mode and not FLAGS.mosaic:
    raise ValueError("--mosaic_mode runs on the Mosaic kernels: give --mosaic=TILING too")
  for layers in (int(n) for n in FLAGS.layers):
    cfg0 = SHAPES[FLAGS.model].replace(num_hidden_layers=layers)
    params, cfg = fuse_projections(random_params(cfg0, jax.random.PRNGKey(0)), cfg0)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 16), 0, cfg.vocab_size)
    scores = B.site_scores(params, cfg, tokens, False)
    for sparsity in (0.0, 0.5):
      sp, _ = B.make_sparsifier(scores, sparsity, 1, {}, "mosaic" if FLAGS.mosaic else "auto")
      if FLAGS.mosaic:
        sp = B.on_mosaic(sp, FLAGS.mosaic, FLAGS.mosaic_mode)
      print(
        f"CHECK layers={layers} sparsity={sparsity} backend={sp.backend}{'+' * bool(FLAGS.mosaic_mode)}{FLAGS.mosaic_mode} pallas_vs_xla="
        f"{B.check_against_xla(params, cfg, sp, tokens, 64)} xla_ulp_moved_vs_xla="
        f"{B.ulp_sensitivity(params, cfg, sp, tokens, 64)}",
        flush=True,
      )
      sp.check_waits()  # a Mosaic mode's waits on the sparsifier's counter: raises if one gave up


if __name__ == "__main__":
  app.run(main)

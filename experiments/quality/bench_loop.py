"""The research loop's speed: an evaluation forward (mean next-token NLL) dense, top-k and threshold, per
matmul precision, beside torch + transformers with forward pre-hooks doing per-token top-k (the official
TEAL / WINA code's way), on the same random weights; and the per-site top-k selections alone.

  python -m experiments.quality.bench_loop --shape=smollm2-135m --batch=2 --seq=256 \
    --out=benchmarks/results/bench_loop_cpu.json                                      # this CPU
  python -m experiments.quality.bench_loop --out=benchmarks/results/bench_loop_h200.json  # H200: Qwen 1.5B, 8 x 512

Rows: framework (jax | torch), precision (`wina_jax.numerics`; torch: float32 = TF32 off, tf32 = on, bfloat16 =
autocast), method, mode, top-k impl (`sparsity.select`), ms per forward (median of --repeats), tokens/s, compile
seconds (jax: lower + compile; one program serves every sparsity: `programs` counts the jit cache after running
two sparsities), and the ratio to the same framework's dense forward at that precision. `select` rows time one
top-k mask per impl on [tokens, d] scores. Speed is a benchmark, never a timed test.
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from wina_jax import checks, numerics, sparsity
from wina_jax.bench.shapes import LOOP_CONFIGS
from wina_jax.model import forward
from wina_jax.sparsity import select

SHAPE = flags.DEFINE_enum("shape", "qwen2.5-coder-1.5b", list(LOOP_CONFIGS), "Model shape (random weights).")
BATCH = common.check(flags.DEFINE_integer("batch", 8, "Windows per forward."), checks.count(hi=4096))
SEQ = common.check(flags.DEFINE_integer("seq", 512, "Tokens per window."), checks.count(2, 32768))
PRECISIONS = flags.DEFINE_list("precisions", ["float32", "tf32", "bfloat16"], "Matmul precisions timed.")
RUNS = flags.DEFINE_list(
  "runs", ["dense", "teal:topk", "wina:topk", "teal:threshold"], "method:mode pairs ('dense' alone)."
)
IMPLS = common.check(
  flags.DEFINE_list("impls", ["radix", "sort"], "Top-k selection impls of the forward rows (k is data)."),
  checks.each(common.topk_impl_rule, parse=str, nonempty=True),
)
SPARSITY = common.check(
  flags.DEFINE_float("sparsity", 0.5, "Target sparsity of the sparse runs."),
  checks.real(0.0, 1.0, lo_open=True, hi_open=True),
)
TORCH = flags.DEFINE_bool("torch", True, "Time torch + transformers with pre-hooks beside.")
SELECT_SHAPES = flags.DEFINE_list(
  "select_shapes", ["4096x8960", "4096x1536"], "[tokens x d] of `select` rows."
)
SELECT_IMPLS = common.check(
  flags.DEFINE_list(
    "select_impls",
    ["lax", "sort", "radix:2", "radix:4", "radix:8", "radix:16", "radix:64"],
    "impl[:fanout] of `select` rows.",
  ),
  checks.each(select.impl_problem, parse=str),
)
REPEATS = common.check(
  flags.DEFINE_integer("repeats", 5, "Timed calls per row (median)."), checks.count(hi=1000)
)
OUT = common.check(flags.DEFINE_string("out", "", "JSON output path ('' = print only)."), checks.out_path())


def timed(fn, *args, repeats: int) -> float:
  """Median seconds of fn(*args) (one warm-up call first), results blocked on."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def hf_model(shape: str):
  """A random-weight transformers model of `shape` (float32, eval, eager attention, on the GPU if any)."""
  import torch
  import transformers

  cfg = transformers.AutoConfig.for_model(**LOOP_CONFIGS[shape])
  cfg._attn_implementation = "sdpa"
  torch.manual_seed(0)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  with torch.device(dev):
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def mean_nll(params, tokens, sp, cfg):
  logits = forward(params, tokens, cfg, sp).logits
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def jax_rows(params, cfg, tokens) -> list[dict]:
  """Every (precision, run, impl) of the flags through one jitted NLL per (precision, method, mode)."""
  rows = []
  n_tok = tokens.size
  for prec in PRECISIONS.value:
    dense_s = None
    for run in RUNS.value:
      name, _, mode = run.partition(":")
      impls = IMPLS.value if mode == "topk" else [None]
      for impl in impls:
        if name == "dense":
          sps = [sparsity.make("dense", params, cfg)] * 2
        elif mode == "topk":
          sps = [sparsity.make(name, params, cfg, s, impl=impl) for s in (SPARSITY.value, 0.25)]
        else:
          base = sparsity.make(name, params, cfg, SPARSITY.value)
          th = {s: jnp.asarray(0.5, jnp.float32) for s in base.k}
          sps = [base.replace(mode="threshold", k={}, thresholds=th)]
          sps.append(sps[0].replace(thresholds={s: t * 2 for s, t in th.items()}))
        fn = jax.jit(lambda p, t, sp: mean_nll(p, t, sp, cfg))
        with numerics.precision(prec):
          t0 = time.perf_counter()
          compiled = fn.lower(params, tokens, sps[0]).compile()
          compile_s = time.perf_counter() - t0
          sec = timed(compiled, params, tokens, sps[0], repeats=REPEATS.value)
          fn(params, tokens, sps[0]).block_until_ready()
          fn(params, tokens, sps[1]).block_until_ready()  # another sparsity: no new program
        dense_s = sec if name == "dense" else dense_s
        row = dict(framework="jax", precision=prec, method=name, mode=mode or "dense", impl=impl or "")
        row.update(sparsity=0.0 if name == "dense" else SPARSITY.value, ms=1e3 * sec)
        row.update(tokens_per_s=n_tok / sec, compile_s=compile_s, programs=fn._cache_size())
        row["ratio"] = sec / dense_s if dense_s else float("nan")
        rows.append(row)
        print(json.dumps(row))
  return rows


def torch_rows(model, tokens: np.ndarray) -> list[dict]:
  """The same runs in torch: per-token top-k of |x| (WINA: |x| * column norm at k_proj / gate_proj) in
  forward pre-hooks on the 7 projections, as the official code; threshold: |x| > t."""
  import torch

  dev = next(model.parameters()).device
  ids = torch.as_tensor(tokens.astype(np.int64), device=dev)
  names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

  def hooks(method, mode):
    out = []
    for layer in model.model.layers:
      for block in (layer.self_attn, layer.mlp):
        for n in names:
          mod = getattr(block, n, None)
          if mod is None:
            continue
          c = mod.weight.norm(dim=0) if method == "wina" and n in ("k_proj", "gate_proj") else None

          def hook(module, args, c=c):
            x = args[0]
            score = x.abs() if c is None else x.abs() * c.to(x.dtype)
            if mode == "threshold":
              return (x * (score > 0.5),)
            k = max(1, int(x.shape[-1] * (1 - SPARSITY.value)))
            idx = torch.topk(score, k, dim=-1).indices
            return (x * torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True),)

          out.append(mod.register_forward_pre_hook(hook))
    return out

  def nll():
    with torch.no_grad():
      logits = model(ids).logits[:, :-1].float()
      return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))

  def run(prec):
    torch.backends.cuda.matmul.allow_tf32 = prec == "tf32"
    torch.backends.cudnn.allow_tf32 = prec == "tf32"
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=prec == "bfloat16")
    with ctx:
      return float(nll())

  def sync_timed(prec):
    run(prec)
    times = []
    for _ in range(REPEATS.value):
      if dev.type == "cuda":
        torch.cuda.synchronize()
      t = time.perf_counter()
      run(prec)
      if dev.type == "cuda":
        torch.cuda.synchronize()
      times.append(time.perf_counter() - t)
    return statistics.median(times)

  rows = []
  for prec in PRECISIONS.value:
    dense_s = None
    for r in RUNS.value:
      name, _, mode = r.partition(":")
      handles = [] if name == "dense" else hooks(name, mode)
      try:
        sec = sync_timed(prec)
      finally:
        for h in handles:
          h.remove()
      dense_s = sec if name == "dense" else dense_s
      row = dict(framework="torch", precision=prec, method=name, mode=mode or "dense", impl="torch.topk")
      row.update(sparsity=0.0 if name == "dense" else SPARSITY.value, ms=1e3 * sec)
      row.update(tokens_per_s=tokens.size / sec, compile_s=0.0, programs=0, ratio=sec / dense_s)
      rows.append(row)
      print(json.dumps(row))
  return rows


def select_rows() -> list[dict]:
  """One top-k mask (k = d / 2) on random |N(0,1)| scores per impl and shape; masks checked against lax."""
  rows = []
  for spec in SELECT_SHAPES.value:
    n, d = (int(v) for v in spec.split("x"))
    score = jnp.abs(jax.random.normal(jax.random.PRNGKey(0), (n, d), jnp.float32))
    ref = jax.jit(lambda s, d=d: select.topk_mask(s, d // 2, "lax"))(score)
    for spec_i in SELECT_IMPLS.value:
      impl, _, fan = spec_i.partition(":")
      fanout = int(fan or select.FANOUT)
      k = d // 2 if impl == "lax" else jnp.asarray(d // 2, jnp.int32)
      fn = jax.jit(lambda s, k=k, impl=impl, fanout=fanout: select.topk_mask(s, k, impl, fanout))
      sec = timed(fn, score, repeats=REPEATS.value)
      same = bool(jnp.array_equal(fn(score), ref))
      rows.append(
        dict(shape=[n, d], impl=impl, fanout=fanout if impl == "radix" else None, ms=1e3 * sec, same=same)
      )
      print(json.dumps(rows[-1]))
    sec = timed(jax.jit(lambda s: s > 1.0), score, repeats=REPEATS.value)
    rows.append(dict(shape=[n, d], impl="threshold", fanout=None, ms=1e3 * sec, same=None))
    print(json.dumps(rows[-1]))
  return rows


def main(argv):
  common.setup()
  del argv
  from wina_jax.convert import from_transformers

  out = dict(
    command=common.command_line("experiments.quality.bench_loop"),
    device=str(jax.devices()[0].device_kind),
    backend=jax.default_backend(),
    jax=jax.__version__,
    host=platform.node(),
    shape=SHAPE.value,
    batch=BATCH.value,
    seq=SEQ.value,
    dtype="float32",
  )
  out["select"] = select_rows()
  model = hf_model(SHAPE.value)
  params, cfg = from_transformers(model)
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (BATCH.value, SEQ.value)).astype(np.int32)
  params = jax.device_put(params)
  out["rows"] = jax_rows(params, cfg, jnp.asarray(tokens))
  del params
  if TORCH.value:
    import torch

    out["torch"] = torch.__version__
    out["rows"] += torch_rows(model, tokens)
  print(table(out["rows"]))
  if OUT.value:
    with open(OUT.value, "w") as f:
      json.dump(out, f, indent=1)


def table(rows: list[dict]) -> str:
  lines = [
    "| framework | precision | method | mode | impl | ms | tokens/s | x dense | compile s | programs |"
  ]
  lines.append("|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    lines.append(
      f"| {r['framework']} | {r['precision']} | {r['method']} | {r['mode']} | {r['impl']} | {r['ms']:.1f} | "
      f"{r['tokens_per_s']:.0f} | {r['ratio']:.2f} | {r['compile_s']:.1f} | {r['programs']} |"
    )
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main)

"""Evaluate one model variant: perplexity on held-out BoolQ passages and a short greedy generation.

python -m experiments.quality.evaluate                       # dense embedded SmolLM2-135M-Instruct
python -m experiments.quality.evaluate --sparsity=0.5        # the recommended variant at 50% (docs/findings.md)
python -m experiments.quality.evaluate --sparsity=0.5 --method=teal-transform --mode=topk
python -m experiments.quality.evaluate --model=path/to/hf_folder_or.gguf --max_windows=64 --seq_len=512
python -m experiments.quality.evaluate --mesh=data:1,model:4    # params sharded over 4 devices
"""

from absl import app, flags

from experiments import common
from wina_jax import checks
from wina_jax import sharding as SH
from wina_jax.convert import load
from wina_jax.data.text import load_texts, token_windows
from wina_jax.eval import variants
from wina_jax.eval.perplexity import perplexity
from wina_jax.eval.recommended import recommended
from wina_jax.generate import greedy_decode
from wina_jax.tokenizer import load_tokenizer

MODEL = common.check(
  flags.DEFINE_string("model", "smollm2-135m", "Name in wina_jax.assets.MODELS, GGUF file or HF folder."),
  common.MODEL_RULE,
)
SPARSITY = common.check(
  flags.DEFINE_float("sparsity", 0.0, "Target sparsity in [0, 1); 0 = dense."), checks.fraction()
)
METHOD = common.check(
  flags.DEFINE_string(
    "method",
    "",
    "Variant spec (wina_jax.eval.variants); '' = the recommended "
    "one for --sparsity (wina_jax.eval.recommended).",
  ),
  common.method_rule,
)
MODE = flags.DEFINE_enum("mode", None, ["topk", "threshold"], "Default: the recommendation's.")
ALLOCATION = flags.DEFINE_enum("allocation", None, ["uniform", "greedy"], "Default: the recommendation's.")
TEXT = common.check(
  flags.DEFINE_string("text", "boolq:heldout", "'boolq:heldout', 'boolq:calibration' or a text file."),
  checks.text(),
)
CALIB_TEXT = common.check(
  flags.DEFINE_string("calib_text", "boolq:calibration", "Calibration text (threshold / greedy)."),
  checks.text(),
)
CALIB_WINDOWS = common.check(
  flags.DEFINE_integer("calib_windows", 16, "Calibration windows."), checks.count()
)
SEQ_LEN = common.check(flags.DEFINE_integer("seq_len", 256, "Perplexity window length."), checks.count(2))
MAX_WINDOWS = common.check(
  flags.DEFINE_integer("max_windows", 16, "Number of windows to score."), checks.count()
)
PROMPT = flags.DEFINE_string("prompt", "The capital of France is", "Greedy generation prompt.")
NEW_TOKENS = common.check(flags.DEFINE_integer("max_new_tokens", 20, "Tokens to generate."), checks.count())
MESH = flags.DEFINE_string("mesh", "", "Device mesh, e.g. 'data:1,model:4'; '' = one device.")


def main(_):
  declared = common.setup("float32")  # `load`'s params are float32
  print(f"declared numerics: {declared}")
  rec = recommended(SPARSITY.value)
  spec, mode, allocation = (
    METHOD.value or rec.spec,
    MODE.value or rec.mode,
    ALLOCATION.value or rec.allocation,
  )
  calibrated = SPARSITY.value > 0 and variants.needs_calibration(spec, mode, allocation)
  common.preflight(
    MODEL.value,
    SEQ_LEN.value,
    forward=(8, ""),  # `perplexity` pads every batch to 8 windows
    calibration=(CALIB_WINDOWS.value, "--calib_windows") if calibrated else None,
    transform=SPARSITY.value > 0 and variants.parse(spec).transformed,
  )
  params, cfg = load(MODEL.value)
  tok = load_tokenizer(MODEL.value)
  calib = None
  if calibrated:
    calib = token_windows(tok, load_texts(CALIB_TEXT.value), SEQ_LEN.value, CALIB_WINDOWS.value)
  v = variants.build(params, cfg, spec, SPARSITY.value, mode=mode, allocation=allocation, calib_windows=calib)
  params = SH.shard_params(v.params, v.cfg, SH.make_mesh(MESH.value)) if MESH.value else v.params
  windows = token_windows(tok, load_texts(TEXT.value), SEQ_LEN.value, MAX_WINDOWS.value)
  res = perplexity(params, v.cfg, windows, v.sparsifier)
  what = "dense" if SPARSITY.value == 0 else f"{spec} at {SPARSITY.value:g} ({mode}, {allocation})"
  print(f"{what}: perplexity on {TEXT.value}: {res['ppl']:.3f} over {res['tokens']} tokens")
  ids = tok(PROMPT.value, return_tensors="np")["input_ids"]
  out = greedy_decode(params, v.cfg, ids, NEW_TOKENS.value, v.sparsifier, eos_id=tok.eos_token_id)
  print(f"{PROMPT.value!r} -> {tok.decode(out[0])!r}")


if __name__ == "__main__":
  app.run(main)

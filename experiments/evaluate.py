"""Dense evaluation of a model: perplexity on held-out BoolQ passages and a short greedy generation.

  python -m experiments.evaluate                       # embedded SmolLM2-135M-Instruct
  python -m experiments.evaluate --model=path/to/hf_folder_or.gguf --max_windows=64 --seq_len=512
  python -m experiments.evaluate --mesh=data:1,model:4    # params sharded over 4 devices
"""
from absl import app, flags

from wina_jax import assets
from wina_jax import sharding as SH
from wina_jax.convert import load
from wina_jax.data.text import load_texts, token_windows
from wina_jax.eval.perplexity import perplexity
from wina_jax.generate import greedy
from wina_jax.tokenizer import load_tokenizer

MODEL = flags.DEFINE_string("model", "", "GGUF file or HF checkpoint folder; '' = embedded SmolLM2.")
TEXT = flags.DEFINE_string("text", "boolq:heldout", "'boolq:heldout', 'boolq:calibration' or a text file.")
SEQ_LEN = flags.DEFINE_integer("seq_len", 256, "Perplexity window length.")
MAX_WINDOWS = flags.DEFINE_integer("max_windows", 16, "Number of windows to score.")
PROMPT = flags.DEFINE_string("prompt", "The capital of France is", "Greedy generation prompt.")
NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 20, "Tokens to generate.")
MESH = flags.DEFINE_string("mesh", "", "Device mesh, e.g. 'data:1,model:4'; '' = one device.")


def main(_):
  params, cfg = load(MODEL.value)
  if MESH.value:
    params = SH.shard_params(params, cfg, SH.make_mesh(MESH.value))
  tok = load_tokenizer(MODEL.value or assets.default_gguf())
  windows = token_windows(tok, load_texts(TEXT.value), SEQ_LEN.value, MAX_WINDOWS.value)
  res = perplexity(params, cfg, windows)
  print(f"perplexity on {TEXT.value}: {res['ppl']:.3f} over {res['tokens']} tokens")
  ids = tok(PROMPT.value, return_tensors="np")["input_ids"]
  out = greedy(params, cfg, ids, NEW_TOKENS.value, eos_id=tok.eos_token_id)
  print(f"{PROMPT.value!r} -> {tok.decode(out[0])!r}")


if __name__ == "__main__":
  app.run(main)

"""Model shapes of the speed benchmarks (random weights): the paper's models (from their HF configs) and a tiny
one for CI as `ModelConfig`s (`SHAPES`, the decode benchmarks), and the HF config.json fields of the research
loop's models (`LOOP_CONFIGS`, `experiments.quality.bench_loop`: built in transformers too)."""

from wina_jax.config import ModelConfig
from wina_jax.eval.flops import paper_config

SHAPES = {
  "llama3_8b": paper_config("Llama-3-8B"),
  "qwen25_7b": paper_config("Qwen-2.5-7B"),
  "phi4_14b": paper_config("Phi-4-14B"),
  "tiny": ModelConfig(
    model_type="qwen2",
    vocab_size=97,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    max_position_embeddings=128,
    attention_bias=True,
  ),
}

# The HF config.json fields (as `flops.PAPER_CONFIGS`) of the models in `wina_jax.assets.MODELS` whose shapes
# the research loop's benchmark times: `transformers.AutoConfig.for_model(**LOOP_CONFIGS[name])`.
LOOP_CONFIGS = {
  "qwen2.5-coder-1.5b": dict(
    model_type="qwen2",
    vocab_size=151936,
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
  ),
  "smollm2-135m": dict(
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    max_position_embeddings=8192,
    rope_theta=1e5,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
  ),
}

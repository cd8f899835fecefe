"""Model shapes of the decode benchmarks: the paper's models (from their HF configs) and a tiny one for CI."""

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

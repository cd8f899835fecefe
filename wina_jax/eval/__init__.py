"""Evaluation: perplexity, zero-shot multiple choice, FLOPs."""

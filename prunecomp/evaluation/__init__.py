"""Evaluation: perplexity, and zero-shot QA / MMLU through lm-evaluation-harness."""

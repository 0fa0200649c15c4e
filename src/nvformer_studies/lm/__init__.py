"""Causal language-model perplexity across domains (SmolLM2-135M)."""

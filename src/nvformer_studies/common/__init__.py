"""What every study shares: the study protocol (prior, conversion at the identity, knob searches,
bootstrap), seeded subsets, data readers, checkpoints, fine-tuning, the tokenizer trained here,
the doc sections and their CSV tables, plots, benchmark timing."""

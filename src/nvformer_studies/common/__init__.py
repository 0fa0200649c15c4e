"""What every study shares: data readers, checkpoints, fine-tuning, plots."""

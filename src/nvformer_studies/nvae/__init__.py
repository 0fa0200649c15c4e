"""NVAE training (HF Accelerate), checkpoints and evaluation."""

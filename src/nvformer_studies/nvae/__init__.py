"""The NVAE: training (HF Accelerate), checkpoints and evaluation; the NVAE study and the
one-vs-two-process comparison; their doc sections."""

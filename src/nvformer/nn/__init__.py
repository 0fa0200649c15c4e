"""Modules over the maths of :mod:`nvformer.core`: the NVIB layer, denoising attention as a
function (with its SDPA fast path below it), the ``nn.MultiheadAttention`` drop-in, and empirical
priors of PyTorch models."""

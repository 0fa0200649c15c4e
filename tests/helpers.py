"""Shared test helpers."""

from __future__ import annotations

import math

import torch

import nvformer as nv
from nvformer.core.masks import masked_log_softmax


def make_latent(B=2, C=5, P=8, *, var_low=0.2, var_high=1.0, dtype=torch.float64, pad=None, same_var=False, seed=1):
    """A hand-made unsampled latent with random means/variances/pseudo-counts (prior at index 0)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(B, C, P, generator=g, dtype=dtype)
    if same_var:
        var = torch.full((B, C, P), 0.5 * (var_low + var_high), dtype=dtype)
    else:
        var = var_low + (var_high - var_low) * torch.rand(B, C, P, generator=g, dtype=dtype)
    log_alpha = torch.randn(B, C, generator=g, dtype=dtype)
    pad_mask = torch.zeros(B, C, dtype=torch.bool) if pad is None else pad
    log_alpha = log_alpha.masked_fill(pad_mask, -math.inf)
    log_pi = masked_log_softmax(log_alpha, pad_mask)
    return nv.NVLatent(mu, var.log(), log_alpha, pad_mask, mu, log_pi)


def perturbed_mha(E=16, H=4, *, kdim=None, batch_first=True, seed=0, std=0.3):
    torch.manual_seed(seed)
    mha = torch.nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=kdim)
    with torch.no_grad():
        for p in mha.parameters():
            p.normal_(0.0, std)
    return mha

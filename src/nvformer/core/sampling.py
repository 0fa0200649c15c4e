"""Pure sampling maths used by the NVIB layer and Dirichlet attention (no module state).

Everything here works in log space: pseudo-counts ``a`` are handed around as ``log a`` so that
they never overflow (``log a`` of a width-4096 model is ~200, far beyond fp32's ``exp`` range).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .masks import masked_log_softmax, nothing_set

__all__ = ["sample_log_gamma", "sample_log_dirichlet"]

# Above this log-concentration the Gamma(a, 1) sample is drawn from its log-normal limit
# log g ~ N(log a, 1/a): the neglected bias of the mean, -1/(2a), is below 1e-9 there.
_LOG_A_NORMAL_LIMIT = 20.0
# Below this log-concentration a is treated as exp(floor), so that log(U)/a and its gradient stay finite
# (float32: |log U| <= 88 and 88 e^80 < 3.4e38).
_LOG_A_MIN = {torch.float64: -300.0, torch.float32: -80.0}


def sample_log_gamma(log_concentration: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Reparameterised sample of ``log g``, ``g ~ Gamma(a, 1)``, given ``log a``; any shape.

    Computed in ``dtype`` (float64 by default, as the NVIB layer samples; float32 for Dirichlet
    attention, where it runs over every [query, key] pair) and returned in the input dtype (at
    least float32). Three regimes, each exact in distribution or negligibly far from it, so that no
    pseudo-count over/underflows in either dtype:

    * ``log a <= 20``: ``g = X * U**(1/a)`` with ``X ~ Gamma(a + 1)`` drawn by
      ``torch.distributions.Gamma.rsample`` (implicit reparameterisation gradients) and
      ``U ~ Uniform(0, 1)`` (the standard boost for small shapes, Marsaglia & Tsang 2000); in log
      space ``log g = log X + log(U) / a``, finite for any ``a``; ``log a`` is floored at -300 in
      float64 (``a ~ 5e-131``) and -80 in float32 (``a ~ 2e-35``; ``log(U) / a`` then stays below
      float32's largest number): such a component's weight is 0 in any dtype, and gradients stay finite.
    * ``log a > 20``: ``log g = log a + eps / sqrt(a)``, ``eps ~ N(0, 1)``: the log-normal limit of
      a Gamma with ``a > 4.8e8`` (the bias ``-1/(2a)`` is below 1e-9), with pathwise gradients.
    * ``-inf`` entries (masked components) stay ``-inf``.
    """
    if not isinstance(log_concentration, Tensor):
        raise ValueError(f"sample_log_gamma: `log_concentration` must be a tensor, got {type(log_concentration).__name__}")
    if dtype not in _LOG_A_MIN:
        raise ValueError(f"sample_log_gamma: `dtype` must be torch.float32 or torch.float64, got {dtype}")
    out_dtype = torch.promote_types(log_concentration.dtype, torch.float32)
    lc = log_concentration.to(dtype)
    if lc.numel() and lc.device.type != "meta" and not bool(lc.max() < float("inf")):  # one pass: NaN and +inf both fail the comparison
        raise ValueError("sample_log_gamma: `log_concentration` must not be NaN or +inf (-inf marks a masked entry)")
    masked = torch.isneginf(lc)
    any_masked = not nothing_set(masked)
    if any_masked:
        lc = lc.masked_fill(masked, 0.0)
    lc = lc.clamp_min(_LOG_A_MIN[dtype])

    tiny = torch.finfo(dtype).tiny
    a_small = lc.clamp(max=_LOG_A_NORMAL_LIMIT).exp()
    x = torch.distributions.Gamma(a_small + 1.0, 1.0).rsample()
    u = torch.rand_like(a_small).clamp_min(tiny)
    log_g = x.clamp_min(tiny).log() + u.log() / a_small

    big = lc > _LOG_A_NORMAL_LIMIT
    if not nothing_set(big):  # the log-normal limit, drawn only where it applies
        lc_big = lc.clamp(min=_LOG_A_NORMAL_LIMIT)
        log_g = torch.where(big, lc_big + torch.randn_like(lc_big) * torch.exp(-0.5 * lc_big), log_g)
    if any_masked:
        log_g = log_g.masked_fill(masked, float("-inf"))
    return log_g.to(out_dtype)


def sample_log_dirichlet(log_concentration: Tensor, pad_mask: Tensor | None = None, dim: int = -1,
                         dtype: torch.dtype = torch.float64) -> Tensor:
    """Reparameterised ``log pi`` with ``pi ~ Dir(a)`` over ``dim``, given ``log a``.

    ``pi = g / sum(g)`` with ``g_i ~ Gamma(a_i)`` (:func:`sample_log_gamma`, computed in ``dtype``),
    normalised with ``logsumexp``. Entries where ``pad_mask`` is True (or ``log a = -inf``) get
    ``log pi = -inf``.

    Args:
        log_concentration: ``[..., K]`` log pseudo-counts.
        pad_mask: bool, broadcastable, True = excluded.
        dtype: float64 (default) or float32, the precision of the Gamma draws.
    """
    if pad_mask is not None:
        if not isinstance(pad_mask, Tensor) or pad_mask.dtype != torch.bool:
            raise ValueError(f"sample_log_dirichlet: `pad_mask` must be a bool tensor (True = excluded), got {getattr(pad_mask, 'dtype', pad_mask)!r}")
        log_concentration = log_concentration.masked_fill(pad_mask, float("-inf"))
    return masked_log_softmax(sample_log_gamma(log_concentration, dtype), pad_mask, dim=dim)

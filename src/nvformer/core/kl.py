"""KL regularisers of an NV latent (docs/MATH.md section 2). One value per sequence, ``[B]``.

``KL_D`` is computed from ``log A`` with an evaluation of
``KL(Dir(A/K 1_K) || Dir(B/K 1_K))`` that has no catastrophic cancellation, so it stays accurate
for pseudo-counts far beyond float64's ``exp`` range (a width-4096 model has ``log A ~ 200``;
the textbook formula loses every digit once ``A > 1e16``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .checks import check_real
from .latent import NVLatent
from .masks import masked_log_softmax
from .prior import Prior

__all__ = ["kl_gaussian", "kl_dirichlet", "kl_symmetric_dirichlet", "lgamma_terms"]

_LOG_2PI = math.log(2 * math.pi)
# Above this argument the asymptotic series below are used (next terms < 1e-18 there).
_ASYMPTOTIC_FROM = math.log(1e3)


def kl_gaussian(latent: NVLatent, prior: Prior, reduction: str = "mean") -> Tensor:
    """Weighted Gaussian KL ``KL_G`` of docs/MATH.md section 2; returns ``[B]``.

    ``KL_G = kappa * sum_i (a_i / sum_j a_j) * R_p KL(N(mu_ip, var_ip) || N(mu_p, var_p))`` over
    unmasked components, where ``R_p`` is the mean over the ``P`` dimensions
    (``reduction="mean"``, the authors' choice) or the sum (``"sum"``). Computed in at least
    float32 (float64 inputs stay float64), log-variance ratios from log-variances.

    Args:
        latent: :class:`NVLatent` (``mu``, ``logvar`` ``[B, C, P]``; ``log_alpha``, ``pad_mask`` ``[B, C]``).
        prior: its :class:`Prior`.
        reduction: ``"mean"`` or ``"sum"`` over dimensions.
    """
    check_latent_prior(latent, prior, "kl_gaussian")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"kl_gaussian: `reduction` must be 'mean' or 'sum', got {reduction!r}")
    prior.check_dim(latent.mu.shape[-1], "kl_gaussian")
    cd = torch.promote_types(latent.mu.dtype, torch.float32)
    mu, logvar = latent.mu.to(cd), latent.logvar.to(cd)
    mu_p, logvar_p = prior.mean.to(cd), prior.var.to(cd).log()
    d_lv = logvar - logvar_p
    per_dim = 0.5 * (torch.exp(d_lv) + (mu - mu_p) ** 2 / logvar_p.exp() - 1.0 - d_lv)
    per_comp = per_dim.mean(-1) if reduction == "mean" else per_dim.sum(-1)
    w = masked_log_softmax(latent.log_alpha.to(cd), latent.pad_mask).exp()
    return latent.kappa * (w * per_comp.masked_fill(latent.pad_mask, 0.0)).sum(-1)


def check_latent_prior(latent: NVLatent, prior: Prior, where: str) -> None:
    """``latent`` is an :class:`NVLatent` and ``prior`` a :class:`Prior`, or a ``ValueError`` naming the wrong one."""
    for name, value, cls in (("latent", latent, NVLatent), ("prior", prior, Prior)):
        if not isinstance(value, cls):
            raise ValueError(f"{where}: `{name}` must be a nvformer.{cls.__name__}, got {type(value).__name__}")


def lgamma_terms(log_x: Tensor) -> tuple[Tensor, Tensor]:
    """``(h(x), psi(x) - log x)`` from ``log x`` (float64), with ``h(x) = lgamma(x) - x psi(x) + x``.

    Both are ``O(log x)`` quantities, so a KL written in them has no ``O(x log x)`` terms left to
    cancel (docs/MATH.md sections 2 and 5). For ``x > 1000`` they are evaluated by their
    asymptotic series in ``1/x`` (next terms below 1e-18), which stay exact far beyond float64's
    ``exp`` range.
    """
    small = log_x < _ASYMPTOTIC_FROM
    lx_s = log_x.clamp(max=_ASYMPTOTIC_FROM)
    x_s = lx_s.exp()
    psi = torch.digamma(x_s)
    h_direct = torch.lgamma(x_s) - x_s * psi + x_s
    g_direct = psi - lx_s
    lx = log_x.clamp(min=_ASYMPTOTIC_FROM)
    inv = torch.exp(-lx)
    h_series = -0.5 * lx + 0.5 * (1.0 + _LOG_2PI) + inv / 6.0 - inv**3 / 90.0 + inv**5 / 210.0
    g_series = -inv / 2.0 - inv**2 / 12.0 + inv**4 / 120.0 - inv**6 / 252.0
    return torch.where(small, h_direct, h_series), torch.where(small, g_direct, g_series)


def kl_symmetric_dirichlet(log_A: Tensor, B: Tensor, K: Tensor) -> Tensor:
    """``KL(Dir(A/K 1_K) || Dir(B/K 1_K))`` from ``log A``, elementwise, in float64.

    Uses ``KL = h(A) - K h(A/K) - lgamma(B) + K lgamma(B/K) + B (psi(A) - psi(A/K))`` with
    ``h(x) = lgamma(x) - x psi(x) + x``, which is the textbook expression regrouped so that its
    ``O(A log A)`` terms cancel analytically; ``h`` and ``psi(x) - log x`` switch to their
    asymptotic series for ``x > 1000``.

    Args:
        log_A: log total pseudo-count of the posterior.
        B: total pseudo-count of the prior (> 0).
        K: number of components (>= 1).
    """
    where = "kl_symmetric_dirichlet"
    log_A, B, K = (torch.as_tensor(t).to(torch.float64) for t in (log_A, B, K))
    log_A, B, K = torch.broadcast_tensors(log_A, B, K)
    for name, ok, rule in (("log_A", torch.isfinite(log_A), "finite"), ("B", torch.isfinite(B) & (B > 0), "finite and > 0"),
                           ("K", torch.isfinite(K) & (K >= 1), "finite and >= 1")):
        if not bool(ok.all()):
            raise ValueError(f"{where}: `{name}` must be {rule} everywhere")
    log_K = K.log()
    log_AK = log_A - log_K
    h_A, g_A = lgamma_terms(log_A)
    h_AK, g_AK = lgamma_terms(log_AK)
    return h_A - K * h_AK - torch.lgamma(B) + K * torch.lgamma(B / K) + B * (log_K + g_A - g_AK)


def kl_dirichlet(latent: NVLatent, prior: Prior, delta: float = 1.0) -> Tensor:
    """Dirichlet KL ``KL_D`` of docs/MATH.md section 2; returns ``[B]`` (float64).

    With ``n`` unmasked components (prior included), ``K = n * kappa``, ``A = sum_i a_i`` and
    ``B = alpha_p + delta (n - 1)``: ``KL_D = KL(Dir(A/K 1_K) || Dir(B/K 1_K)) / n``.
    Sequences with no unmasked component get 0.

    Args:
        latent: :class:`NVLatent` (``log_alpha``, ``pad_mask`` ``[B, C]``).
        prior: its :class:`Prior` (``log_alpha`` gives ``alpha_p``).
        delta: conditional-prior strength (pseudo-count per token component).
    """
    check_latent_prior(latent, prior, "kl_dirichlet")
    delta = check_real(delta, "delta", "kl_dirichlet", minimum=0.0)
    la = latent.log_alpha.to(torch.float64).masked_fill(latent.pad_mask, float("-inf"))
    n = (~latent.pad_mask).sum(-1).to(torch.float64)
    empty = n == 0
    n_safe = n.clamp_min(1.0)
    log_A = torch.logsumexp(la.masked_fill(empty[:, None], 0.0), dim=-1)
    alpha_p = prior.log_alpha.to(device=la.device, dtype=torch.float64).exp()
    B = alpha_p + delta * (n_safe - 1.0)
    kl = kl_symmetric_dirichlet(log_A, B, n_safe * latent.kappa) / n_safe
    return kl.masked_fill(empty, 0.0)

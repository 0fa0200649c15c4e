"""The identity initialisation as a function of the knobs (docs/MATH.md section 4), differentiable.

One function computes the NVIB's knob-dependent parameters from the knobs and the prior; the NVIB
applies it when knobs change (:meth:`nvformer.NVIB.reset_parameters`), and
:func:`nvformer.fit_knobs` differentiates it to carry the gradients of the NVIB's parameters back
to the knobs. Pure tensor maths: the knobs may be Python floats or tensors (with gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["identity_values"]


def identity_values(alpha_tau: float | Tensor, stdev_tau: float | Tensor, mu_tau: float | Tensor, mean: Tensor, var: Tensor,
                    log_alpha_std: Tensor, min_var: float) -> dict[str, Tensor]:
    """The parameters the knobs set, in float64 (or the knobs' dtype if they are tensors).

    Args:
        alpha_tau, stdev_tau, mu_tau: the knobs (scalars).
        mean, var: the prior's ``mu_p``, ``sigma_p^2`` (``[P]``); log_alpha_std: ``s_alpha`` (``[]``).
        min_var: the variance floor.

    Returns:
        ``{"mu_weight": mu_tau [] (W_mu = mu_tau I), "mu_bias": (1 - mu_tau) mu_p [P],
        "logvar_bias": log max((stdev_tau sigma_p)^2, min_var) [P], "alpha_bias": alpha_tau s_alpha []}``.
        Non-finite values (a knob whose square overflows) are returned as they are, for the caller to refuse.
    """
    dt = torch.float64
    a, s, m = (torch.as_tensor(k, dtype=dt, device=mean.device) for k in (alpha_tau, stdev_tau, mu_tau))
    return {"mu_weight": m, "mu_bias": (1.0 - m) * mean.to(dt), "logvar_bias": (s * s * var.to(dt)).clamp_min(min_var).log(),
            "alpha_bias": a * log_alpha_std.to(dt)}

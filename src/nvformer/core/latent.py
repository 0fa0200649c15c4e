"""The posterior an NVIB layer returns (docs/MATH.md section 1): a plain container, no maths."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["NVLatent"]


@dataclass
class NVLatent:
    """A Dirichlet-process posterior over a set of vectors: the output of :class:`NVIB`.

    Batch-first; component 0 is the prior component, components ``1..N`` the inputs.
    ``C = N + 1`` components; ``K = C * copies`` sampled columns (``copies = kappa`` when
    sampled in training, else 1; copies of component ``i`` are the columns
    ``i*copies .. i*copies + copies - 1``).

    Attributes:
        mu: ``[B, C, P]`` Gaussian means.
        logvar: ``[B, C, P]`` Gaussian log-variances (diagonal).
        log_alpha: ``[B, C]`` log Dirichlet pseudo-counts (float64; ``-inf`` where masked).
        pad_mask: ``[B, C]`` bool, True = component excluded (padding, or a switched-off prior).
        z: ``[B, K, P]`` the vectors attention reads: Gaussian samples in training, ``mu`` otherwise.
        log_pi: ``[B, K]`` log mixture weights (float64, ``-inf`` where masked): a Dirichlet
            sample in training, ``log(a / sum a)`` otherwise.
        log_w: ``[B, K]`` the unnormalised ``log_pi`` (``log g``, ``g_i ~ Gamma(a_i)``, in training;
            ``log a`` otherwise): a per-component quantity that does not depend on the other
            components, which is what a key/value cache needs (``log_pi = log_w - logsumexp``).
        shared_logvar: ``[P]`` when every token component has this log-variance (the logvar
            projection's weight is zero, as the identity initialisation sets it), else None; lets
            the fast evaluation path use per-head ``d x d`` matrices instead of ``P``-wide maths.
        kappa: the layer's ``kappa`` (number of samples per component), used by the KL terms.
        copies: columns per component in ``z`` / ``log_pi``.
        sampled: True if ``z`` / ``log_pi`` are samples (training form of attention applies).
    """

    mu: Tensor
    logvar: Tensor
    log_alpha: Tensor
    pad_mask: Tensor
    z: Tensor
    log_pi: Tensor
    log_w: Tensor | None = None
    shared_logvar: Tensor | None = None
    kappa: int = 1
    copies: int = 1
    sampled: bool = False

    @property
    def sample_pad_mask(self) -> Tensor:
        """``[B, K]`` bool, ``pad_mask`` repeated for each copy."""
        if self.copies == 1:
            return self.pad_mask
        return self.pad_mask.repeat_interleave(self.copies, dim=1)

    @property
    def var(self) -> Tensor:
        """``[B, C, P]`` variances."""
        return self.logvar.exp()

    def num_kept(self) -> Tensor:
        """``[B]`` number of components with non-zero weight (finite ``log_pi``), counted per component."""
        kept = torch.isfinite(self.log_pi).view(self.log_pi.shape[0], -1, self.copies).any(-1)
        return kept.sum(-1)

"""The prior of an NV latent, and its streaming empirical estimate.

A :class:`Prior` is the base distribution of the Dirichlet process that an NVIB layer's posterior
is built on (docs/MATH.md sections 1 and 4): a diagonal Gaussian ``N(mean, diag(var))`` over the
``P``-dimensional vectors, a log pseudo-count ``log_alpha`` for the prior component, and
``log_alpha_std``, the spread ``s_alpha`` that the knob ``alpha_tau`` is measured in.

Every field is a registered buffer, so a prior follows ``.to(device/dtype)`` and is saved in
``state_dict`` together with the module that owns it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .checks import check_int, check_real

__all__ = ["Prior", "PriorEstimator", "prior_for"]


def _checked(t: Tensor, name: str) -> Tensor:
    """``t`` (detached, floating point), or a ``ValueError`` if it is not a real tensor or not finite."""
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"Prior: `{name}` must be real numbers, got dtype {t.dtype}")
    t = t.detach().clone()
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if t.device.type != "meta" and not bool(torch.isfinite(t).all()):  # a meta tensor has no values to check
        raise ValueError(f"Prior: `{name}` must be finite, got {t.tolist() if t.numel() <= 4 else 'a non-finite entry'}")
    return t


def _as_tensor(value: float | Tensor, name: str) -> Tensor:
    if isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(value, dtype=torch.get_default_dtype())
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"Prior: `{name}` must be a number or a tensor, got {type(value).__name__}") from None


def _as_vector(value: float | Tensor, dim: int, name: str) -> Tensor:
    t = _as_tensor(value, name)
    if t.dim() == 0:
        t = t.expand(dim)
    if t.shape != (dim,):
        raise ValueError(f"Prior: `{name}` must be a scalar or have shape [{dim}], got {tuple(t.shape)}")
    return _checked(t, name)


def _as_scalar(value: float | Tensor, name: str) -> Tensor:
    t = _as_tensor(value, name)
    if t.numel() != 1:
        raise ValueError(f"Prior: `{name}` must be a scalar, got shape {tuple(t.shape)}")
    return _checked(t.reshape(()), name)


class Prior(nn.Module):
    """Base distribution of an NV latent.

    Args:
        dim: ``P``, the width of the vectors the latent is built on.
        mean: per-dimension prior mean ``mu_p``, scalar or ``[P]``.
        var: per-dimension prior variance ``var_p > 0``, scalar or ``[P]``.
        log_alpha: log pseudo-count of the prior component, ``log alpha_p`` (scalar).
        log_alpha_std: ``s_alpha > 0``, the unit of the ``alpha_tau`` knob (scalar); the empirical
            prior sets it to the standard deviation of ``||x||^2 / (2 sqrt d)`` over the data.

    Every value must be finite (a NaN or an infinity is a ``ValueError`` naming the argument).
    Buffers: ``mean [P]``, ``var [P]``, ``log_alpha []``, ``log_alpha_std []``.
    """

    mean: Tensor
    var: Tensor
    log_alpha: Tensor
    log_alpha_std: Tensor

    def __init__(
        self,
        dim: int,
        mean: float | Tensor = 0.0,
        var: float | Tensor = 1.0,
        log_alpha: float | Tensor = 0.0,
        log_alpha_std: float | Tensor = 1.0,
    ) -> None:
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"Prior: `dim` must be a positive int, got {dim!r}")
        self.dim = dim
        var_t = _as_vector(var, dim, "var")
        if var_t.device.type != "meta" and not bool(torch.all(var_t > 0)):
            raise ValueError("Prior: `var` must be strictly positive in every dimension")
        std_t = _as_scalar(log_alpha_std, "log_alpha_std")
        if std_t.device.type != "meta" and not bool(std_t > 0):
            raise ValueError(f"Prior: `log_alpha_std` must be > 0, got {float(std_t)}")
        self.register_buffer("mean", _as_vector(mean, dim, "mean"))
        self.register_buffer("var", var_t)
        self.register_buffer("log_alpha", _as_scalar(log_alpha, "log_alpha"))
        self.register_buffer("log_alpha_std", std_t)

    @property
    def log_var(self) -> Tensor:
        """``[P]`` log prior variance."""
        return self.var.log()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, log_alpha={float(self.log_alpha):.4g}, "
            f"log_alpha_std={float(self.log_alpha_std):.4g}"
        )

    def check_dim(self, dim: int, owner: str) -> None:
        if self.dim != dim:
            raise ValueError(f"{owner}: the prior has dim {self.dim} but the layer's width is {dim}")


class PriorEstimator:
    """Streaming empirical prior of docs/MATH.md section 4 (Welford / Chan et al. parallel merge).

    Over the non-pad vectors ``x`` seen by :meth:`update`, it accumulates in float64 the
    per-dimension mean and unbiased variance and the mean and standard deviation of
    ``L = scale * ||x||^2 / 2`` (``scale = 1/sqrt(d)`` for standard attention). Memory is
    ``O(P)`` whatever the amount of data.

    Args:
        dim: ``P``.
        scale: the attention logit scale (``1/sqrt(head_dim)`` for standard attention).
    """

    def __init__(self, dim: int, scale: float) -> None:
        self.dim = check_int(dim, "dim", "PriorEstimator")
        self.scale = check_real(scale, "scale", "PriorEstimator", above=0.0)
        self.count = 0
        self._mean: Tensor | None = None
        self._m2: Tensor | None = None
        self._l_mean = 0.0
        self._l_m2 = 0.0

    @torch.no_grad()
    def update(self, x: Tensor, key_padding_mask: Tensor | None = None) -> None:
        """Add a batch. ``x``: ``[..., P]``; ``key_padding_mask``: ``x.shape[:-1]``, True = pad."""
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"PriorEstimator.update: `x` must be a tensor ending in dim {self.dim}, got {tuple(getattr(x, 'shape', ())) or type(x).__name__}")
        flat = x.detach().reshape(-1, self.dim).to(torch.float64)
        if key_padding_mask is not None:
            if key_padding_mask.shape != x.shape[:-1]:
                raise ValueError(
                    "PriorEstimator.update: `key_padding_mask` must have shape "
                    f"{tuple(x.shape[:-1])}, got {tuple(key_padding_mask.shape)}"
                )
            flat = flat[~key_padding_mask.reshape(-1).to(torch.bool)]
        n_b = flat.shape[0]
        if n_b == 0:
            return
        mean_b = flat.mean(0)
        m2_b = ((flat - mean_b) ** 2).sum(0)
        lvals = flat.pow(2).sum(-1) * (self.scale / 2)
        l_mean_b = float(lvals.mean())
        l_m2_b = float(((lvals - l_mean_b) ** 2).sum())
        if self._mean is None:
            self._mean, self._m2 = mean_b, m2_b
            self._l_mean, self._l_m2 = l_mean_b, l_m2_b
            self.count = n_b
            return
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self._mean.to(mean_b.device)
        self._mean = self._mean.to(mean_b.device) + delta * (n_b / n)
        self._m2 = self._m2.to(mean_b.device) + m2_b + delta**2 * (n_a * n_b / n)
        l_delta = l_mean_b - self._l_mean
        self._l_mean += l_delta * n_b / n
        self._l_m2 += l_m2_b + l_delta**2 * n_a * n_b / n
        self.count = n

    def prior(self, min_var: float = 1e-12) -> Prior:
        """The estimated :class:`Prior` (float32, on the device of the data). Needs >= 2 vectors."""
        check_real(min_var, "min_var", "PriorEstimator.prior", above=0.0)
        if self.count < 2 or self._mean is None or self._m2 is None:
            raise ValueError(f"PriorEstimator: need at least 2 non-pad vectors, saw {self.count}")
        var = (self._m2 / (self.count - 1)).clamp_min(min_var)
        l_std = math.sqrt(self._l_m2 / (self.count - 1))
        prior = Prior(
            self.dim,
            mean=self._mean.float(),
            var=var.float(),
            log_alpha=self._l_mean,
            log_alpha_std=max(l_std, 1e-6),
        )
        return prior.to(self._mean.device)


def prior_for(prior: Prior | Mapping[str, Prior] | None, name: str, dim: int) -> Prior | None:
    """A copy of the prior for module ``name`` (width ``dim``) out of one prior or a ``{name: Prior}``
    mapping (as :func:`nvformer.estimate_prior` returns); None stays None."""
    if prior is None:
        return None
    if isinstance(prior, Prior):
        p = prior
    elif not isinstance(prior, Mapping):
        raise ValueError(f"nvformer.convert: `prior` must be a nvformer.Prior, a {{module name: Prior}} mapping or None, got {type(prior).__name__}")
    else:
        if name not in prior:
            raise ValueError(f"nvformer.convert: the prior set has no entry for attention module `{name}` (was it estimated for another model?)")
        p = prior[name]
        if not isinstance(p, Prior):
            raise ValueError(f"nvformer.convert: the prior for `{name}` must be a nvformer.Prior, got {type(p).__name__}")
    if p.dim != dim:
        raise ValueError(f"nvformer.convert: the prior for `{name}` has width {p.dim}, but the module reads vectors of width {dim} (estimated for another model?)")
    return Prior(dim, mean=p.mean, var=p.var, log_alpha=p.log_alpha, log_alpha_std=p.log_alpha_std)

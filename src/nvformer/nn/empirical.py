"""Empirical priors for the NV attention modules of a PyTorch model (docs/MATH.md section 4).

Because a converted model at the identity initialisation computes exactly what the original
did, the priors can be estimated *after* conversion: forward pre-hooks on every
:class:`~nvformer.NVMultiheadAttention` stream its key/value input into a
:class:`~nvformer.PriorEstimator` (non-pad vectors only), then each module gets its prior.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .._progress import progress
from ..core.prior import Prior, PriorEstimator
from .mha import NVMultiheadAttention
from .nvib import NVIB

__all__ = ["apply_priors", "call_batch", "estimate_mha_prior", "run_with_pre_hooks"]


def run_with_pre_hooks(model: nn.Module, hooks: list[tuple[nn.Module, Callable]], batches: Iterable[Any],
                       forward: Callable[[nn.Module, Any], None] | None, show_progress: bool) -> None:
    """Run ``batches`` through ``model`` in eval mode with forward pre-hooks (with kwargs) attached."""
    handles = []
    was_training = model.training
    model.eval()
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        call = forward or call_batch
        for batch in progress(batches, "estimating priors", show_progress):
            call(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def call_batch(model: nn.Module, batch: Any) -> Any:
    """``model``'s output on ``batch``: a dict is passed as keyword arguments, a tuple or list as
    positional arguments, anything else as the single argument."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@torch.no_grad()
def estimate_mha_prior(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: Callable[[nn.Module, Any], None] | None = None,
    apply: bool = True,
    show_progress: bool = True,
) -> dict[str, Prior]:
    """Estimate the empirical prior of every (NV) multi-head attention module of ``model`` on ``batches``.

    Args:
        model: a PyTorch model with ``nn.MultiheadAttention`` modules, or converted
            (:class:`NVMultiheadAttention`, best at the identity initialisation so that the vectors
            seen are those of the original model). torch's fused fast path, which would bypass the
            attention modules, is off while the batches run.
        batches: an iterable of model inputs: a dict is passed as keyword arguments, a tuple or
            list as positional arguments, anything else as the single argument.
        forward: ``forward(model, batch)`` to call instead of the rule above.
        apply: set each NV module's prior (and re-apply its identity initialisation).
        show_progress: a progress bar (if tqdm is installed).

    Returns:
        ``{module name: Prior}``. Memory is O(width) per module whatever the data size.
    """
    modules = {name: m for name, m in model.named_modules() if isinstance(m, (NVMultiheadAttention, nn.MultiheadAttention))}
    if not modules:
        raise ValueError(f"estimate_prior: {type(model).__name__} has no multi-head attention module")
    estimators = {name: PriorEstimator(m.kdim, m.nvib.scale if isinstance(m, NVMultiheadAttention) else (m.embed_dim // m.num_heads) ** -0.5)
                  for name, m in modules.items()}

    def make_hook(est: PriorEstimator, mod: nn.Module):
        def hook(module, args, kwargs):
            key = args[1] if len(args) > 1 else kwargs["key"]
            kpm = args[3] if len(args) > 3 else kwargs.get("key_padding_mask")
            if key.dim() == 2:
                key = key.unsqueeze(0)
                kpm = kpm.unsqueeze(0) if kpm is not None else None
            elif not mod.batch_first:
                key = key.transpose(0, 1)
            if kpm is not None and kpm.dtype != torch.bool:
                kpm = torch.isneginf(kpm)
            est.update(key, kpm)

        return hook

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        run_with_pre_hooks(model, [(m, make_hook(estimators[name], m)) for name, m in modules.items()], batches, forward, show_progress)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    if not any(est.count for est in estimators.values()):
        raise ValueError("estimate_prior: no data: the batches gave no non-pad vectors")
    priors = {name: est.prior() for name, est in estimators.items()}
    if apply:
        apply_priors([(m.nvib, priors[name]) for name, m in modules.items() if isinstance(m, NVMultiheadAttention)])
    return priors


def apply_priors(pairs: list[tuple[NVIB, Prior]]) -> None:
    """``nvib.set_prior(prior)`` for every pair, after checking that every prior fits its module's
    knobs (a finite identity initialisation), so a bad prior changes no module."""
    for nvib, prior in pairs:
        nvib.identity_parameters(prior=prior, who="estimate_prior")
    for nvib, prior in pairs:
        nvib.set_prior(prior)

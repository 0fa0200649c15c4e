"""Empirical priors of a Hugging Face model's attention sites (docs/MATH.md section 4).

Forward pre-hooks read each attention module's key/value input and mask through its family
adapter (converted or not: at the identity the vectors are the same); non-pad vectors stream
into a :class:`~nvformer.PriorEstimator`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..core.masks import hf_mask_bias, key_padding_from_bias
from ..core.prior import Prior, PriorEstimator
from ..nn.empirical import apply_priors, run_with_pre_hooks
from .adapters import Adapter
from .convert import attention_modules, is_nv_hf_module

__all__ = ["estimate_hf_prior"]


@torch.no_grad()
def estimate_hf_prior(model: nn.Module, batches: Iterable[Any], *, forward=None, apply: bool = True, show_progress: bool = True) -> dict[str, Prior]:
    """Empirical priors of every attention site of a Hugging Face model (converted or not).

    Forward pre-hooks read each attention module's key/value input and mask through its adapter;
    non-pad vectors stream into a :class:`PriorEstimator`. The cross site is estimated once (on
    the final encoder output) under the name of the first cross-attention module.
    """
    targets = attention_modules(model)
    if not targets:
        raise ValueError(f"estimate_prior: {type(model).__name__} has no supported attention module")
    estimators: dict[str, PriorEstimator] = {}
    seen_cross = False

    def make_hook(name: str, ad: Adapter, cross: bool):
        def hook(module, args, kwargs):
            call = ad.call_arguments(module, args, kwargs)
            x = ad.hidden_states(module, call)
            kv = call.get(ad.arg_kv) if cross else x
            if kv is None:  # cross-attention states already cached
                return
            mask = call.get(ad.arg_kv_mask) if (cross and ad.arg_kv_mask) else call.get(ad.arg_mask)
            cache = ad.cache(module, call)
            past = cache.get_seq_length(module.layer_idx) if (cache is not None and not cross) else 0
            B, n_new = kv.shape[0], kv.shape[1]
            bias = hf_mask_bias(mask, B, x.shape[1], past + n_new, getattr(module, "is_causal", False) and not cross, torch.float32, x.device)
            if name not in estimators:
                estimators[name] = PriorEstimator(kv.shape[-1], float(module.scaling))
            estimators[name].update(kv, key_padding_from_bias(bias, B, n_new))

        return hook

    hooks = []
    for name, module, ad, site in targets:
        if site == "cross":
            if seen_cross:
                continue
            seen_cross = True
        hooks.append((module, make_hook(name, ad, site == "cross")))
    run_with_pre_hooks(model, hooks, batches, forward, show_progress)
    if not any(est.count for est in estimators.values()):
        raise ValueError("estimate_prior: no data: the batches gave no non-pad vectors")
    priors = {name: est.prior() for name, est in estimators.items()}
    if apply:
        apply_priors([(module.nvib, priors[name]) for name, module, _, _ in targets if is_nv_hf_module(module) and name in priors])
    return priors

"""Convert Hugging Face models to NV models in place; knobs; empirical priors.

``convert(model, prior=None, **knobs)`` gives every supported attention module a dynamic
subclass whose forward is :func:`~nvformer.hf.forward.nv_attention_forward` and an
:class:`~nvformer.NVIB` child initialised to the identity (MATH.md section 4). Sites:
``"encoder"`` (bidirectional self-attention, one NVIB per layer), ``"decoder"`` (causal
self-attention, one per layer), ``"cross"`` (one NVIB on the final encoder output, shared by
all decoder layers, as in Fehr & Henderson 2024).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ..nvib import NVIB
from ..prior import Prior, PriorEstimator
from .adapters import Adapter, adapter_for, layer_index, looks_like_attention, supported_classes
from .forward import _key_padding, _mask_bias, nv_attention_forward

SITES = ("encoder", "decoder", "cross")
FORMULAS = ("paper", "exact")
_NV_CLASSES: dict[type, type] = {}


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "_attn_implementation")


def _nv_class(cls: type) -> type:
    if cls not in _NV_CLASSES:
        _NV_CLASSES[cls] = type(f"NV{cls.__name__}", (cls,), {"forward": nv_attention_forward, "_nv_base_class": cls, "__module__": __name__})
    return _NV_CLASSES[cls]


def is_nv_hf_module(module: nn.Module) -> bool:
    return hasattr(type(module), "_nv_base_class") and hasattr(module, "nvib")


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module, Adapter, str]]:
    """``(name, module, adapter, site)`` for every supported attention module, in order.

    Raises ``ValueError`` naming any leaf attention module whose class has no adapter.
    """
    found, unsupported = [], []
    for name, module in model.named_modules():
        ad = adapter_for(module)
        if ad is not None:
            ad.check_signature(module)
            site = "cross" if ad.is_cross(module, name) else ("decoder" if getattr(module, "is_causal", False) else "encoder")
            found.append((name, module, ad, site))
        elif looks_like_attention(module):
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise ValueError(
            "nvformer.convert: no adapter for attention module(s) " + ", ".join(unsupported[:5])
            + (" ..." if len(unsupported) > 5 else "") + f"; supported classes: {', '.join(supported_classes())}"
        )
    return found


def _prior_for(prior: Prior | Mapping[str, Prior] | None, name: str, dim: int) -> Prior | None:
    if prior is None:
        return None
    if isinstance(prior, Prior):
        p = prior
    else:
        if name not in prior:
            raise ValueError(f"nvformer.convert: the prior set has no entry for attention module `{name}` (was it estimated for another model?)")
        p = prior[name]
    if p.dim != dim:
        raise ValueError(f"nvformer.convert: the prior for `{name}` has width {p.dim}, but the module reads vectors of width {dim} (estimated for another model?)")
    return Prior(dim, mean=p.mean, var=p.var, log_alpha=p.log_alpha, log_alpha_std=p.log_alpha_std)


def convert(
    model: nn.Module,
    prior: Prior | Mapping[str, Prior] | None = None,
    *,
    sites: Iterable[str] = SITES,
    formula: str = "paper",
    delta: float = 1.0,
    mu_tau: float = 1.0,
    stdev_tau: float = 0.0,
    alpha_tau: float = 10.0,
    **nvib_kwargs: Any,
) -> nn.Module:
    """Reinterpret a pretrained model as an NV model, in place; returns ``model``.

    Args:
        model: a ``transformers`` model (families: see :func:`supported_classes`) or a PyTorch
            model with ``nn.MultiheadAttention`` modules (then :func:`nvformer.convert_mha`).
        prior: None (a standard prior), one :class:`Prior` for every module, or the
            ``{module name: Prior}`` returned by :func:`estimate_prior`.
        sites: which sites to convert (``"encoder"``, ``"decoder"``, ``"cross"``).
        formula: evaluation formula, ``"paper"`` or ``"exact"``.
        delta, mu_tau, stdev_tau, alpha_tau, nvib_kwargs: :class:`NVIB` arguments (knobs).

    With ``mu_tau=1, stdev_tau=0`` and a large ``alpha_tau`` the outputs are unchanged.
    """
    if not is_hf_model(model):
        if any(isinstance(m, nn.MultiheadAttention) for m in model.modules()):
            from ..attention import convert_mha

            return convert_mha(model, prior=prior if isinstance(prior, Prior) or prior is None else None, formula=formula, delta=delta,
                               mu_tau=mu_tau, stdev_tau=stdev_tau, alpha_tau=alpha_tau, **nvib_kwargs)
        raise ValueError(f"nvformer.convert: {type(model).__name__} is neither a transformers model nor has nn.MultiheadAttention modules")
    if formula not in FORMULAS:
        raise ValueError(f"nvformer.convert: `formula` must be one of {FORMULAS}, got {formula!r}")
    sites = tuple(sites)
    bad = [s for s in sites if s not in SITES]
    if bad:
        raise ValueError(f"nvformer.convert: unknown site(s) {bad}; sites are {SITES}")
    if nvib_kwargs.get("kappa", 1) != 1:
        raise ValueError("nvformer.convert: kappa > 1 changes the number of key columns and is not supported on Hugging Face models")
    impl = model.config._attn_implementation
    if impl not in ("eager", "sdpa"):
        raise ValueError(f"nvformer.convert: attention implementation {impl!r} is not supported; load the model with attn_implementation='sdpa' or 'eager'")
    targets = attention_modules(model)
    if any(is_nv_hf_module(m) for _, m, _, _ in targets):
        raise ValueError("nvformer.convert: the model is already converted; use nvformer.set_knobs to change the knobs")
    if not targets:
        raise ValueError(f"nvformer.convert: {type(model).__name__} has no attention module to convert")
    knobs = dict(delta=delta, mu_tau=mu_tau, stdev_tau=stdev_tau, alpha_tau=alpha_tau, **nvib_kwargs)
    shared_cross: NVIB | None = None
    cross_name = None
    for name, module, ad, site in targets:
        if site not in sites:
            continue
        (q_w, _), (k_w, _), _ = ad.qkv(module)
        d = ad.head_size(module)
        dim = k_w.shape[1]
        scale = float(module.scaling)
        if site == "cross" and shared_cross is not None:
            if shared_cross.dim != dim or abs(shared_cross.scale - scale) > 1e-12 or shared_cross.head_dim != d:
                raise ValueError(f"nvformer.convert: cross-attention modules differ in width or scale ({name}); one shared NVIB needs them equal")
            nvib = shared_cross
        else:
            nvib = NVIB(dim, q_w.shape[0] // d, prior=_prior_for(prior, name, dim), head_dim=d, scale=scale,
                        device=k_w.device, dtype=k_w.dtype, **knobs)
            if site == "cross":
                shared_cross, cross_name = nvib, name
        module.__class__ = _nv_class(type(module))
        module.add_module("nvib", nvib.train(module.training))
        module._nv_adapter = ad
        module._nv_site = site
        module._nv_formula = formula
        module._nv_layer = layer_index(module, name)
        module._nv_cross_owner = cross_name if site == "cross" else name
        module.last_latent = None
    model._nvformer = {"sites": list(sites), "formula": formula}
    return model


def nv_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every NV attention module (Hugging Face or ``NVMultiheadAttention``)."""
    from ..attention import NVMultiheadAttention

    return [(n, m) for n, m in model.named_modules() if is_nv_hf_module(m) or isinstance(m, NVMultiheadAttention)]


def _site(module: nn.Module) -> str | None:
    return getattr(module, "_nv_site", None)


def set_knobs(
    model: nn.Module,
    alpha_tau: float | None = None,
    stdev_tau: float | None = None,
    mu_tau: float | None = None,
    *,
    site: str | Iterable[str] | None = None,
    layers: int | Iterable[int] | None = None,
) -> nn.Module:
    """Change the knobs of all NV modules, one site (or several), or chosen layers; in place.

    Re-applies the identity initialisation with the new knobs (no rebuilding). The
    cross-attention NVIB is shared by all decoder layers, so ``layers`` does not apply to it.
    Raises ``ValueError`` for knobs out of range (e.g. negative ``stdev_tau``).
    """
    sites = None if site is None else ({site} if isinstance(site, str) else set(site))
    if sites is not None and not sites <= set(SITES):
        raise ValueError(f"nvformer.set_knobs: unknown site(s) {sorted(sites - set(SITES))}; sites are {SITES}")
    layer_set = None if layers is None else ({layers} if isinstance(layers, int) else set(layers))
    if layer_set is not None and sites == {"cross"}:
        raise ValueError("nvformer.set_knobs: the cross-attention NVIB is shared by all decoder layers; `layers` does not apply")
    mods = nv_modules(model)
    if not mods:
        raise ValueError(f"nvformer.set_knobs: {type(model).__name__} has no NV attention module (convert it first)")
    done: set[int] = set()
    for name, m in mods:
        if sites is not None and _site(m) not in sites:
            continue
        if layer_set is not None and (_site(m) == "cross" or getattr(m, "_nv_layer", layer_index(m, name)) not in layer_set):
            continue
        if id(m.nvib) in done:
            continue
        m.nvib.set_knobs(mu_tau=mu_tau, stdev_tau=stdev_tau, alpha_tau=alpha_tau)
        done.add(id(m.nvib))
    if not done:
        raise ValueError(f"nvformer.set_knobs: no NV module matches site={site!r}, layers={layers!r}")
    return model


def get_knobs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module name: {site, layer, mu_tau, stdev_tau, alpha_tau}}`` for every NV module."""
    out = {}
    for name, m in nv_modules(model):
        out[name] = {"site": _site(m), "layer": getattr(m, "_nv_layer", layer_index(m, name)), **m.nvib.knobs()}
    return out


@torch.no_grad()
def estimate_hf_prior(model: nn.Module, batches: Iterable[Any], *, forward=None, apply: bool = True, show_progress: bool = True) -> dict[str, Prior]:
    """Empirical priors of every attention site of a Hugging Face model (converted or not).

    Forward pre-hooks read each attention module's key/value input and mask through its adapter;
    non-pad vectors stream into a :class:`PriorEstimator`. The cross site is estimated once (on
    the final encoder output) under the name of the first cross-attention module.
    """
    from ..empirical import run_with_pre_hooks

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
            bias = _mask_bias(mask, B, x.shape[1], past + n_new, getattr(module, "is_causal", False) and not cross, torch.float32, x.device)
            if name not in estimators:
                estimators[name] = PriorEstimator(kv.shape[-1], float(module.scaling))
            estimators[name].update(kv, _key_padding(bias, B, n_new))

        return hook

    hooks = []
    for name, module, ad, site in targets:
        if site == "cross":
            if seen_cross:
                continue
            seen_cross = True
        hooks.append((module, make_hook(name, ad, site == "cross")))
    run_with_pre_hooks(model, hooks, batches, forward, show_progress)
    priors = {name: est.prior() for name, est in estimators.items()}
    if apply:
        for name, module, _, site in targets:
            if is_nv_hf_module(module) and name in priors:
                module.nvib.set_prior(priors[name])
    return priors

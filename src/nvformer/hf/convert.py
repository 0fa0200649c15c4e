"""Convert Hugging Face models to NV models in place, and back (docs/DESIGN.md, "Hugging Face").

:func:`convert_hf` gives every supported attention module of the chosen sites a dynamic subclass
whose forward is :func:`~nvformer.hf.forward.nv_attention_forward`, an :class:`~nvformer.NVIB`
child initialised to the identity (docs/MATH.md section 4) and one record ``module._nv``
(:class:`~nvformer.config.NVSite`). Sites: ``"encoder"`` (bidirectional self-attention, one NVIB
per layer), ``"decoder"`` (causal self-attention, one per layer), ``"cross"`` (one NVIB on the
final encoder output, shared by all decoder layers, as in Fehr & Henderson 2024).
:func:`unconvert_hf` restores the original classes and removes everything conversion added.

The NVIB is built in the model's dtype, but at least float32, and stays so through ``.to()``,
``.half()`` and ``.bfloat16()`` (the converted class's ``_apply``): its devices follow, and so do
wider dtypes, but a 16-bit dtype leaves it (parameters and prior buffers) in float32. Converting a
bfloat16 model and converting first and casting after therefore give the same model.

Nothing here imports ``transformers``: models are recognised by duck typing.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ..config import NVConfig, NVSite
from ..core.checks import at_least_float32, compute_dtype
from ..core.prior import Prior, prior_for
from ..nn.nvib import NVIB
from .adapters import Adapter, adapter_for, base_class, layer_index, looks_like_attention, supported_classes
from .forward import last_latent, nv_attention_forward

__all__ = ["attention_modules", "convert_hf", "is_hf_model", "is_nv_hf_module", "unconvert_hf"]

_NV_CLASSES: dict[type, type] = {}
_ADDED = ("_nv", "_nv_latent", "_nv_derived", "_nv_compiled")  # instance attributes conversion adds (besides the nvib child)


def is_hf_model(model: nn.Module) -> bool:
    """A ``transformers`` model (it has a config with an attention implementation)."""
    return hasattr(model, "config") and hasattr(model.config, "_attn_implementation")


def _nv_apply(self: nn.Module, fn, recurse: bool = True) -> nn.Module:
    """``Module._apply`` of a converted module (behind ``.to()``, ``.half()``, ``.cuda()``): the
    ``nvib`` child follows devices and dtypes, but in at least float32 (:func:`~nvformer.core.checks.at_least_float32`).

    Its parameters and prior produce per-key logit terms that must cancel to float32 accuracy at
    the identity (docs/MATH.md section 4); the attention itself runs in float32 for a bfloat16 or
    float16 model anyway (:func:`~nvformer.hf.forward.nv_attention_forward`).
    """
    if recurse:
        for name, child in self.named_children():
            child._apply(at_least_float32(fn) if name == "nvib" else fn)
    return self._nv_base_class._apply(self, fn, recurse=False)


def _nv_class(cls: type) -> type:
    if cls not in _NV_CLASSES:
        _NV_CLASSES[cls] = type(f"NV{cls.__name__}", (cls,), {"forward": nv_attention_forward, "_apply": _nv_apply, "_nv_base_class": cls,
                                                           "last_latent": last_latent, "__module__": __name__})
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


def convert_hf(model: nn.Module, config: NVConfig, prior: Prior | Mapping[str, Prior] | None = None) -> nn.Module:
    """Reinterpret a ``transformers`` model as an NV model, in place (use :func:`nvformer.convert`).

    Each module's knobs come from ``config.knobs_for(site, layer, name)``.
    """
    if config.kappa != 1:
        raise ValueError("nvformer.convert: kappa > 1 changes the number of key columns and is not supported on Hugging Face models")
    impl = model.config._attn_implementation
    if impl not in ("eager", "sdpa"):
        raise ValueError(f"nvformer.convert: attention implementation {impl!r} is not supported; load the model with attn_implementation='sdpa' or 'eager'")
    targets = attention_modules(model)
    if any(is_nv_hf_module(m) for _, m, _, _ in targets):
        raise ValueError("nvformer.convert: the model is already converted; use nvformer.set_knobs to change the knobs")
    if not targets:
        raise ValueError(f"nvformer.convert: {type(model).__name__} has no attention module to convert")
    present = sorted({site for *_, site in targets})
    chosen = [t for t in targets if t[3] in config.sites]
    if not chosen:
        raise ValueError(f"nvformer.convert: {type(model).__name__} has no attention module at site(s) {list(config.sites)}; its sites are {present}")
    shared_cross: NVIB | None = None
    cross_name = ""
    plan = []  # everything is built (and checked) before the model changes
    for name, module, ad, site in chosen:
        (q_w, _), (k_w, _), _ = ad.qkv(module)
        d = ad.head_size(module)
        dim = k_w.shape[1]
        scale = float(module.scaling)
        layer = layer_index(module, name)
        if site == "cross" and shared_cross is not None:
            if shared_cross.dim != dim or abs(shared_cross.scale - scale) > 1e-12 or shared_cross.head_dim != d:
                raise ValueError(f"nvformer.convert: cross-attention modules differ in width or scale ({name}); one shared NVIB needs them equal")
            nvib = shared_cross
        else:
            knobs = config.knobs_for(site, None if site == "cross" else layer, name)
            nvib = NVIB(dim, q_w.shape[0] // d, prior=prior_for(prior, name, dim), head_dim=d, scale=scale, kv_heads=k_w.shape[0] // d,
                        device=k_w.device, dtype=compute_dtype(k_w.dtype), **config.nvib_settings(), **knobs.as_dict())
            if site == "cross":
                shared_cross, cross_name = nvib, name
        plan.append((module, nvib, NVSite(site=site, layer=layer, owner=cross_name if site == "cross" else name, formula=config.formula, adapter=ad)))
    for module, nvib, record in plan:
        module.__class__ = _nv_class(type(module))
        module.add_module("nvib", nvib.train(module.training))
        module._nv = record
        module.last_latent = None
    return model


def unconvert_hf(model: nn.Module) -> nn.Module:
    """Undo :func:`convert_hf` in place: original classes, no ``nvib`` children, no added state."""
    for _, module in model.named_modules():
        if not is_nv_hf_module(module):
            continue
        module.__class__ = base_class(module)
        del module._modules["nvib"]
        for attr in _ADDED:
            module.__dict__.pop(attr, None)
    return model

"""The model-level verbs: convert, unconvert, knobs, configuration, priors, prediction mode.

This is the one place that decides "Hugging Face model or plain PyTorch module?"
(:func:`model_kind`); everything below it is written for one of the two. Converted attention modules
of both kinds carry an :class:`~nvformer.config.NVSite` record (``module._nv``) and an
:class:`~nvformer.NVIB` child, so knobs, configuration and prediction mode are read and written
the same way for both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .config import KNOBS, SITES, Knobs, NVConfig, NVSite, group_key
from .core.prior import Prior
from .dirichlet.module import DirichletState
from .hf.convert import convert_hf, is_hf_model, is_nv_hf_module, unconvert_hf
from .hf.dirichlet import is_dirichlet_model, unconvert_dirichlet
from .hf.forward import extended_sdpa
from .hf.prior import estimate_hf_prior
from .nn.empirical import estimate_mha_prior
from .nn.mha import NVMultiheadAttention, convert_mha, layer_index, torch_site, unconvert_mha
from .nn.nvib import NVIB

__all__ = [
    "PREDICTIONS",
    "convert",
    "estimate_prior",
    "get_config",
    "get_head_knobs",
    "get_knobs",
    "knob_groups",
    "model_kind",
    "nv_modules",
    "set_head_knobs",
    "set_knobs",
    "set_prediction",
    "site_of",
    "unconvert",
]

PREDICTIONS = ("mean", "sample")


def model_kind(model: nn.Module, who: str) -> str:
    """``"hf"`` for a ``transformers`` model, ``"torch"`` for a module with ``nn.MultiheadAttention``
    / :class:`NVMultiheadAttention` children; anything else is an error."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"{who}: expected a torch.nn.Module, got {type(model).__name__}")
    if is_hf_model(model):
        return "hf"
    if any(isinstance(m, (nn.MultiheadAttention, NVMultiheadAttention)) for m in model.modules()):
        return "torch"
    raise ValueError(f"{who}: {type(model).__name__} is neither a transformers model nor has nn.MultiheadAttention modules")


def convert(model: nn.Module, config: NVConfig | None = None, *, prior: Prior | Mapping[str, Prior] | None = None,
            **overrides: Any) -> nn.Module:
    """Reinterpret a pretrained model as an NV model, in place; returns ``model``.

    With the default knobs (:data:`nvformer.IDENTITY`) the outputs are unchanged.

    Args:
        model: a ``transformers`` model (families: :func:`nvformer.hf.adapters.supported_classes`)
            or a PyTorch model with ``nn.MultiheadAttention`` modules.
        config: the :class:`NVConfig` (sites, formula, knobs, ...); default ``NVConfig()``.
        prior: None (a standard prior), one :class:`Prior` for every module, or the
            ``{module name: Prior}`` returned by :func:`estimate_prior`.
        overrides: :class:`NVConfig` fields (``sites=("encoder",)``, ``formula="exact"``, ...) and
            knob values (``alpha_tau``, ``stdev_tau``, ``mu_tau``: the default setting ``"*"``)
            applied on top of ``config``.
    """
    who = "nvformer.convert"
    kind = model_kind(model, who)
    if config is not None and not isinstance(config, NVConfig):
        raise ValueError(f"{who}: `config` must be an NVConfig or None, got {type(config).__name__}")
    config = _with_overrides(config or NVConfig(), overrides, who)
    if kind == "hf":
        return convert_hf(model, config, prior)
    if nv_modules(model):
        raise ValueError(f"{who}: the model is already converted; use nvformer.set_knobs to change the knobs")
    return convert_mha(model, config, prior)


def _with_overrides(config: NVConfig, overrides: dict[str, Any], who: str) -> NVConfig:
    knob_changes = {k: overrides.pop(k) for k in KNOBS if k in overrides}
    if overrides:
        d = config.to_dict()
        unknown = set(overrides) - set(d)
        if unknown:
            raise ValueError(f"{who}: unknown argument(s) {sorted(unknown)}; NVConfig fields are {sorted(d)}, knobs are {KNOBS}")
        d.update(overrides)
        config = NVConfig.from_dict(d, who)
    return config.with_knobs(**knob_changes) if knob_changes else config


def unconvert(model: nn.Module) -> nn.Module:
    """Undo :func:`convert` (and :func:`nvformer.convert_dirichlet`) in place; returns ``model``.

    The original module classes come back and ``model.state_dict()`` equals what it was before
    conversion (with the current weights, should they have been trained since).
    """
    who = "nvformer.unconvert"
    kind = model_kind(model, who)
    if kind == "hf" and is_dirichlet_model(model):
        return unconvert_dirichlet(model)
    if not nv_modules(model):
        raise ValueError(f"{who}: {type(model).__name__} has no NV attention module (it was not converted)")
    return unconvert_hf(model) if kind == "hf" else unconvert_mha(model)


def compile_attention(model: nn.Module, enable: bool = True, **compile_kwargs) -> nn.Module:
    """Run the attention core of a converted Hugging Face model through ``torch.compile``, in place;
    returns ``model``.

    The core is what the fast paths do per call once keys and values are projected: writing queries,
    keys (with their per-key terms) and values into the extended buffers and the one SDPA call
    (:func:`nvformer.hf.forward.extended_sdpa`), compiled once with ``dynamic=True`` (sequence lengths
    grow while decoding) and shared by every module. The first calls compile (tens of seconds on a
    CPU); results equal the eager ones (tests). Whether it is faster depends on the device and
    backend: ``benchmarks/performance.py`` measures it as its own row (``smollm2-generate-compiled``).
    ``enable=False`` goes back to the eager core.

    Args:
        model: a Hugging Face model converted by :func:`convert`.
        enable: compile (True) or restore the eager core (False).
        compile_kwargs: passed to ``torch.compile`` (``mode=``, ``backend=``, ...).
    """
    who = "nvformer.compile_attention"
    if not isinstance(enable, bool):
        raise ValueError(f"{who}: `enable` must be True or False, got {enable!r}")
    mods = [m for _, m in nv_modules(model) if is_nv_hf_module(m)] if model_kind(model, who) == "hf" else []
    if not mods:
        raise ValueError(f"{who}: {type(model).__name__} is not a Hugging Face model converted by nvformer.convert")
    fn = torch.compile(extended_sdpa, **({"dynamic": True} | compile_kwargs)) if enable else None
    for m in mods:
        if fn is None:
            m.__dict__.pop("_nv_compiled", None)
        else:
            m._nv_compiled = fn
    return model


# ---------------------------------------------------------------------------------------------- the NV modules


def nv_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every NV attention module (Hugging Face or :class:`NVMultiheadAttention`)."""
    return [(n, m) for n, m in model.named_modules() if is_nv_hf_module(m) or isinstance(m, NVMultiheadAttention)]


def site_of(model: nn.Module, name: str, module: nn.Module) -> NVSite:
    """The :class:`NVSite` record of the NV module ``name`` of ``model``."""
    info = getattr(module, "_nv", None)
    if info is not None:
        return info
    # an NVMultiheadAttention built by hand (not by convert)
    return NVSite(site=torch_site(model, name), layer=layer_index(name), owner=name, formula=module.formula)


def knob_groups(model: nn.Module, who: str = "nvformer") -> list[tuple[str, NVSite, NVIB]]:
    """``(group key, site record, NVIB)`` of every distinct NVIB of a converted model, in order.

    The group key is ``"site.layer"`` (``"encoder.3"``), the site alone for an NVIB shared by
    several modules (the Hugging Face cross-attention NVIB), or the module name when it has no
    layer index: the keys of :func:`get_knobs` and of ``NVConfig.knobs``.
    """
    mods = nv_modules(model)
    if not mods:
        raise ValueError(f"{who}: {type(model).__name__} has no NV attention module (convert it first)")
    users: dict[int, int] = {}
    for _, m in mods:
        users[id(m.nvib)] = users.get(id(m.nvib), 0) + 1
    out, seen = [], set()
    for name, m in mods:
        if id(m.nvib) in seen:
            continue
        seen.add(id(m.nvib))
        info = site_of(model, name, m)
        if users[id(m.nvib)] > 1:
            key = info.site
        elif info.layer is None:
            key = name
        else:
            key = group_key(info.site, info.layer)
        out.append((key, info, m.nvib))
    return out


def get_knobs(model: nn.Module) -> dict[str, Knobs]:
    """``{group key: Knobs}`` of every NVIB (keys: :func:`knob_groups`)."""
    return {key: nvib.knobs() for key, _, nvib in knob_groups(model, "nvformer.get_knobs")}


def get_head_knobs(model: nn.Module) -> dict[str, dict[str, list[float]]]:
    """``{group key: {"alpha_tau": [...], "stdev_tau": [...]}}`` of every NVIB with per-head knobs
    (:meth:`nvformer.NVIB.set_head_knobs`; one value per key/value head); empty if none has them."""
    return {key: nvib.head_knobs() for key, _, nvib in knob_groups(model, "nvformer.get_head_knobs") if nvib.head_knobs() is not None}


def set_head_knobs(model: nn.Module, knobs: Mapping[str, Mapping[str, Any] | None]) -> nn.Module:
    """Per-head knobs of a converted model, in place: ``{group key: {"alpha_tau": [...], "stdev_tau":
    [...]}}`` (keys of :func:`get_knobs`; one value per key/value head, or one number for all; a
    missing knob takes the layer's value; None removes a group's per-head knobs). They replace the
    layer's ``alpha_tau`` and ``stdev_tau`` for each head in the evaluation form; ``mu_tau`` stays
    per layer. Supported on converted Hugging Face models. Atomic: checked before any change."""
    who = "nvformer.set_head_knobs"
    if model_kind(model, who) != "hf":
        raise ValueError(f"{who}: per-head knobs are supported on converted Hugging Face models")
    if not isinstance(knobs, Mapping):
        raise ValueError(f"{who}: `knobs` must map group keys to per-head knob lists, got {type(knobs).__name__}")
    groups = {key: nvib for key, _, nvib in knob_groups(model, who)}
    stray = sorted(set(knobs) - set(groups))
    if stray:
        raise ValueError(f"{who}: knob group(s) {stray} match no NV module; groups are {sorted(groups)}")
    plan = []
    for key, value in knobs.items():
        if value is not None and (not isinstance(value, Mapping) or set(value) - {"alpha_tau", "stdev_tau"}):
            raise ValueError(f"{who}: {key}: expected {{'alpha_tau': [...], 'stdev_tau': [...]}} or None, got {value!r}")
        if value is not None:
            groups[key].check_head_knobs(**value, who=f"{who} ({key})")
        plan.append((groups[key], value))
    for nvib, value in plan:
        nvib.set_head_knobs(**(value or {}))
    return model


def get_config(model: nn.Module) -> NVConfig:
    """The :class:`NVConfig` of a converted model as it is now (knobs included, compacted: one
    ``"*"`` setting if all modules agree, else per site where a site agrees, else per layer)."""
    groups = knob_groups(model, "nvformer.get_config")
    first = groups[0][2]
    formulas = {info.formula for _, info, _ in groups}
    if len(formulas) > 1:
        raise ValueError(f"nvformer.get_config: the NV modules use different formulas {sorted(formulas)}")
    sites = tuple(s for s in SITES if any(info.site == s for _, info, _ in groups))
    alpha_skip = any(getattr(m, "_alpha_skip_source", None) for _, m in nv_modules(model))
    return NVConfig(sites=sites, formula=formulas.pop(), delta=first.delta, kappa=first.kappa, alpha_threshold=first.alpha_threshold,
                    threshold_mode=first.threshold_mode, prior_component=first.prior_component, min_var=first.min_var,
                    prior_scaling=first.prior_scaling,
                    alpha_skip=alpha_skip, knobs=_compact({key: (info.site, nvib.knobs()) for key, info, nvib in groups}))


def _compact(knobs: dict[str, tuple[str, Knobs]]) -> dict[str, Knobs]:
    values = {k for _, k in knobs.values()}
    if len(values) == 1:
        return {"*": values.pop()}
    out: dict[str, Knobs] = {}
    for site in SITES:
        here = {key: k for key, (s, k) in knobs.items() if s == site}
        if len(set(here.values())) == 1:
            out[site] = next(iter(here.values()))
        else:
            out.update(here)
    return out


def set_knobs(model: nn.Module, knobs: NVConfig | Mapping[str, Any] | Knobs | None = None, *, alpha_tau: float | None = None,
              stdev_tau: float | None = None, mu_tau: float | None = None, site: str | Iterable[str] | None = None,
              layers: int | Iterable[int] | None = None) -> nn.Module:
    """Change the knobs of a converted model, in place; returns ``model``.

    ``knobs`` sets whole settings: an :class:`NVConfig` (its ``knobs``, for every module), one
    :class:`Knobs` for every module, or a ``{group key: Knobs or dict}`` mapping (keys as in
    ``NVConfig.knobs``) for the modules its keys match (the others keep their knobs; a key that
    matches no module is an error). ``alpha_tau``, ``stdev_tau``, ``mu_tau`` (None = keep) then
    change single knobs. ``site`` and ``layers`` restrict the change to some sites and layer
    indices (the shared cross-attention NVIB of a Hugging Face model has no layers).

    Atomic: every value is checked before any module changes, so a bad value leaves the model as
    it was. Re-applies the identity initialisation with the new knobs (no rebuilding).
    """
    who = "nvformer.set_knobs"
    sites = None if site is None else ({site} if isinstance(site, str) else set(site))
    if sites is not None and not sites <= set(SITES):
        raise ValueError(f"{who}: unknown site(s) {sorted(sites - set(SITES))}; sites are {SITES}")
    layer_set = None if layers is None else ({layers} if isinstance(layers, int) else set(layers))
    if layer_set is not None and not all(isinstance(i, int) and not isinstance(i, bool) for i in layer_set):
        raise ValueError(f"{who}: `layers` must be layer indices (ints), got {layers!r}")
    groups = knob_groups(model, who)
    if layer_set is not None and sites == {"cross"} and all(key == "cross" for key, info, _ in groups if info.site == "cross"):
        raise ValueError(f"{who}: the cross-attention NVIB is shared by all decoder layers; `layers` does not apply")
    table, whole = None, isinstance(knobs, (NVConfig, Knobs))  # a config or one setting covers every module
    if knobs is not None:
        if not isinstance(knobs, (NVConfig, Knobs, Mapping)):
            raise ValueError(f"{who}: `knobs` must be an NVConfig, a Knobs or a {{group key: Knobs}} mapping, got {type(knobs).__name__}")
        try:
            table = knobs if isinstance(knobs, NVConfig) else NVConfig(knobs={"*": knobs} if isinstance(knobs, Knobs) else knobs)
        except ValueError as e:
            raise ValueError(f"{who}: {e}") from None
        names = {key for key, _, _ in groups} | {info.site for _, info, _ in groups} | {"*"}
        stray = sorted(set(table.knobs) - names)
        if stray:
            raise ValueError(f"{who}: knob group(s) {stray} match no NV module; groups are {sorted(key for key, _, _ in groups)}")
    plan = []
    for key, info, nvib in groups:
        if sites is not None and info.site not in sites:
            continue
        if layer_set is not None and (key == info.site or info.layer not in layer_set):
            continue
        layer = info.layer if key != info.site else None
        base = None if table is None else (table.knobs_for if whole else table.lookup)(info.site, layer, key)
        base = nvib.knobs() if base is None else base
        try:
            new = base.replace(alpha_tau=alpha_tau, stdev_tau=stdev_tau, mu_tau=mu_tau)
        except ValueError as e:
            raise ValueError(f"{who}: {e}") from None
        nvib.identity_parameters(new, who=f"{who} ({key})")  # parameters that would overflow are refused here, before any change
        plan.append((nvib, new))
    if not plan:
        raise ValueError(f"{who}: no NV module matches site={site!r}, layers={layers!r}")
    for nvib, new in plan:
        nvib.set_knobs(**new.as_dict())
    return model


# ---------------------------------------------------------------------------------------------- priors, prediction


def estimate_prior(model: nn.Module, batches: Iterable[Any], *, forward: Callable[[nn.Module, Any], None] | None = None,
                   apply: bool = True, show_progress: bool = True) -> dict[str, Prior]:
    """Estimate the empirical prior (docs/MATH.md section 4) of every attention module of ``model``.

    Works on the original model (then pass the result to :func:`convert`) or a converted one at
    the identity (the vectors seen are then the original's).

    Args:
        model: a ``transformers`` model or a PyTorch model with (NV) multi-head attention.
        batches: an iterable of model inputs: a dict is passed as keyword arguments, a tuple or
            list as positional arguments, anything else as the single argument.
        forward: ``forward(model, batch)`` to call instead of the rule above.
        apply: on a converted model, set each module's prior (and re-apply its identity
            initialisation).
        show_progress: a progress bar (if tqdm is installed).

    Returns:
        ``{module name: Prior}``; memory is O(width) per module whatever the data size.
    """
    kind = model_kind(model, "nvformer.estimate_prior")
    estimate = estimate_hf_prior if kind == "hf" else estimate_mha_prior
    return estimate(model, batches, forward=forward, apply=apply, show_progress=show_progress)


def set_prediction(model: nn.Module, mode: str) -> nn.Module:
    """How evaluation-mode forwards predict: ``"mean"`` (deterministic: the NV posterior mean,
    or Dirichlet attention's posterior-mean weights) or ``"sample"`` (a fresh NV latent sample /
    Dirichlet weight sample per forward, without dropout: average several forwards for a Monte
    Carlo predictive). Training forwards always sample. Applies to every NV and Dirichlet
    attention module of ``model``; returns ``model``."""
    who = "nvformer.set_prediction"
    if mode not in PREDICTIONS:
        raise ValueError(f"{who}: `mode` must be one of {PREDICTIONS}, got {mode!r}")
    found = False
    for m in model.modules():
        if isinstance(m, NVIB):
            m.prediction = mode
            found = True
        elif isinstance(m, DirichletState):
            m.prediction = mode
            found = True
    if not found:
        raise ValueError(f"{who}: {type(model).__name__} has no NV or Dirichlet attention module")
    return model

"""NV adapters: save what NV adds to a model, and put it on a model the caller loaded.

An adapter folder holds two files (docs/DESIGN.md, "Adapters"):

* ``nvformer.json``: the format version, the :class:`~nvformer.NVConfig` (knobs included), and per
  converted attention module its site, layer and width, named relative to the model's base model
  (so an adapter estimated on ``AutoModel`` applies to ``AutoModelForSequenceClassification`` of
  the same checkpoint, and to any custom head around it);
* ``nvformer.safetensors``: each NVIB's prior (mean, variance, ``log_alpha``, ``s_alpha``: ``2P + 2``
  numbers), and the NVIB's parameters only when they were trained away from what the knobs and
  prior define (the identity initialisation), so an adapter is kilobytes, not a model.

:func:`load_adapter` checks everything before it changes anything: unknown or invalid values in
the JSON (a negative ``stdev_tau``, a NaN), non-finite priors, and a model whose attention modules
or widths differ from the saved ones are errors naming what differs.

:func:`save_pretrained` / :func:`load_pretrained` save and load a whole converted Hugging Face
model: an ordinary ``save_pretrained`` folder of the *original* model (any ``transformers`` code
loads it as a plain model) with the adapter files beside the weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from .api import convert, get_config, model_kind, nv_modules, site_of, unconvert
from .config import SITES, NVConfig, is_module_key
from .core.prior import Prior
from .hf.convert import is_hf_model

__all__ = ["CONFIG_FILE", "TENSORS_FILE", "load_adapter", "load_pretrained", "match_modules", "read_adapter", "read_tensors", "save_adapter",
           "save_pretrained"]

FORMAT_VERSION = 2
CONFIG_FILE = "nvformer.json"
TENSORS_FILE = "nvformer.safetensors"
_PRIOR_FIELDS = ("mean", "var", "log_alpha", "log_alpha_std")
_TOP_KEYS = {"format_version", "nvformer_version", "kind", "architecture", "config", "modules"}
_MODULE_KEYS = {"site", "layer", "dim", "shares", "trained", "head_knobs"}


def _base_prefix(model: nn.Module) -> str:
    """The module path of a Hugging Face model's base model (``"bert"`` in a ``BertFor...``), else ``""``."""
    base = getattr(model, "base_model", model)
    if base is model:
        return ""
    for name, m in model.named_modules():
        if m is base:
            return name
    return ""


def _relative(name: str, prefix: str) -> str:
    return name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else name


def _check_out_folder(folder: str | Path, who: str) -> None:
    if Path(folder).exists() and not Path(folder).is_dir():
        raise ValueError(f"{who}: {folder} exists and is not a folder")


def save_adapter(model: nn.Module, folder: str | Path) -> Path:
    """Write the NV state of a converted ``model`` to ``folder`` (created); returns the folder.

    Writes ``nvformer.json`` (configuration, knobs, modules) and ``nvformer.safetensors``
    (priors, and trained NVIB parameters if any); never the base model's weights.
    """
    from safetensors.torch import save_file

    who = "nvformer.save_adapter"
    kind = model_kind(model, who)
    _check_out_folder(folder, who)
    if not nv_modules(model):
        raise ValueError(f"{who}: {type(model).__name__} has no NV attention module (convert it first)")
    prefix = _base_prefix(model)
    config = get_config(model)
    owners: dict[int, str] = {}
    modules: dict[str, dict[str, Any]] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, m in nv_modules(model):
        info = site_of(model, name, m)
        rel = _relative(name, prefix)
        owner = owners.setdefault(id(m.nvib), rel)
        entry: dict[str, Any] = {"site": info.site, "layer": info.layer, "dim": m.nvib.dim}
        if owner != rel:
            entry["shares"] = owner
        else:
            for f in _PRIOR_FIELDS:
                tensors[f"{rel}.prior.{f}"] = getattr(m.nvib.prior, f).detach().float().contiguous().cpu()
            entry["trained"] = not m.nvib.in_identity_form()
            if m.nvib.head_knobs() is not None:
                entry["head_knobs"] = m.nvib.head_knobs()
            if entry["trained"]:
                for key, t in m.nvib.state_dict().items():
                    if not key.startswith("prior."):
                        tensors[f"{rel}.nvib.{key}"] = t.detach().contiguous().cpu()
        modules[rel] = entry
    cfg = config.to_dict()
    # group keys that are module names are stored relative to the base model too
    cfg["knobs"] = {(_relative(k, prefix) if is_module_key(k) else k): v for k, v in cfg["knobs"].items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / TENSORS_FILE))
    meta = {"format_version": FORMAT_VERSION, "nvformer_version": __version__, "kind": kind, "architecture": type(model).__name__,
            "config": cfg, "modules": modules}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return folder


def read_adapter(folder: str | Path) -> tuple[dict[str, Any], NVConfig]:
    """The checked contents of ``folder/nvformer.json``: ``(metadata, NVConfig)``."""
    who = "nvformer.load_adapter"
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{who}: {folder} has no {CONFIG_FILE} (not an NV adapter folder)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{who}: {path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{who}: {path} must hold a JSON object")
    unknown = set(meta) - _TOP_KEYS
    if unknown:
        raise ValueError(f"{who}: unknown key(s) {sorted(unknown)} in {path}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{who}: {path} has format version {meta.get('format_version')!r}; this nvformer reads version {FORMAT_VERSION}")
    if meta.get("kind") not in ("hf", "torch"):
        raise ValueError(f"{who}: {path}: `kind` must be 'hf' or 'torch', got {meta.get('kind')!r}")
    config = NVConfig.from_dict(meta.get("config", {}), f"{who}: {path}: config")
    modules = meta.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise ValueError(f"{who}: {path}: `modules` must be a non-empty mapping")
    if not isinstance(meta.get("architecture"), str):
        raise ValueError(f"{who}: {path}: `architecture` must be the model's class name, got {meta.get('architecture')!r}")
    for rel, entry in modules.items():
        if not isinstance(entry, dict) or set(entry) - _MODULE_KEYS or entry.get("site") not in SITES:
            raise ValueError(f"{who}: {path}: bad entry for module {rel!r}: {entry!r}")
        dim, layer = entry.get("dim"), entry.get("layer")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"{who}: {path}: module {rel!r} has no valid width `dim`")
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
            raise ValueError(f"{who}: {path}: module {rel!r}: `layer` must be a layer index or null, got {layer!r}")
        if not isinstance(entry.get("trained", False), bool):
            raise ValueError(f"{who}: {path}: module {rel!r}: `trained` must be true or false, got {entry['trained']!r}")
        _check_head_knobs(entry.get("head_knobs"), rel, f"{who}: {path}")
        if "shares" in entry and (not isinstance(modules.get(entry["shares"]), dict) or "shares" in modules[entry["shares"]]):
            raise ValueError(f"{who}: {path}: module {rel!r} shares the NVIB of {entry['shares']!r}, which is not a module with its own NVIB")
    return meta, config


def _check_head_knobs(value: Any, rel: str, where: str) -> None:
    """An adapter's per-head knobs of module ``rel``: absent, or ``{"alpha_tau": [...], "stdev_tau": [...]}``
    of equal non-zero length, finite numbers, ``stdev_tau >= 0``."""
    if value is None:
        return
    if not isinstance(value, dict) or set(value) != {"alpha_tau", "stdev_tau"}:
        raise ValueError(f"{where}: module {rel!r}: `head_knobs` must map alpha_tau and stdev_tau to lists, got {value!r}")
    a, s = value["alpha_tau"], value["stdev_tau"]
    ok = all(isinstance(x, list) and x and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in x)
             for x in (a, s))
    if not ok or len(a) != len(s) or any(v < 0 for v in s):
        raise ValueError(f"{where}: module {rel!r}: `head_knobs` must hold equal-length lists of finite numbers (stdev_tau >= 0)")


def _candidates(model: nn.Module, kind: str, sites: tuple[str, ...]) -> dict[str, tuple[int, int | None]]:
    """``{name: (width, key/value heads)}`` of the attention modules ``convert`` would convert at
    ``sites`` (heads: None for PyTorch modules, which take no per-head knobs)."""
    if kind == "hf":
        from .hf.convert import attention_modules

        out = {}
        for name, module, ad, site in attention_modules(model):
            if site in sites:
                k_w = ad.qkv(module)[1][0]
                out[name] = (k_w.shape[1], k_w.shape[0] // ad.head_size(module))
        return out
    from .nn.mha import torch_site

    return {name: (m.kdim, None) for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention) and torch_site(model, name) in sites}


def match_modules(model: nn.Module, meta: dict[str, Any], config: NVConfig) -> dict[str, tuple[str, int]]:
    """``{adapter name: (model name, width)}``: the attention modules of ``model`` that the adapter
    ``(meta, config)`` of :func:`read_adapter` converts, or a ``ValueError`` saying what differs
    (kind of model, module names relative to the base model, widths). ``model`` is not changed and
    may live on the meta device."""
    who = "nvformer.load_adapter"
    kind = model_kind(model, who)
    if meta["kind"] != kind:
        raise ValueError(f"{who}: the adapter was saved from a {'Hugging Face' if meta['kind'] == 'hf' else 'PyTorch'} model, "
                         f"but {type(model).__name__} is {'a Hugging Face' if kind == 'hf' else 'a PyTorch'} model")
    prefix = _base_prefix(model)
    found = _candidates(model, kind, config.sites)
    have = {_relative(name, prefix): (name, dim) for name, (dim, _) in found.items()}
    heads = {_relative(name, prefix): h for name, (_, h) in found.items()}
    saved = meta["modules"]
    if set(have) != set(saved):
        missing, extra = sorted(set(saved) - set(have)), sorted(set(have) - set(saved))
        raise ValueError(f"{who}: the model's attention modules differ from the adapter's: the adapter ({meta.get('architecture')}) has "
                         f"{missing[:3]} that {type(model).__name__} lacks, and {type(model).__name__} has {extra[:3]} that the adapter lacks")
    for rel, (_, dim) in have.items():
        if saved[rel]["dim"] != dim:
            raise ValueError(f"{who}: module {rel!r} reads vectors of width {dim}, the adapter's has width {saved[rel]['dim']}")
        per_head = saved[rel].get("head_knobs")
        if per_head is not None and len(per_head["alpha_tau"]) != heads[rel]:
            raise ValueError(f"{who}: module {rel!r}: `alpha_tau` must be a number or {heads[rel]} values (one per key/value head); "
                             f"the adapter's head_knobs have {len(per_head['alpha_tau'])}")
    return have


def read_tensors(folder: str | Path, meta: dict[str, Any]) -> tuple[dict[str, Prior], dict[str, torch.Tensor]]:
    """``({adapter name: Prior}, every tensor)`` of an adapter folder, each prior checked (present,
    finite, of the module's width, positive variances)."""
    from safetensors.torch import load_file

    who = "nvformer.load_adapter"
    path = Path(folder) / TENSORS_FILE
    if not path.is_file():
        raise ValueError(f"{who}: {folder} has no {TENSORS_FILE}")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ValueError(f"{who}: {path} is not readable ({e})") from None
    priors: dict[str, Prior] = {}
    for rel, entry in meta["modules"].items():
        if "shares" in entry:
            continue
        fields = {}
        for f in _PRIOR_FIELDS:
            t = tensors.get(f"{rel}.prior.{f}")
            if t is None or not bool(torch.isfinite(t).all()):
                raise ValueError(f"{who}: the prior `{f}` of module {rel!r} is missing or not finite")
            fields[f] = t
        try:
            priors[rel] = Prior(entry["dim"], **fields)
        except ValueError as e:
            raise ValueError(f"{who}: module {rel!r}: {e}") from None
        if entry.get("trained"):
            _check_trained(tensors, rel, entry["dim"], who)
    return priors, tensors


def _check_trained(tensors: dict[str, torch.Tensor], rel: str, dim: int, who: str) -> None:
    """The trained NVIB parameters of module ``rel`` are all present, finite and of the shapes an NVIB of width ``dim`` has."""
    shapes = {"mu_proj.weight": (dim, dim), "mu_proj.bias": (dim,), "logvar_proj.weight": (dim, dim), "logvar_proj.bias": (dim,),
              "alpha_lin": (dim,), "alpha_quad": (dim,), "alpha_bias": ()}
    for key, shape in shapes.items():
        t = tensors.get(f"{rel}.nvib.{key}")
        if t is None or tuple(t.shape) != shape or not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            got = "missing" if t is None else f"shape {tuple(t.shape)}, dtype {t.dtype}"
            raise ValueError(f"{who}: the trained NVIB parameter `{key}` of module {rel!r} must be a finite tensor of shape {shape} ({got})")


def load_adapter(model: nn.Module, folder: str | Path) -> nn.Module:
    """Convert ``model`` (loaded by the caller, any class) and restore the NV state saved in ``folder``.

    In place; returns ``model``. The model must not be converted yet, and its attention modules
    (names relative to the base model) and widths must be those the adapter was saved from
    (:func:`match_modules`); everything is checked before the model changes.
    """
    who = "nvformer.load_adapter"
    meta, config = read_adapter(folder)
    have = match_modules(model, meta, config)
    if nv_modules(model):
        raise ValueError(f"{who}: {type(model).__name__} is already converted (nvformer.unconvert it first)")
    priors, tensors = read_tensors(folder, meta)
    full = {rel: name for rel, (name, _) in have.items()}
    knobs = {full.get(k, k): v for k, v in config.knobs.items()}
    convert(model, config.with_knobs(knobs), prior={full[rel]: p for rel, p in priors.items()})
    for rel, entry in meta["modules"].items():
        if entry.get("head_knobs") is not None:
            nvib = model.get_submodule(full[rel]).nvib
            try:
                nvib.set_head_knobs(**entry["head_knobs"])
            except ValueError as e:
                unconvert(model)
                raise ValueError(f"{who}: module {rel!r}: {e}") from None
        if entry.get("trained"):
            nvib = model.get_submodule(full[rel]).nvib
            state = {k[len(rel) + 6:]: v for k, v in tensors.items() if k.startswith(f"{rel}.nvib.")}
            state.update({f"prior.{f}": v for f, v in priors[rel].state_dict().items()})
            nvib.load_state_dict(state)
    return model


# ---------------------------------------------------------------------------------------------- whole models


def save_pretrained(model: nn.Module, folder: str | Path, **kwargs: Any) -> Path:
    """Save a converted model to ``folder``: the base model (``kwargs`` go to ``model.save_pretrained``) and its adapter."""
    if not is_hf_model(model):
        raise ValueError("nvformer.save_pretrained: expected a Hugging Face model converted with nvformer.convert")
    _check_out_folder(folder, "nvformer.save_pretrained")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base_state = {k: v for k, v in model.state_dict().items() if ".nvib." not in f".{k}"}
    save_adapter(model, folder)  # checks that the model is converted before anything big is written
    model.save_pretrained(folder, state_dict=base_state, **kwargs)
    return folder


def load_pretrained(folder: str | Path, model_class: type | None = None, **kwargs: Any) -> nn.Module:
    """Load a model saved by :func:`save_pretrained`; ``kwargs`` go to ``from_pretrained``.

    ``model_class`` defaults to the ``transformers`` class named in ``nvformer.json``, which must be
    a ``transformers.PreTrainedModel`` subclass (any other name is refused). The adapter files are
    read and checked first; the weights are read from ``model.safetensors`` only (never a pickle:
    ``use_safetensors=True`` unless ``kwargs`` say otherwise). Every failure is a ``ValueError``
    naming the folder and what is wrong with it.
    """
    who = "nvformer.load_pretrained"
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise ValueError(f"{who}: {folder} has no {CONFIG_FILE} (not saved by nvformer.save_pretrained)")
    try:
        meta, _ = read_adapter(folder)
        read_tensors(folder, meta)
    except ValueError as e:
        raise ValueError(f"{who}: {str(e).split(': ', 1)[-1]}") from None
    if meta["kind"] != "hf":
        raise ValueError(f"{who}: {folder} holds the adapter of a PyTorch model ({meta['architecture']}), not a Hugging Face model; "
                         "build the model and use nvformer.load_adapter")
    if model_class is None:
        model_class = _architecture(meta["architecture"], folder, who)
    elif not callable(getattr(model_class, "from_pretrained", None)):
        raise ValueError(f"{who}: `model_class` must be a transformers model class (with from_pretrained), got {model_class!r}")
    kwargs.setdefault("use_safetensors", True)
    if kwargs["use_safetensors"] and not any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        raise ValueError(f"{who}: {folder} has no model.safetensors (the weights save_pretrained writes)")
    try:
        model = model_class.from_pretrained(folder, **kwargs)
    except Exception as e:  # transformers and safetensors raise many types for a damaged folder
        message = " ".join(str(e).split())
        raise ValueError(f"{who}: cannot load {getattr(model_class, '__name__', model_class)} from {folder} ({type(e).__name__}: {message})") from e
    return load_adapter(model, folder)


def _architecture(name: str, folder: Path, who: str) -> type:
    """The ``transformers.PreTrainedModel`` subclass called ``name``, or a ``ValueError``."""
    import transformers

    cls = None
    if name.isidentifier() and not name.startswith("_"):
        try:
            cls = getattr(transformers, name, None)
        except Exception:  # a lazily imported class whose backend is missing
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{who}: {folder / CONFIG_FILE}: architecture {name!r} is not a transformers model class "
                         "(a PreTrainedModel subclass); pass `model_class`")
    return cls

"""Save and load converted Hugging Face models (weights, priors, knobs).

A saved folder is an ordinary ``save_pretrained`` folder of the *original* model (so any
``transformers`` code can load it as a plain model) plus two files:

* ``nvformer.json``: version, architecture, sites, formula, and per NV module its site, layer,
  knobs and :class:`~nvformer.NVIB` settings (a shared cross-attention NVIB is stored once,
  under its first owner);
* ``nvformer.safetensors``: every NVIB's parameters and prior buffers.

:func:`load_pretrained` rebuilds the model class named in the folder, converts it and restores
the NV state exactly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .convert import convert, is_hf_model, nv_modules

FORMAT_VERSION = 1
_NVIB_SETTINGS = ("delta", "kappa", "mu_tau", "stdev_tau", "alpha_tau", "prior_component", "alpha_threshold", "threshold_mode", "min_var")


def save_pretrained(model: nn.Module, folder: str | Path, **kwargs: Any) -> Path:
    """Save a converted model to ``folder``; ``kwargs`` go to ``model.save_pretrained``."""
    from safetensors.torch import save_file

    if not is_hf_model(model) or not hasattr(model, "_nvformer"):
        raise ValueError("nvformer.save_pretrained: expected a Hugging Face model converted with nvformer.convert")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base_state = {k: v for k, v in model.state_dict().items() if ".nvib." not in f".{k}"}
    model.save_pretrained(folder, state_dict=base_state, **kwargs)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    owners: dict[int, str] = {}
    for name, m in nv_modules(model):
        nvib = m.nvib
        owner = owners.setdefault(id(nvib), name)
        modules[name] = {"site": m._nv_site, "layer": m._nv_layer, "nvib": owner}
        if owner == name:
            modules[name]["settings"] = {k: getattr(nvib, k) for k in _NVIB_SETTINGS}
            for key, t in nvib.state_dict().items():
                tensors[f"{name}.nvib.{key}"] = t.detach().contiguous().cpu()
    save_file(tensors, str(folder / "nvformer.safetensors"))
    meta = {
        "format_version": FORMAT_VERSION,
        "architecture": type(model).__name__,
        "sites": model._nvformer["sites"],
        "formula": model._nvformer["formula"],
        "modules": modules,
    }
    (folder / "nvformer.json").write_text(json.dumps(meta, indent=2))
    return folder


def load_pretrained(folder: str | Path, model_class: type | None = None, **kwargs: Any) -> nn.Module:
    """Load a model saved by :func:`save_pretrained`; ``kwargs`` go to ``from_pretrained``.

    ``model_class`` defaults to the ``transformers`` class named in ``nvformer.json``.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path = folder / "nvformer.json"
    if not meta_path.exists():
        raise ValueError(f"nvformer.load_pretrained: {folder} has no nvformer.json (not saved by nvformer.save_pretrained)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"nvformer.load_pretrained: unsupported format version {meta.get('format_version')}")
    if model_class is None:
        import transformers

        model_class = getattr(transformers, meta["architecture"])
    model = model_class.from_pretrained(folder, **kwargs)
    convert(model, sites=meta["sites"], formula=meta["formula"])
    tensors = load_file(str(folder / "nvformer.safetensors"))
    found = dict(nv_modules(model))
    missing = set(meta["modules"]) ^ set(found)
    if missing:
        raise ValueError(f"nvformer.load_pretrained: NV modules differ from the saved ones: {sorted(missing)[:5]}")
    for name, info in meta["modules"].items():
        if info["nvib"] != name:
            continue
        nvib = found[name].nvib
        for key, value in info["settings"].items():
            setattr(nvib, key, value)
        prefix = f"{name}.nvib."
        state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        nvib.load_state_dict(state)
    return model

"""Save and load whole converted Hugging Face models (weights, priors, knobs).

A saved folder is an ordinary ``save_pretrained`` folder of the *original* model (so any
``transformers`` code can load it as a plain model) plus an NV adapter
(:func:`nvformer.save_adapter`: ``nvformer.json`` and ``nvformer.safetensors``).
:func:`load_pretrained` loads the base model with ``from_pretrained`` and puts the adapter on it.
To apply NV settings to a model you already hold, use :func:`nvformer.load_adapter` instead.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..adapter import CONFIG_FILE, load_adapter, save_adapter
from .convert import is_hf_model

__all__ = ["load_pretrained", "save_pretrained"]


def save_pretrained(model: nn.Module, folder: str | Path, **kwargs: Any) -> Path:
    """Save a converted model to ``folder``: the base model (``kwargs`` go to ``model.save_pretrained``) and its adapter."""
    if not is_hf_model(model):
        raise ValueError("nvformer.save_pretrained: expected a Hugging Face model converted with nvformer.convert")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base_state = {k: v for k, v in model.state_dict().items() if ".nvib." not in f".{k}"}
    save_adapter(model, folder)  # checks that the model is converted before anything big is written
    model.save_pretrained(folder, state_dict=base_state, **kwargs)
    return folder


def load_pretrained(folder: str | Path, model_class: type | None = None, **kwargs: Any) -> nn.Module:
    """Load a model saved by :func:`save_pretrained`; ``kwargs`` go to ``from_pretrained``.

    ``model_class`` defaults to the ``transformers`` class named in ``nvformer.json``.
    """
    folder = Path(folder)
    meta_path = folder / CONFIG_FILE
    if not meta_path.exists():
        raise ValueError(f"nvformer.load_pretrained: {folder} has no {CONFIG_FILE} (not saved by nvformer.save_pretrained)")
    if model_class is None:
        import transformers

        name = json.loads(meta_path.read_text()).get("architecture")
        model_class = getattr(transformers, str(name), None)
        if model_class is None:
            raise ValueError(f"nvformer.load_pretrained: transformers has no class {name!r}; pass `model_class`")
    return load_adapter(model_class.from_pretrained(folder, **kwargs), folder)

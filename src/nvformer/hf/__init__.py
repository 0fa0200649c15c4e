"""Hugging Face ``transformers`` integration: convert pretrained models to NV models.

``convert`` / ``set_knobs`` / ``get_knobs`` / ``estimate_hf_prior`` need no import of
transformers; :mod:`nvformer.hf.io` (save/load) and :mod:`nvformer.hf.checkpoints` do.
"""

from .adapters import ADAPTERS, supported_classes
from .convert import SITES, attention_modules, convert, estimate_hf_prior, get_knobs, nv_modules, set_knobs

__all__ = ["ADAPTERS", "SITES", "attention_modules", "convert", "estimate_hf_prior", "get_knobs", "nv_modules", "set_knobs", "supported_classes"]

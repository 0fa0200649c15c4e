"""Results caches of the studies as safetensors files: nested dicts of tensors plus JSON metadata.

Never a pickle: reading a cache runs no code, and a float tensor round-trips bit for bit (the
file stores its raw bytes), so numbers recomputed from a cache are those of the run that wrote it.
Nested dict keys are joined with ``/`` in the file and split again on reading, in the order they
were written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["load_meta", "load_tensors", "save_tensors"]

SEP = "/"
_META, _ORDER = "json", "order"


def save_tensors(path: str | Path, tensors: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> None:
    """Write ``tensors`` (a dict whose leaves are tensors, nested to any depth; keys are non-empty
    strings without ``/``) and the JSON-serialisable ``meta`` to the safetensors file ``path``."""
    from safetensors.torch import save_file

    flat: dict[str, Tensor] = {}

    def walk(prefix: str, node: Mapping[str, Any]) -> None:
        for key, value in node.items():
            if not isinstance(key, str) or not key or SEP in key:
                raise ValueError(f"save_tensors: keys must be non-empty strings without {SEP!r}, got {key!r}")
            name = f"{prefix}{SEP}{key}" if prefix else key
            if isinstance(value, Tensor):
                flat[name] = value.detach().cpu().clone(memory_format=torch.contiguous_format)  # no shared storage
            elif isinstance(value, Mapping):
                walk(name, value)
            else:
                raise ValueError(f"save_tensors: {name!r} is a {type(value).__name__}; leaves must be tensors (put the rest in `meta`)")

    walk("", tensors)
    save_file(flat, str(path), metadata={_META: json.dumps(dict(meta or {})), _ORDER: json.dumps(list(flat))})


def _unreadable(path: str | Path, e: Exception) -> ValueError:
    return ValueError(f"{path}: not a readable results file ({type(e).__name__}: {' '.join(str(e).split())}); delete it to recompute")


def load_meta(path: str | Path) -> dict[str, Any]:
    """The ``meta`` that :func:`save_tensors` wrote to ``path``, from the file's header alone (no tensor
    is read); a damaged or foreign file is a ``ValueError`` naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})[_META])
    except Exception as e:
        raise _unreadable(path, e) from None


def load_tensors(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(tensors, meta)`` as :func:`save_tensors` wrote them; a damaged or foreign file is a
    ``ValueError`` naming it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            meta = json.loads(header[_META])
            nested: dict[str, Any] = {}
            for name in json.loads(header[_ORDER]):
                node = nested
                *parents, leaf = name.split(SEP)
                for p in parents:
                    node = node.setdefault(p, {})
                node[leaf] = f.get_tensor(name)
    except Exception as e:  # safetensors, JSON and key errors alike: the file is not one of ours
        raise _unreadable(path, e) from None
    return nested, meta

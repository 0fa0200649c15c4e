"""Reused per-thread scratch buffers for large temporaries that never leave the function using them.

On CPU every fresh tensor of a few megabytes is a fresh memory mapping, and its page faults can cost
as much as the arithmetic done on it (measured: docs/PERFORMANCE.md). Functions whose temporaries
do not escape (the Gamma sampler's proposals, the extended query/key/value buffers of one SDPA call
without gradients) take them from here instead. CUDA's caching allocator already reuses memory, so
off the CPU nothing is kept.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["scratch", "release", "held_bytes", "MAX_BYTES"]

MAX_BYTES = 64 << 20  # per thread, user and dtype: larger requests get None (fresh tensors)
_local = threading.local()


def scratch(name: str, shapes: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device | str) -> list[Tensor] | None:
    """Contiguous tensors of ``shapes``, views of one buffer kept per thread, ``name`` (the user) and ``dtype``,
    reused from call to call: their contents are garbage, and the next call with the same name on the same
    thread overwrites them, so nothing the caller returns or saves for a backward may live in them.

    Returns None off the CPU, for empty requests, and above :data:`MAX_BYTES` in all.
    """
    sizes = [math.prod(s) for s in shapes]
    total = sum(sizes)
    if torch.device(device).type != "cpu" or total == 0 or total * dtype.itemsize > MAX_BYTES:
        return None
    store = _local.__dict__.setdefault("buffers", {})
    buf = store.get((name, dtype))
    if buf is None or buf.numel() < total:
        buf = store[(name, dtype)] = torch.empty(total, dtype=dtype, device="cpu")
    out, start = [], 0
    for shape, n in zip(shapes, sizes):
        out.append(buf[start : start + n].view(tuple(shape)))
        start += n
    return out


def held_bytes() -> int:
    """Bytes of scratch memory the calling thread holds."""
    return sum(b.numel() * b.element_size() for b in _local.__dict__.get("buffers", {}).values())


def release() -> None:
    """Free the calling thread's scratch buffers (e.g. after a long batch job, before other work in the same
    thread); the next :func:`scratch` call allocates anew. Tensors a caller still holds keep their memory."""
    _local.__dict__.pop("buffers", None)

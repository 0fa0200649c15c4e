"""Argument checks shared by the public functions: clear ``ValueError`` s naming the argument."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_tensor(t: Tensor, name: str, dims: int | tuple[int, ...], where: str, expected: str) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{where}: `{name}` must be a torch.Tensor of shape {expected}, got {type(t).__name__}")
    allowed = (dims,) if isinstance(dims, int) else dims
    if t.dim() not in allowed:
        raise ValueError(f"{where}: `{name}` must have shape {expected}, got {tuple(t.shape)}")


def check_float(t: Tensor, name: str, where: str) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{where}: `{name}` must be a floating-point tensor, got dtype {t.dtype}")


def check_mask(mask: Tensor, name: str, shape: tuple[int, ...], where: str, allow_float: bool = True) -> None:
    """A mask must be bool (True = masked out) or, if allowed, floating (additive)."""
    ok = mask.dtype == torch.bool or (allow_float and mask.is_floating_point())
    if not ok:
        kinds = "bool (True = masked out) or floating-point (additive)" if allow_float else "bool (True = pad)"
        raise ValueError(f"{where}: `{name}` must be {kinds}, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{where}: `{name}` must have shape {list(shape)}, got {list(mask.shape)}")


def check_knob(value: float, name: str, where: str, minimum: float | None = None) -> float:
    """``value`` as a finite float (at least ``minimum``), or a ``ValueError`` naming it."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: knob `{name}` must be a real number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: knob `{name}` must be a real number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{where}: knob `{name}` must be finite, got {v}")
    if minimum is not None and v < minimum:
        raise ValueError(f"{where}: knob `{name}` must be >= {minimum}, got {v}")
    return v


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the maths runs in: the input's, but at least float32."""
    return torch.promote_types(dtype, torch.float32)

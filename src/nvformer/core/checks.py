"""Argument checks shared by the public functions: clear ``ValueError`` s naming the argument."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

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


def check_real(value: float, name: str, where: str, *, minimum: float | None = None, above: float | None = None,
               maximum: float | None = None, what: str = "") -> float:
    """``value`` as a finite float within the given bounds (``minimum <= value``, ``above < value``,
    ``value <= maximum``), or a one-line ``ValueError`` naming it (``what`` is a prefix such as
    ``"knob "``). bool, strings and NaN are refused."""
    label = f"{where}: {what}`{name}`"
    if isinstance(value, bool):
        raise ValueError(f"{label} must be a real number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{label} must be a real number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{label} must be finite, got {v}")
    for bound, ok, sign in ((minimum, lambda b: v >= b, ">="), (above, lambda b: v > b, ">"), (maximum, lambda b: v <= b, "<=")):
        if bound is not None and not ok(bound):
            raise ValueError(f"{label} must be {sign} {bound}, got {v}")
    return v


def check_knob(value: float, name: str, where: str, minimum: float | None = None) -> float:
    """``value`` as a finite float (at least ``minimum``), or a ``ValueError`` naming the knob."""
    return check_real(value, name, where, minimum=minimum, what="knob ")


def check_int(value: int, name: str, where: str, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum`` (bool and floats refused), or a ``ValueError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{where}: `{name}` must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_heads(embed_dim: int, num_heads: int, where: str) -> None:
    """``embed_dim`` and ``num_heads`` positive ints, ``embed_dim`` divisible by ``num_heads``."""
    check_int(embed_dim, "embed_dim", where)
    check_int(num_heads, "num_heads", where)
    if embed_dim % num_heads:
        raise ValueError(f"{where}: `embed_dim` ({embed_dim}) must be divisible by `num_heads` ({num_heads})")


def check_dropout(value: float, where: str) -> float:
    """A ``dropout`` probability in ``[0, 1)`` (as ``nn.MultiheadAttention`` takes it), or a ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{where}: `dropout` must be in [0, 1), got {value!r}")
    return float(value)


def check_choice(value: object, name: str, where: str, choices: tuple) -> None:
    """``value`` is one of ``choices``, or a ``ValueError`` naming the argument and the choices."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{where}: `{name}` must be one of {choices}, got {value!r}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the maths runs in: the input's, but at least float32."""
    return torch.promote_types(dtype, torch.float32)


def at_least_float32(fn):
    """``fn`` (a ``Module._apply`` conversion) that never narrows a floating tensor below float32.

    The device (and any widening, e.g. to float64) follows ``fn``; where ``fn`` would give a
    16-bit float, the tensor keeps its values in float32 on the new device, with no round trip
    through the narrow dtype.
    """

    def apply(t: torch.Tensor) -> torch.Tensor:
        out = fn(t)
        if t.is_floating_point() and out.is_floating_point() and compute_dtype(out.dtype) != out.dtype:
            return t.to(device=out.device, dtype=compute_dtype(out.dtype))
        return out

    return apply


def check_mapping(d: Any, allowed: Iterable[str], where: str, what: str = "field") -> dict[str, Any]:
    """``dict(d)`` for a mapping whose keys are all in ``allowed`` (the fields of a config read
    from a file), or a ``ValueError`` naming the unknown ones."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a mapping of {what}s, got {type(d).__name__}")
    allowed = list(allowed)
    unknown = set(d) - set(allowed)
    if unknown:
        raise ValueError(f"{where}: unknown {what}(s) {sorted(unknown)}; {what}s are {sorted(allowed)}")
    return dict(d)

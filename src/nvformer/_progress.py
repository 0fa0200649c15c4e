"""Progress bars on long work: tqdm when it is installed (the core depends on torch only)."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["progress"]


def progress(iterable: Iterable, desc: str, enabled: bool = True, total: int | None = None) -> Iterable:
    """Wrap ``iterable`` in a tqdm progress bar when tqdm is installed and ``enabled``."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc=desc, total=total, leave=False)

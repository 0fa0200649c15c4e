"""The plots of the studies and the docs (matplotlib, Agg backend, nothing shown): one set-up
(:func:`pyplot`) and one way of writing a figure (:func:`save`) for every figure, and two shared
panel plots.

The panel functions take plain numbers (no tensors) and write one PNG; they return its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["interval_panels", "line_panels", "pyplot", "save"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Lay out ``fig``, write it to ``path`` (parents created) and close it; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def interval_panels(panels: Mapping[str, Mapping[str, Sequence[tuple[str, float, float, float]]]], path: str | Path, *,
                    xlabel: str, reference: float = 0.0, width: float = 4.6) -> Path:
    """Dot-and-interval panels: one panel per key of ``panels``; inside a panel one colour per
    series (``{series: [(row label, value, low, high), ...]}``), rows on the y axis.

    A vertical line marks ``reference`` (e.g. 0 for a difference, 1 for a ratio). Rows of
    different series that share a label are drawn side by side.
    """
    if not panels:
        raise ValueError("interval_panels: nothing to plot")
    for name, series in panels.items():
        for s, rows in series.items():
            for label, v, lo, hi in rows:
                if not lo <= v <= hi:
                    raise ValueError(f"interval_panels: {name}/{s}/{label}: value {v} outside its interval [{lo}, {hi}]")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 0.45 * max(
        len({r[0] for rows in series.values() for r in rows}) for series in panels.values()) + 1.4), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        labels = list(dict.fromkeys(r[0] for rows in series.values() for r in rows))
        k = len(series)
        for j, (s, rows) in enumerate(series.items()):
            y = [labels.index(r[0]) + (j - (k - 1) / 2) * 0.22 for r in rows]
            ax.errorbar([r[1] for r in rows], y, xerr=[[r[1] - r[2] for r in rows], [r[3] - r[1] for r in rows]],
                        fmt="o", ms=4, capsize=3, label=s)
        ax.axvline(reference, color="grey", lw=0.8)
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.set(xlabel=xlabel, title=name)
        if k > 1:
            ax.legend(fontsize=7)
    return save(fig, path)


def line_panels(panels: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]], path: str | Path, *,
                xlabel: str, ylabel: str, width: float = 4.2, diagonal: bool = False) -> Path:
    """Line panels: one panel per key, one line per series ``{series: (xs, ys)}``;
    ``diagonal`` adds the y = x line (reliability diagrams)."""
    if not panels:
        raise ValueError("line_panels: nothing to plot")
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.4), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        for s, (xs, ys) in series.items():
            if len(xs) != len(ys):
                raise ValueError(f"line_panels: {name}/{s}: {len(xs)} x but {len(ys)} y values")
            ax.plot(xs, ys, "o-", ms=3, label=s)
        if diagonal:
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=name)
        ax.legend(fontsize=7)
    return save(fig, path)

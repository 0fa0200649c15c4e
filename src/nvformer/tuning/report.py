"""The outcome of a knob search, and what it leaves on disk: ``trials.csv``, ``best.json`` and two plots."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TuneResult", "write_outputs"]


@dataclass
class TuneResult:
    """The outcome of :func:`tune`: the best knobs and value, and every trial."""

    best_params: dict[str, float]
    best_value: float
    identity_value: float | None
    trials: list[dict[str, Any]] = field(default_factory=list)
    best_report: dict[str, Any] | None = None
    study_name: str = ""
    storage: str = ""
    direction: str = "maximize"


def write_outputs(result: TuneResult, out: Path) -> None:
    """``trials.csv``, ``best.json``, ``history.png`` and ``knobs.png`` (the plots need matplotlib, part of ``nvformer[hf]``)."""
    out.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for t in result.trials:
        keys += [k for k in t if k not in keys]
    with open(out / "trials.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(result.trials)
    (out / "best.json").write_text(json.dumps({
        "best_params": result.best_params, "best_value": result.best_value, "identity_value": result.identity_value,
        "best_report": result.best_report, "study_name": result.study_name, "storage": result.storage,
        "n_trials": len(result.trials),
    }, indent=2, default=str))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import warnings

        warnings.warn("nvformer.tune: matplotlib is not installed (pip install 'nvformer[hf]'); no plots written", stacklevel=2)
        return
    done = [t for t in result.trials if t["state"] == "COMPLETE"]
    if not done:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([t["number"] for t in done], [t["value"] for t in done], "o", ms=3, label="trial")
    pick = max if result.direction == "maximize" else min
    best_so_far, best = [], None
    for t in done:
        best = t["value"] if best is None else pick(best, t["value"])
        best_so_far.append(best)
    ax.plot([t["number"] for t in done], best_so_far, "-", label="best so far")
    ax.set(xlabel="trial", ylabel="objective", title="optimisation history")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "history.png", dpi=110)
    plt.close(fig)
    knobs = [k for k in keys if "/" in k]
    fig, axes = plt.subplots(1, len(knobs), figsize=(3.2 * len(knobs), 3.0), squeeze=False)
    for ax, k in zip(axes[0], knobs):
        ax.plot([t[k] for t in done], [t["value"] for t in done], "o", ms=3)
        ax.set(xlabel=k, ylabel="objective")
    fig.tight_layout()
    fig.savefig(out / "knobs.png", dpi=110)
    plt.close(fig)

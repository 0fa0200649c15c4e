"""The outcome of a knob search, and what it leaves on disk: ``trials.csv``, ``best.json`` and two plots.

Every trial of the study is reported with its Optuna state: COMPLETE (evaluated), PRUNED (the
objective was not finite), FAIL (its worker died, the objective raised, or it was skipped as a
repeated point: the ``note`` says which), RUNNING (another worker evaluates it now) or WAITING.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .shared import DIED, DUPLICATE, ERROR, NOTE, OWNER, RETRY_OF

__all__ = ["TuneResult", "trial_rows", "write_outputs"]


@dataclass
class TuneResult:
    """The outcome of :func:`tune`: the best knobs and value, and every trial of the study.

    ``trials``: one dict per trial, by number: ``number``, ``state``, ``value`` (None unless
    COMPLETE), every ``"{group}/{knob}"`` parameter, ``worker`` (``host:pid``), ``retry_of`` (the
    dead trial whose point it re-runs) and ``note`` (why a trial is not COMPLETE). ``best_number``:
    the best trial's number (the earliest of equal values). ``space``: the search space the study
    recorded. ``n_complete`` / ``states`` count the trials by state.
    """

    best_params: dict[str, float]
    best_value: float
    identity_value: float | None
    trials: list[dict[str, Any]] = field(default_factory=list)
    best_report: dict[str, Any] | None = None
    study_name: str = ""
    storage: str = ""
    direction: str = "maximize"
    best_number: int | None = None
    space: str = ""

    @property
    def states(self) -> dict[str, int]:
        """``{state: number of trials}`` (COMPLETE, PRUNED, FAIL, RUNNING, WAITING; those present)."""
        return dict(Counter(t["state"] for t in self.trials))

    @property
    def n_complete(self) -> int:
        """The number of COMPLETE trials."""
        return self.states.get("COMPLETE", 0)


def _note(t) -> str:
    attrs, state = t.system_attrs, t.state.name
    if ERROR in attrs:
        return f"objective raised {attrs[ERROR]}"
    if DIED in attrs:
        return f"died: {attrs[DIED]}"
    if DUPLICATE in attrs:
        return f"not evaluated: {attrs[DUPLICATE]}"
    if NOTE in attrs:
        return str(attrs[NOTE])
    if state == "FAIL":
        return "died: its worker's heartbeat stopped"
    if state == "RUNNING":
        return "running"
    return "queued" if state == "WAITING" else ""


def trial_rows(frozen: list) -> list[dict[str, Any]]:
    """:attr:`TuneResult.trials` from Optuna ``FrozenTrial`` s (see there)."""
    rows = []
    for t in sorted(frozen, key=lambda t: t.number):
        owner = t.system_attrs.get(OWNER)
        rows.append({"number": t.number, "state": t.state.name, "value": t.value if t.state.name == "COMPLETE" else None,
                     **t.params, "worker": f"{owner['host']}:{owner['pid']}" if owner else None,
                     "retry_of": t.user_attrs.get(RETRY_OF), "note": _note(t)})
    return rows


def _replace(path: Path, write) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``: readers and other workers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_outputs(result: TuneResult, out: Path) -> None:
    """``trials.csv``, ``best.json``, ``history.png`` and ``knobs.png`` (the plots need matplotlib, part of ``nvformer[hf]``)."""
    out.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for t in result.trials:
        keys += [k for k in t if k not in keys]
    keys = [k for k in keys if k not in ("worker", "retry_of", "note")] + ["worker", "retry_of", "note"]
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    w.writerows(result.trials)
    _replace(out / "trials.csv", lambda p: p.write_text(text.getvalue()))
    best = {
        "best_params": result.best_params, "best_value": result.best_value, "best_number": result.best_number,
        "identity_value": result.identity_value, "best_report": result.best_report, "study_name": result.study_name,
        "storage": result.storage, "space": result.space, "n_trials": result.n_complete, "states": result.states,
    }
    _replace(out / "best.json", lambda p: p.write_text(json.dumps(best, indent=2, default=str)))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import warnings

        warnings.warn("nvformer.tune: matplotlib is not installed (pip install 'nvformer[hf]'); no plots written", stacklevel=2)
        return
    done = [t for t in result.trials if t["state"] == "COMPLETE"]
    knobs = [k for k in keys if "/" in k]
    if not done or not knobs:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([t["number"] for t in done], [t["value"] for t in done], "o", ms=3, label="trial")
    pick = max if result.direction == "maximize" else min
    best_so_far, top = [], None
    for t in done:
        top = t["value"] if top is None else pick(top, t["value"])
        best_so_far.append(top)
    ax.plot([t["number"] for t in done], best_so_far, "-", label="best so far")
    ax.set(xlabel="trial", ylabel="objective", title="optimisation history")
    ax.legend()
    fig.tight_layout()
    _replace(out / "history.png", lambda p: fig.savefig(p, dpi=110))
    plt.close(fig)
    fig, axes = plt.subplots(1, len(knobs), figsize=(3.2 * len(knobs), 3.0), squeeze=False)
    for ax, k in zip(axes[0], knobs):
        ax.plot([t[k] for t in done], [t["value"] for t in done], "o", ms=3)
        ax.set(xlabel=k, ylabel="objective")
    fig.tight_layout()
    _replace(out / "knobs.png", lambda p: fig.savefig(p, dpi=110))
    plt.close(fig)

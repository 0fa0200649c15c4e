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

__all__ = ["TuneResult", "trial_rows", "write_fit_outputs", "write_outputs"]


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
    plt = _pyplot("nvformer.tune")
    if plt is None:
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


def _pyplot(who: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import warnings

        warnings.warn(f"{who}: matplotlib is not installed (pip install 'nvformer[hf]'); no plots written", stacklevel=3)
        return None
    return plt


def write_fit_outputs(result, out: Path) -> None:
    """``fit.json`` (the :class:`~nvformer.tuning.fit.FitResult`), ``fit_history.png`` (training and
    validation objective against the step) and ``fitted_knobs.png`` (per group: ``alpha_tau * s_alpha``
    in nats and ``stdev_tau``, with the ``mu_tau`` values in the title when they moved)."""
    out.mkdir(parents=True, exist_ok=True)
    _replace(out / "fit.json", lambda p: p.write_text(json.dumps(result.to_dict(), indent=2)))
    plt = _pyplot("nvformer.fit_knobs")
    if plt is None or not result.history:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    steps = [r["step"] for r in result.history]
    ax.plot(steps, [r["train"] for r in result.history], "o-", ms=3, label="training (mean since last point)")
    if result.initial_value is not None:
        ax.plot([0, *steps], [result.initial_value, *(r["validation"] for r in result.history)], "s-", ms=3, label="held out")
        ax.axvline(result.best_step, color="grey", lw=0.8, ls=":", label=f"kept (step {result.best_step})")
    ax.set(xlabel="step", ylabel="objective (minimised)", title="fitting the knobs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    _replace(out / "fit_history.png", lambda p: fig.savefig(p, dpi=110))
    plt.close(fig)
    keys = list(result.knobs)
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 0.45 * len(keys) + 3), 3.2))
    axes[0].bar(range(len(keys)), [result.nats[k] for k in keys])
    axes[0].set(ylabel="alpha_tau * s_alpha (nats)", title="token pseudo-count shift")
    axes[1].bar(range(len(keys)), [result.knobs[k].stdev_tau for k in keys])
    axes[1].set(ylabel="stdev_tau", title="token standard deviation")
    for ax in axes:
        ax.set_xticks(range(len(keys)), keys, rotation=60, fontsize=7)
    mus = {k: v.mu_tau for k, v in result.knobs.items() if v.mu_tau != 1.0}
    if mus:
        fig.suptitle("mu_tau: " + ", ".join(f"{k} {v:.3g}" for k, v in mus.items()), fontsize=7)
    fig.tight_layout()
    _replace(out / "fitted_knobs.png", lambda p: fig.savefig(p, dpi=110))
    plt.close(fig)

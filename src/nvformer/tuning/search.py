"""Post-training regularisation search: choose the NV knobs with Optuna (forward passes only).

``tune(model, objective, ...)`` samples ``alpha_tau`` / ``stdev_tau`` (optionally ``mu_tau``) per
group of a :class:`~nvformer.tuning.space.KnobSpace` of a converted model, applies them with
:func:`nvformer.set_knobs`, and maximises (or minimises) ``objective(model)``, e.g. accuracy on a
target validation split. The first trial is always the identity-like corner of the space (largest
``alpha_tau``, ``stdev_tau = 0``, ``mu_tau = 1``), so the search can only match or beat that
corner on the objective; it is the unregularised model when the top of the ``alpha_tau`` range is
large for the model's ``s_alpha`` (10 is for MiniLM's priors, not for SmolLM2's: docs/MATH.md
section 4). Studies live in an Optuna storage: an SQLite file by
default (resumable), or any Optuna RDB URL / storage object (PostgreSQL, journal file), which lets
several worker processes or machines share one study. Optuna is imported on first use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..api import nv_modules
from .report import TuneResult, write_outputs
from .space import KnobSpace, apply_knobs

__all__ = ["TuneResult", "tune"]


def _storage(storage, out_dir: Path | None):
    if storage is None:
        if out_dir is None:
            return None, "in-memory"
        out_dir.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(out_dir / 'study.db').resolve()}"
        return url, url
    return storage, storage if isinstance(storage, str) else type(storage).__name__


def tune(
    model: nn.Module,
    objective: Callable[[nn.Module], float],
    *,
    space: KnobSpace = KnobSpace(),
    n_trials: int = 50,
    direction: str = "maximize",
    storage: Any = None,
    study_name: str = "nvformer",
    seed: int = 0,
    sampler: str = "tpe",
    out_dir: str | Path | None = None,
    report: Callable[[nn.Module], dict[str, Any]] | None = None,
    show_progress: bool = True,
) -> TuneResult:
    """Search the knobs of a converted model with Optuna; the model is left at the best knobs.

    Args:
        model: a model converted with :func:`nvformer.convert` (or :func:`nvformer.convert_mha`).
        objective: ``objective(model) -> float`` (run it under ``torch.no_grad`` inside; e.g.
            accuracy on the target validation split).
        space: the :class:`KnobSpace`.
        n_trials: the total number of finished trials the study should have (a resumed study
            only runs the missing ones).
        direction: ``"maximize"`` or ``"minimize"``.
        storage: None (SQLite file ``out_dir/study.db``, or in memory without ``out_dir``), an
            Optuna RDB URL, or an Optuna storage object (e.g. journal storage) shared by workers.
        study_name: the study's name in the storage.
        seed: seeds the sampler (each worker of a shared study should use its own seed).
        sampler: ``"tpe"`` or ``"random"`` (the authors' random search).
        out_dir: where ``trials.csv``, ``best.json`` and the plots go (None: nothing written).
        report: ``report(model) -> dict`` computed once for the best knobs (e.g. the target test
            metrics of the same configuration).
        show_progress: Optuna's progress bar.
    """
    import optuna

    if direction not in ("maximize", "minimize"):
        raise ValueError(f"tune: `direction` must be 'maximize' or 'minimize', got {direction!r}")
    if n_trials < 1:
        raise ValueError(f"tune: `n_trials` must be >= 1, got {n_trials}")
    if not nv_modules(model):
        raise ValueError(f"tune: {type(model).__name__} has no NV attention module (convert it first)")
    groups = space.groups(model)
    out = Path(out_dir) if out_dir is not None else None
    store, store_name = _storage(storage, out)
    if sampler == "tpe":
        smp = optuna.samplers.TPESampler(seed=seed)
    elif sampler == "random":
        smp = optuna.samplers.RandomSampler(seed=seed)
    else:
        raise ValueError(f"tune: `sampler` must be 'tpe' or 'random', got {sampler!r}")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=study_name, storage=store, sampler=smp, direction=direction, load_if_exists=True)
    identity = {f"{g}/{k}": v for g, *_ in groups for k, v in space.identity().items()}
    if not any(t.params == identity for t in study.get_trials(deepcopy=False)):
        study.enqueue_trial(identity, skip_if_exists=True)

    def run(trial: "optuna.Trial") -> float:
        params = {}
        for g, *_ in groups:
            params[f"{g}/alpha_tau"] = trial.suggest_float(f"{g}/alpha_tau", *space.alpha_tau, log=space.log_alpha)
            params[f"{g}/stdev_tau"] = trial.suggest_float(f"{g}/stdev_tau", *space.stdev_tau)
            if space.mu_tau is not None:
                params[f"{g}/mu_tau"] = trial.suggest_float(f"{g}/mu_tau", *space.mu_tau)
        apply_knobs(model, space, params)
        value = float(objective(model))
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"objective returned {value}")
        return value

    complete = (optuna.trial.TrialState.COMPLETE,)
    done = len(study.get_trials(deepcopy=False, states=complete))
    if n_trials - done > 0:
        # the callback stops every worker of a shared study once it has n_trials finished trials
        study.optimize(run, n_trials=n_trials - done, show_progress_bar=show_progress,
                       callbacks=[optuna.study.MaxTrialsCallback(n_trials, states=complete)])
    best = study.best_trial
    apply_knobs(model, space, best.params)
    trials = [
        {"number": t.number, "value": t.value, "state": t.state.name, **t.params}
        for t in study.get_trials(deepcopy=False)
    ]
    id_values = [t["value"] for t in trials if t["state"] == "COMPLETE" and {k: t.get(k) for k in identity} == identity]
    result = TuneResult(
        best_params=dict(best.params), best_value=float(best.value), identity_value=id_values[0] if id_values else None,
        trials=trials, best_report=report(model) if report is not None else None, study_name=study_name, storage=store_name,
        direction=direction,
    )
    if out is not None:
        write_outputs(result, out)
    return result

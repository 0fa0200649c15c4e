"""Post-training regularisation search: choose the NV knobs with Optuna (forward passes only).

``tune(model, objective, ...)`` samples ``alpha_tau`` / ``stdev_tau`` (optionally ``mu_tau``) per
group of a :class:`~nvformer.tuning.space.KnobSpace` of a converted model, applies them with
:func:`nvformer.set_knobs`, and maximises (or minimises) ``objective(model)``, e.g. accuracy on a
target validation split. The identity-like corner of the space (largest ``alpha_tau``,
``stdev_tau = 0``, ``mu_tau = 1``) is always evaluated, first, so the search can only match or
beat that corner on the objective; it is the unregularised model when the top of the
``alpha_tau`` range is large for the model's ``s_alpha`` (10 is for MiniLM's priors, not for
SmolLM2's: docs/MATH.md section 4).

Studies live in an Optuna storage: an SQLite file by default (resumable), or any Optuna RDB URL /
storage object (PostgreSQL, journal file), which lets several worker processes or machines share
one study. How workers share it, and what happens to trials of a worker that dies, is in
:mod:`nvformer.tuning.shared`. Optuna is imported on first use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..api import get_knobs, nv_modules, set_knobs
from .report import TuneResult, trial_rows, write_outputs
from .shared import SharedStudy, key, run_seed, sleep_poll
from .space import KnobSpace, apply_knobs

__all__ = ["TuneResult", "tune"]


def _sampler(sampler: str, seed: int):
    import optuna

    return optuna.samplers.TPESampler(seed=seed) if sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed)


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
            accuracy on the target validation split). A non-finite value prunes the trial; an
            exception fails it (FAIL, with the error) and is raised, the model back at its knobs.
        space: the :class:`KnobSpace`; every site it names must have NV modules in ``model``.
            The study records it: resuming a study with another space is a ``ValueError``.
        n_trials: the number of evaluated trials (COMPLETE, plus PRUNED ones) the study should
            have. A resumed or shared study only runs the missing ones; trials of dead workers
            are failed and their points re-run; the identity corner runs even past ``n_trials``
            if the study never evaluated it.
        direction: ``"maximize"`` or ``"minimize"`` (must be the study's on a resume).
        storage: None (SQLite file ``out_dir/study.db``, or in memory without ``out_dir``), an
            Optuna RDB URL (opened with a heartbeat), or an Optuna storage object (e.g. journal
            storage) shared by workers.
        study_name: the study's name in the storage (a new name starts a new study).
        seed: seeds the sampler of a new study (each worker of a shared study should use its own
            seed); a resumed study is sampled from a seed derived from ``seed`` and its number of
            trials, so it never replays earlier draws.
        sampler: ``"tpe"`` or ``"random"`` (the authors' random search).
        out_dir: where ``trials.csv``, ``best.json`` and the plots go (None: nothing written).
        report: ``report(model) -> dict`` computed once, with the model at the best knobs (e.g.
            the target test metrics of the same configuration).
        show_progress: a progress bar of this call's trials (tqdm).

    Returns:
        :class:`TuneResult`: best knobs and value, every trial of the study with its state
        (:mod:`nvformer.tuning.report`). After the call every group of ``space`` has the knobs of
        ``best_params`` and the other NV modules the knobs they had before.
    """
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"tune: `direction` must be 'maximize' or 'minimize', got {direction!r}")
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"tune: `n_trials` must be an int >= 1, got {n_trials!r}")
    if sampler not in ("tpe", "random"):
        raise ValueError(f"tune: `sampler` must be 'tpe' or 'random', got {sampler!r}")
    if not nv_modules(model):
        raise ValueError(f"tune: {type(model).__name__} has no NV attention module (convert it first)")
    space.check(model, "tune")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ranges = space.ranges(model)
    distributions = {name: optuna.distributions.FloatDistribution(low, high, log=log) for name, (low, high, log) in ranges.items()}
    identity = space.identity_params(model)
    record = {"params": {k: list(v) for k, v in ranges.items()}, "space": f"{space!r} (parameters {', '.join(ranges)})"}
    out = Path(out_dir) if out_dir is not None else None
    shared = SharedStudy.open(storage, out, study_name, direction, record)
    before = get_knobs(model)
    try:
        shared.study.sampler = _sampler(sampler, run_seed(seed, shared.n_at_open))
        _search(shared, model, objective, space, n_trials, identity, distributions, show_progress, before)
        with shared.lock:
            frozen = shared.study.get_trials(deepcopy=False)
    finally:
        shared.close()
    done = [t for t in frozen if t.state.name == "COMPLETE"]
    if not done:
        set_knobs(model, before)
        raise ValueError(f"tune: study {study_name!r} in {shared.storage_name} has no COMPLETE trial "
                         f"({len(frozen)} trials: the objective was never finite, or other workers still run them)")
    top = (max if direction == "maximize" else min)(t.value for t in done)
    best = next(t for t in done if t.value == top)  # the earliest of equal values (the identity wins ties)
    apply_knobs(model, space, best.params)
    id_values = [t.value for t in done if key(t.params) == key(identity)]
    result = TuneResult(
        best_params=dict(best.params), best_value=float(best.value), identity_value=id_values[0] if id_values else None,
        trials=trial_rows(frozen), best_report=report(model) if report is not None else None, study_name=study_name,
        storage=shared.storage_name, direction=direction, best_number=best.number, space=record["space"],
    )
    if out is not None:
        write_outputs(result, out)
    return result


def _search(shared: SharedStudy, model: nn.Module, objective, space: KnobSpace, n_trials: int, identity: dict[str, float],
            distributions: dict[str, Any], show_progress: bool, before: dict) -> None:
    """Start and evaluate trials until the study has ``n_trials`` evaluated ones (and the
    identity), waiting for other workers' running trials to finish or be found dead.
    ``before``: the model's knobs (:func:`nvformer.get_knobs`), restored if the objective raises."""
    bar = None
    try:
        while True:
            with shared.lock:
                trials = shared.maintain(identity)
                if show_progress and bar is None:
                    from tqdm.auto import tqdm

                    bar = tqdm(desc="nvformer.tune", unit="trial", total=n_trials, initial=min(trials.evaluated, n_trials))
                trial = shared.start(trials, n_trials, identity, distributions)
                other = None if trial is None else shared.duplicate_of(trial, trials)
                if other is not None:
                    shared.skip(trial, other)
                    shared.study.sampler.reseed_rng()  # another worker draws from the same seed
                    continue
                if trial is None and not shared.waits_for(trials):
                    return
            if trial is None:
                sleep_poll()
                continue
            _evaluate(shared, trial, model, objective, space, before)
            if bar is not None:
                bar.update()
    finally:
        if bar is not None:
            bar.close()


def _evaluate(shared: SharedStudy, trial, model: nn.Module, objective, space: KnobSpace, before) -> None:
    """Apply the trial's knobs, run the objective and tell the study (an error restores ``before`` and is raised)."""
    try:
        with shared.heartbeat(trial):
            apply_knobs(model, space, trial.params)
            value = float(objective(model))
    except Exception as e:
        with shared.lock:
            shared.finish(trial, error=" ".join(f"{type(e).__name__}: {e}".split())[:500])
        set_knobs(model, before)
        raise
    except BaseException as e:  # KeyboardInterrupt, SystemExit: the point was not evaluated, re-run it on resume
        with shared.lock:
            shared.finish(trial, died=f"interrupted ({type(e).__name__})")
        set_knobs(model, before)
        raise
    with shared.lock:
        if math.isfinite(value):
            told = shared.finish(trial, value)
        else:
            told = shared.finish(trial, pruned=f"objective returned {value}")
    if not told:
        import warnings

        warnings.warn(f"nvformer.tune: trial {trial.number} was failed by another worker that took it for dead; "
                      "its value is not recorded", stacklevel=3)

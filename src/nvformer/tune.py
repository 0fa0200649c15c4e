"""Post-training regularisation search: choose the NV knobs with Optuna (forward passes only).

``tune(model, objective, ...)`` samples ``alpha_tau`` / ``stdev_tau`` (optionally ``mu_tau``) per
site (and optionally per layer) of a converted model, applies them with
:func:`nvformer.set_knobs`, and maximises (or minimises) ``objective(model)``, e.g. accuracy on a
target validation split. The first trial is always the identity-like corner (largest
``alpha_tau``, ``stdev_tau = 0``, ``mu_tau = 1``), so the search can only match or beat the
unregularised model on the objective. Studies live in an Optuna storage: an SQLite file by
default (resumable), or any Optuna RDB URL / storage object (PostgreSQL, journal file), which lets
several worker processes or machines share one study.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .hf.convert import SITES, get_knobs, nv_modules, set_knobs

__all__ = ["KnobSpace", "TuneResult", "tune", "apply_knobs"]


@dataclass(frozen=True)
class KnobSpace:
    """Search space of the knobs.

    Args:
        sites: sites tuned separately (each gets its own knobs); None = one setting for all sites.
        per_layer: also separate knobs per layer within each site (the cross site is one NVIB).
        alpha_tau, stdev_tau: ``(low, high)`` ranges (the authors searched ``[-15, 10]`` and
            ``[0, 0.5]``).
        mu_tau: a range to search, or None to keep ``mu_tau = 1``.
        log_alpha: sample ``alpha_tau`` on a log scale (the range must then be positive); for
            models whose pseudo-count scale ``s_alpha`` is small (SmolLM2: identity needs
            ``alpha_tau`` ~ 1000, yet ``alpha_tau`` ~ 10 already moves the outputs).
        layers: tune only these layer indices (the others keep their knobs); with
            ``per_layer=False`` they share one setting. The cross site has no layers and is
            skipped when ``layers`` is given.
    """

    sites: tuple[str, ...] | None = None
    per_layer: bool = False
    alpha_tau: tuple[float, float] = (-15.0, 10.0)
    stdev_tau: tuple[float, float] = (0.0, 0.5)
    mu_tau: tuple[float, float] | None = None
    layers: tuple[int, ...] | None = None
    log_alpha: bool = False

    def __post_init__(self) -> None:
        for name in ("alpha_tau", "stdev_tau", "mu_tau"):
            r = getattr(self, name)
            if r is not None and not (len(r) == 2 and math.isfinite(r[0]) and math.isfinite(r[1]) and r[0] <= r[1]):
                raise ValueError(f"KnobSpace: `{name}` must be a finite (low, high) pair with low <= high, got {r!r}")
        if self.log_alpha and self.alpha_tau[0] <= 0:
            raise ValueError(f"KnobSpace: a log-scale `alpha_tau` range must be positive, got {self.alpha_tau}")
        if self.stdev_tau[0] < 0:
            raise ValueError(f"KnobSpace: `stdev_tau` must be >= 0, got {self.stdev_tau}")
        if self.sites is not None and not set(self.sites) <= set(SITES):
            raise ValueError(f"KnobSpace: unknown site(s) in {self.sites}; sites are {SITES}")
        if self.layers is not None and (not self.layers or any(not isinstance(i, int) or i < 0 for i in self.layers)):
            raise ValueError(f"KnobSpace: `layers` must be a non-empty tuple of layer indices, got {self.layers!r}")

    def groups(self, model: nn.Module) -> list[tuple[str, str | None, int | None]]:
        """``(group name, site, layer)`` of every group of modules that shares one knob setting."""
        present = []
        for _, m in nv_modules(model):
            site = getattr(m, "_nv_site", None)
            if site not in present:
                present.append(site)
        sites = [s for s in (self.sites or []) if s in present]
        if self.layers is not None:
            return self._layer_groups(model, sites if self.sites is not None else [s for s in present if s != "cross"])
        if self.sites is None:
            if not self.per_layer:
                return [("all", None, None)]
            sites = present
        out = []
        for site in sites:
            layers = sorted({k["layer"] for k in get_knobs(model).values() if k["site"] == site and k["layer"] is not None})
            if self.per_layer and site != "cross" and layers:
                out += [(f"{site}.{layer}", site, layer) for layer in layers]
            else:
                out.append((str(site), site, None))
        return out

    def _layer_groups(self, model: nn.Module, sites: list) -> list[tuple[str, str | None, Any]]:
        out = []
        for site in sites:
            have = {k["layer"] for k in get_knobs(model).values() if k["site"] == site and k["layer"] is not None}
            missing = set(self.layers) - have
            if missing:
                raise ValueError(f"KnobSpace: site {site!r} has no layer(s) {sorted(missing)} (it has {sorted(have)})")
            if self.per_layer:
                out += [(f"{site}.{layer}", site, layer) for layer in self.layers]
            else:
                out.append((f"{site}.{'+'.join(map(str, self.layers))}", site, tuple(self.layers)))
        return out

    def identity(self) -> dict[str, float]:
        knobs = {"alpha_tau": self.alpha_tau[1], "stdev_tau": self.stdev_tau[0]}
        if self.mu_tau is not None:
            knobs["mu_tau"] = min(max(1.0, self.mu_tau[0]), self.mu_tau[1])
        return knobs


def apply_knobs(model: nn.Module, space: KnobSpace, params: dict[str, float]) -> None:
    """Set the knobs ``params`` (``"{group}/{knob}"`` names, as in the study) on ``model``."""
    for group, site, layer in space.groups(model):
        knobs = {k: params[f"{group}/{k}"] for k in ("alpha_tau", "stdev_tau", "mu_tau") if f"{group}/{k}" in params}
        set_knobs(model, site=site, layers=layer, **knobs)


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


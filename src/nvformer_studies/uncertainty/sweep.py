"""The tau sweep of the Bayesian attention study (issue 17): with which learning rate of the
Dirichlet concentration scales ``tau`` and which prior concentration ``prior_tau`` does a learnt
attention posterior help, chosen on books validation data.

In the recorded study ``tau`` trained at the network's learning rate (5e-5) and stayed at its
initial 10. Here it gets an AdamW group of its own (``variational_lr``, no weight decay:
:func:`nvformer_studies.common.finetune.parameter_groups`). Grid (:func:`sweep_grid`):
``variational_lr`` in :data:`VARIATIONAL_LRS` (1e-3, 1e-2, 1e-1) x ``prior_tau`` in
:data:`PRIOR_TAUS` (10: the prior the posterior starts at; 3: broader, the KL then pulls ``tau``
down), ``tau`` starting at 10 everywhere, and the reference :data:`REFERENCE`: the study's
Dirichlet model (``tau`` at the network's learning rate, ``prior_tau`` 10). One seed (the study's
first); every point is a Dirichlet model fine-tuned exactly as the study's (same data, settings
and run folders, so the study reuses the reference and the chosen point for that seed),
evaluated on the study's books validation reviews
(:func:`~nvformer_studies.uncertainty.data.validation_data`): accuracy, NLL and ECE of the
posterior-mean and of the sampled predictive, the sampled predictive's mean mutual information,
and the learnt ``tau`` of every layer. No test data is read.

Choice (:data:`CRITERION`): the smallest validation NLL of the sampled predictive among the points
with a learning rate of their own (the reference is reported, not a candidate: the study already
has that model). Each point is cached in its run folder (``sweep-eval.json``), so parts of the
grid can run in parallel processes; a call that covers the whole grid writes the choice to
``out/sweep.json``, which :func:`~nvformer_studies.uncertainty.study.read_choice` reads.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from nvformer import metrics

from .data import validation_data
from .harness import predictive_probs
from .study import FIXED, dirichlet_name, fit, learnt_tau, settings, settings_json

__all__ = ["CRITERION", "PRIOR_TAUS", "REFERENCE", "VARIATIONAL_LRS", "evaluate_point", "run_tau_sweep", "sweep_grid"]

VARIATIONAL_LRS = (1e-3, 1e-2, 1e-1)
PRIOR_TAUS = (10.0, 3.0)
REFERENCE = (FIXED["variational_lr"], FIXED["prior_tau"])  # (None, 10): tau at the network's learning rate, the recorded run
CRITERION = "nll_sample"  # books validation NLL of the sampled predictive (lower is better)
STUDY_KEYS = ("finetune", "n_train", "n_val", "samples")  # the study settings a choice depends on (read_choice checks them)


def sweep_grid(smoke: bool) -> list[tuple[float | None, float]]:
    """The ``(variational_lr, prior_tau)`` points of the sweep, the reference first, then by prior and
    learning rate; ``smoke``: the reference and the largest learning rate with each prior."""
    lrs = VARIATIONAL_LRS[-1:] if smoke else VARIATIONAL_LRS
    return [REFERENCE] + [(lr, pt) for pt in PRIOR_TAUS for lr in lrs]


def evaluate_point(model, val, samples: int, seed: int) -> dict[str, float]:
    """Validation metrics of a Dirichlet model: ``{accuracy, nll, ece}_{mean, sample}`` of the
    posterior-mean and the sampled (``samples`` forwards, seeded) predictive, and ``mi_sample``,
    the mean mutual information of the sampled one."""
    out = {}
    for kind in ("mean", "sample"):
        probs = predictive_probs(f"dirichlet-{kind}", [model], val, samples, seed)
        out |= {f"{k}_{kind}": v for k, v in metrics.uncertainty_metrics(probs, val.labels).items() if k != "brier"}
    return out | {"mi_sample": float(metrics.mutual_information(probs).mean())}


def _point(out: Path, st: dict, val, variational_lr: float | None, prior_tau: float, quiet: bool) -> dict:
    """One grid point: fine-tune (or load) its model, evaluate it (or read the cached evaluation)."""
    seed = st["seeds"][0]
    posterior = {"variational_lr": variational_lr, "prior_tau": prior_tau}
    folder = out / f"{dirichlet_name(**posterior)}-s{seed}"
    key = {k: settings_json(st)[k] for k in STUDY_KEYS} | {"seed": seed}
    cache = folder / "sweep-eval.json"
    t0 = time.time()
    model, _, info = fit(out, st, seed, posterior, quiet=quiet)
    saved = json.loads(cache.read_text()) if cache.exists() else None
    if saved and saved["key"] == key and saved["point"]["train_loss"] == info["train_loss"]:  # the same settings and the same model
        return saved["point"]
    point = {**posterior, "name": folder.name, **evaluate_point(model, val, st["samples"], seed), "tau": learnt_tau(folder),
             "val_accuracy": info["val_accuracy"], "train_loss": info["train_loss"], "best_epoch": info["best_epoch"],
             "seconds": time.time() - t0}
    cache.write_text(json.dumps({"key": key, "point": point}, indent=2))
    return point


def run_tau_sweep(out: Path, *, smoke: bool = False, variational_lrs=None, prior_taus=None, quiet: bool = False) -> dict | None:
    """The sweep (module docstring) of the grid points (:func:`sweep_grid`) with a learning rate in
    ``variational_lrs`` (None in it: the reference) and a prior in ``prior_taus`` (default: all).
    Returns and writes ``out/sweep.json`` (the study settings it ran with, the grid, every point
    and the choice) when the call covers the whole grid; else caches the points it ran and returns None."""
    st = settings(smoke)
    grid = sweep_grid(smoke)
    lrs, priors = {lr for lr, _ in grid}, {pt for _, pt in grid}
    unknown = [x for x in variational_lrs or () if x not in lrs] + [x for x in prior_taus or () if x not in priors]
    if unknown:
        raise ValueError(f"run_tau_sweep: {unknown} not in the grid {grid} (learning rate None: the network's)")
    todo = [(lr, pt) for lr, pt in grid if (variational_lrs is None or lr in variational_lrs) and (prior_taus is None or pt in prior_taus)]
    val = validation_data(st["finetune"].max_length, st["n_val"])
    points = [_point(out, st, val, lr, pt, quiet) for lr, pt in todo]
    if todo != grid:
        print(f"sweep points {[p['name'] for p in points]} done; run --sweep without --tau-lrs / --prior-taus to choose")
        return None
    learnt = [p for p in points if p["variational_lr"] is not None]
    best = min(learnt, key=lambda p: p[CRITERION])
    sweep = {"study": {k: settings_json(st)[k] for k in STUDY_KEYS}, "seed": st["seeds"][0], "smoke": smoke,
             "grid": [list(x) for x in grid], "criterion": CRITERION, "points": points,
             "choice": {"variational_lr": best["variational_lr"], "prior_tau": best["prior_tau"]}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(sweep, indent=2))
    return sweep

"""Bayesian attention and uncertainty (issues 8 and 17): Dirichlet attention vs MAP, MC dropout, NV
sampling, a deep ensemble, each with and without temperature scaling, on reviews with domain shift
and on text that is not a review (docs/RESULTS.md section "bayes"; text:
:mod:`nvformer_studies.uncertainty.report`; the methods: :mod:`nvformer_studies.uncertainty.harness`;
the data: :mod:`nvformer_studies.uncertainty.data`; the choice of the learnt posterior:
:mod:`nvformer_studies.uncertainty.sweep`).

Model: all-MiniLM-L6-v2 + classification head fine-tuned on ``books`` (train split of
``domain_splits('books', 0)``; 2 epochs, batch 16, AdamW 5e-5, reviews truncated to 128 tokens to fit
the CPU budget), standard attention (MAP) or Dirichlet attention in all 6 layers (``DirichletSpec``
defaults: softmax concentration, tau 10 (learnable, per layer, at the network's learning rate),
prior centred on the deterministic attention), for seeds 0, 1, 2; per seed also a deep ensemble of
that seed's MAP model and two more (``ensemble_seeds``). With a learnt posterior (``posterior``:
the choice of the tau sweep), a third Dirichlet model per seed whose concentration scales have a
learning rate of their own and whose prior has the chosen ``prior_tau`` (rows ``..., learnt tau``).
Evaluation: ``n_eval`` reviews (seed 0) of the test split of each of the seven domains (books
in-domain; dvd, electronics, kitchen, airline, imdb, blog near out of distribution) and ``n_eval``
texts of each far-OOD source (WikiText-2, koran, law, medical, it); Monte Carlo methods average
``samples`` forwards. Temperature scaling and the NV ``stdev_tau`` are fitted on the books
validation split. OOD detection: books test (negatives) vs each other set (positives), by
``1 - max p``, predictive entropy, mutual information (Monte Carlo methods) and, for the MAP model,
the energy score (AUROC, AUPR, FPR at 95% TPR: :func:`nvformer.metrics.ood_detection`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from torch import Tensor

from nvformer import DirichletSpec, metrics

from ..common.data import REVIEW_DOMAINS
from ..common.finetune import FinetuneConfig
from ..common.tensorfiles import load_tensors, save_tensors
from .data import FAR_OOD, SOURCE, TARGETS, evaluation_data
from .harness import METHODS, apply_temperature, finetune_variant, predictive_logits, sampled_nv

__all__ = ["BROAD", "BROAD_FIT", "BROAD_SPEC", "FIXED", "LEARNT", "POSTERIORS", "SCORES", "SOURCE", "TARGETS", "D",
           "detection", "dirichlet_name", "ensemble_seeds", "fit", "learnt_tau", "read_choice", "read_seed_cache",
           "run_bayes_study", "seed_run", "settings", "settings_json", "uncertainty_scores", "write_seed_cache"]

NV_GRID = (0.05, 0.1, 0.2)
POSTERIORS = ("learnt", "fixed")  # with the tau sweep's choice (rows "..., learnt tau") or without (the recorded run's methods)
SCORES = ("maxp", "entropy", "mi", "energy")  # OOD-detection scores: 1 - max p, entropy, mutual information, energy (MAP logits)


def settings(smoke: bool, posterior: dict | None = None) -> dict:
    """The study's sizes: the docs/RESULTS.md budget, or a tiny end-to-end check (``smoke``);
    ``posterior``: the learnt posterior (``{"variational_lr", "prior_tau"}``, :func:`read_choice`) or
    None (no learnt-tau rows)."""
    if smoke:
        st = {"seeds": [0], "finetune": FinetuneConfig(epochs=1, max_length=32, batch_size=16), "n_eval": 24, "n_val": 24, "samples": 2,
              "n_train": 48, "nv_grid": (0.1,), "ensemble_size": 2, "broad_prior_seed": 0}
    else:
        st = {"seeds": [0, 1, 2], "finetune": FinetuneConfig(epochs=2, max_length=128, batch_size=16), "n_eval": 200, "n_val": 200,
              "samples": 4, "n_train": None, "nv_grid": NV_GRID, "ensemble_size": 3, "broad_prior_seed": 1}
    return st | {"far_ood": list(FAR_OOD), "posterior": posterior}


BROAD = "dirichlet-mean, broad prior"  # the pathology: BROAD_SPEC, one seed
BROAD_SPEC = DirichletSpec(prior_tau=1.0)
D = DirichletSpec()  # the defaults the main Dirichlet rows use
FIXED = {"variational_lr": None, "prior_tau": D.prior_tau}  # the main Dirichlet rows' model (fit): tau at the network's learning rate
BROAD_FIT = {"variational_lr": None, "prior_tau": BROAD_SPEC.prior_tau}
LEARNT = ", learnt tau"  # suffix of the rows of the learnt posterior: "dirichlet-mean, learnt tau", "dirichlet-sample, learnt tau"


def ensemble_seeds(seed: int, size: int) -> list[int]:
    """Training seeds of the ensemble reported under ``seed``: the MAP model of ``seed`` and
    ``size - 1`` extra members of their own (seeds ``100 + (size - 1) seed + j``), so that the
    ensembles of different seeds share no member."""
    return [seed] + [100 + (size - 1) * seed + j for j in range(size - 1)]


def dirichlet_name(variational_lr: float | None, prior_tau: float) -> str:
    """The run-folder stem (seed appended: ``-s0``) of a Dirichlet model with ``DirichletSpec(prior_tau=prior_tau)``
    and the concentration scales' learning rate ``variational_lr`` (None: the network's):
    ``dirichlet`` (the defaults), ``dirichlet-prior1`` (the broad prior), ``dirichlet-vlr0.01-prior3``."""
    if variational_lr is None:
        return "dirichlet" + ("" if prior_tau == D.prior_tau else f"-prior{prior_tau:g}")
    return f"dirichlet-vlr{variational_lr:g}-prior{prior_tau:g}"


def fit(out: Path, st: dict, seed: int, dirichlet: dict | None = None, *, quiet: bool = False):
    """``(model, tokenizer, info)``: the study's fine-tuned model (:func:`finetune_variant`), cached in
    ``out/map-s{seed}`` (standard attention, ``dirichlet`` None) or ``out/{dirichlet_name(...)}-s{seed}``
    (Dirichlet attention with ``dirichlet = {"variational_lr", "prior_tau"}``: ``DirichletSpec(prior_tau=...)``,
    tau starting at 10, trained at ``variational_lr``; :data:`FIXED` is the recorded run's model)."""
    if dirichlet is None:
        return finetune_variant(out / f"map-s{seed}", "standard", seed, st["finetune"], n_train=st["n_train"], show_progress=not quiet)
    return finetune_variant(out / f"{dirichlet_name(**dirichlet)}-s{seed}", "dirichlet", seed, st["finetune"],
                            DirichletSpec(prior_tau=dirichlet["prior_tau"]), n_train=st["n_train"], show_progress=not quiet,
                            variational_lr=dirichlet["variational_lr"])


def settings_json(st: dict) -> dict:
    """The settings as JSON (the fine-tuning config as a dict, tuples as lists); the seed caches' key."""
    return {k: (v.__dict__ if k == "finetune" else list(v) if isinstance(v, tuple) else v) for k, v in st.items()}


def seed_run(seed: int, st: dict, out: Path, data, *, quiet: bool = False, train_only: bool = False) -> dict | None:
    """Every method's predictive logits for one seed (``{row: {split: [S, N, C]}}``, float64; the
    probabilities are their softmax), with the training summaries and the NV choice; cached in
    ``out/logits-s{seed}.safetensors`` (the logits bit-exact, the rest as JSON metadata) while the
    settings match. Models are fine-tuned (or loaded from ``out``) in the recorded run's order, and
    every method's draws are seeded per set, so rows of unchanged settings reproduce the recorded ones."""
    cache = out / f"logits-s{seed}.safetensors"
    key = json.dumps(settings_json(st), sort_keys=True)
    saved = read_seed_cache(cache, key)
    if saved is not None:
        return saved
    sets, val, prior_batches = data
    t0 = time.time()
    # every (row, split) is kept in a partial cache as soon as it is computed: an interrupted run resumes where it
    # stopped, with the same numbers (each predictive call is seeded on its own)
    partial_path = out / f"partial-s{seed}.safetensors"
    partial = {"key": key, "logits": {}} if train_only else (read_seed_cache(partial_path, key) or {"key": key, "logits": {}})
    before = partial.get("seconds", 0.0)  # the seconds of earlier, interrupted runs of this seed (up to their last kept result)

    def remember(row: str, split: str, compute) -> Tensor:
        got = partial["logits"].get(row, {}).get(split)
        if got is None:
            got = compute()
            partial["logits"].setdefault(row, {})[split] = got
            partial["seconds"] = before + time.time() - t0
            out.mkdir(parents=True, exist_ok=True)
            write_seed_cache(partial_path, partial)
        return got

    def evaluate_all(method: str, models, row: str | None = None) -> dict[str, Tensor]:
        return {d: remember(row or method, d, lambda x=x: predictive_logits(method, models, x, st["samples"], seed))
                for d, x in [("validation", val), *sets.items()]}

    (map_model, _, map_info), (dir_model, _, dir_info) = fit(out, st, seed, quiet=quiet), fit(out, st, seed, FIXED, quiet=quiet)
    members = [map_model] + [fit(out, st, x, quiet=quiet)[0] for x in ensemble_seeds(seed, st["ensemble_size"])[1:]]
    broad = fit(out, st, seed, BROAD_FIT, quiet=quiet) if seed == st["broad_prior_seed"] else None
    learnt = fit(out, st, seed, st["posterior"], quiet=quiet) if st["posterior"] else None
    trained = {"map": map_info, dirichlet_name(**FIXED): dir_info} | ({dirichlet_name(**BROAD_FIT): broad[2]} if broad else {}) | (
        {dirichlet_name(**st["posterior"]): learnt[2]} if learnt else {})  # run-folder stem -> training summary
    if train_only:
        return None
    logits = {"map": evaluate_all("map", [map_model]), "mc-dropout": evaluate_all("mc-dropout", [map_model])}
    # the ensemble's first member is the MAP model (deterministic, no draws): its logits are the "map" row's
    rest = members[1:]
    logits["ensemble"] = {d: remember("ensemble", d, lambda d=d, x=x, rest=rest: torch.cat([logits["map"][d], predictive_logits("ensemble", rest, x, st["samples"], seed)]))
                          for d, x in [("validation", val), *sets.items()]}
    logits["dirichlet-mean"] = evaluate_all("dirichlet-mean", [dir_model])
    logits["dirichlet-sample"] = evaluate_all("dirichlet-sample", [dir_model])
    if broad is not None:
        logits[BROAD] = evaluate_all("dirichlet-mean", [broad[0]], BROAD)
    if learnt is not None:
        for method in ("dirichlet-mean", "dirichlet-sample"):
            logits[method + LEARNT] = evaluate_all(method, [learnt[0]], method + LEARNT)
    del members, rest, dir_model, broad, learnt
    # NV sampling on the MAP model: stdev_tau by source validation NLL
    best = None
    for s in st["nv_grid"]:
        m = sampled_nv(fit(out, st, seed, quiet=quiet)[0], prior_batches, s)
        probs = remember(f"nv-grid-{s:g}", "validation", lambda m=m: predictive_logits("nv-sample", [m], val, st["samples"], seed)).softmax(-1)
        nll = metrics.uncertainty_metrics(probs, val.labels)["nll"]
        if best is None or nll < best[1]:
            best = (s, nll, m)
    logits["nv-sample"] = evaluate_all("nv-sample", [best[2]])
    saved = {"key": key, "logits": logits, "seconds": before + time.time() - t0, "nv_choice": {"stdev_tau": best[0], "val_nll": best[1]},
             "train": {f"{k}-s{seed}": {f: i[f] for f in ("train_loss", "val_accuracy", "best_epoch")} for k, i in trained.items()}}
    out.mkdir(parents=True, exist_ok=True)
    write_seed_cache(cache, saved)
    partial_path.unlink(missing_ok=True)
    return saved


def write_seed_cache(path: Path, saved: dict) -> None:
    """Write one seed's run (:func:`seed_run`): the predictive logits as safetensors (bit-exact), the rest as JSON metadata."""
    save_tensors(path, {"logits": saved["logits"]}, {k: v for k, v in saved.items() if k != "logits"})


def read_seed_cache(path: Path, key: str) -> dict | None:
    """The run :func:`write_seed_cache` wrote to ``path``, or None if there is none or its settings ``key`` differs."""
    if not path.exists():
        return None
    tensors, saved = load_tensors(path)
    return {**saved, "logits": tensors.get("logits", {})} if saved.get("key") == key else None


def read_choice(out: Path, st: dict) -> dict:
    """The learnt posterior ``{"variational_lr", "prior_tau"}`` chosen by the tau sweep
    (:func:`nvformer_studies.uncertainty.sweep.run_tau_sweep`, ``out/sweep.json``), with the sweep's
    summary under ``"sweep"``; an error if there is none, or if the sweep ran with other
    fine-tuning or validation settings than ``st``."""
    path = out / "sweep.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no tau sweep; run experiments/bayes_study.py --sweep first (with the same --smoke and --out), "
                                "or --posterior fixed")
    sweep = json.loads(path.read_text())
    mine = {k: settings_json(st)[k] for k in sweep["study"]}
    if sweep["study"] != mine:
        raise ValueError(f"{path}: the sweep ran with other settings ({sweep['study']}) than this study ({mine}); rerun --sweep")
    return {**sweep["choice"], "sweep": sweep}


def uncertainty_scores(probs: Tensor, logits: Tensor | None = None) -> dict[str, Tensor]:
    """``{score: [N]}`` per example of predictive samples ``probs [S, N, C]`` (higher = more
    uncertain): ``maxp`` (``1 - max p``) and ``entropy`` of the mean predictive, ``mi`` (mutual
    information) when there are several samples, and ``energy`` of ``logits [1, N, C]`` if given
    (the MAP model)."""
    scores = {"maxp": metrics.max_prob_score(probs), "entropy": metrics.predictive_entropy(probs)}
    if probs.shape[0] > 1:
        scores["mi"] = metrics.mutual_information(probs)
    if logits is not None:
        scores["energy"] = metrics.energy_score(logits[0])
    return scores


def detection(scores: dict[str, dict[str, Tensor]], source: str = SOURCE) -> dict[str, dict[str, dict[str, float]]]:
    """``{score: {set: {"auroc", "aupr", "fpr95"}}}``: every score's OOD detection of each set
    against ``source`` (:func:`nvformer.metrics.ood_detection`), from ``{set: {score: [N]}}``."""
    return {k: {d: metrics.ood_detection(scores[source][k], sc[k]) for d, sc in scores.items() if d != source} for k in scores[source]}


def run_bayes_study(out: Path, *, smoke: bool = False, seeds: list[int] | None = None, quiet: bool = False,
                    train_only: bool = False, posterior: str = "learnt") -> dict | None:
    """Every seed's run (:func:`seed_run`; ``seeds``: only these, cached for a later aggregation),
    then the metrics of every method with and without temperature scaling, aggregated into
    ``out/results.json``; returns the results (None if only some seeds ran, or with ``train_only``).

    ``posterior``: ``"learnt"`` adds the rows of the posterior the tau sweep chose
    (:func:`read_choice`; run the sweep first), ``"fixed"`` leaves them out (the recorded run's methods).
    """
    if posterior not in POSTERIORS:
        raise ValueError(f"run_bayes_study: `posterior` must be one of {POSTERIORS}, got {posterior!r}")
    st = settings(smoke)
    sweep = None
    if posterior == "learnt":
        choice = read_choice(out, st)
        sweep = choice.pop("sweep")
        st = settings(smoke, choice)
    seeds = st["seeds"] if seeds is None else seeds
    data = evaluation_data(st["finetune"].max_length, st["n_eval"], st["n_val"])
    per_seed = {seed: seed_run(seed, st, out, data, quiet=quiet, train_only=train_only) for seed in seeds}
    if train_only or set(seeds) != set(st["seeds"]):
        print(f"seeds {seeds} done; run without --seeds / --train-only to aggregate all of {st['seeds']}")
        return None
    sets, val, _ = data
    rows = [*METHODS[:5], *(m + LEARNT for m in METHODS[3:5]), METHODS[5], BROAD]  # table order
    logits = {m: {seed: r["logits"][m] for seed, r in per_seed.items() if m in r["logits"]} for m in rows
              if any(m in r["logits"] for r in per_seed.values())}
    train_info = {k: v for r in per_seed.values() for k, v in r["train"].items()}
    nv_choice = {seed: r["nv_choice"] for seed, r in per_seed.items()}
    taus = {name: learnt_tau(out / name) for name in train_info if name.startswith("dirichlet")}
    labels = {d: sets[d].labels for d in REVIEW_DOMAINS} | {"validation": val.labels}
    models = {dirichlet_name(**f): {"variational_lr": f["variational_lr"], "prior_tau": f["prior_tau"]}
              for f in (FIXED, BROAD_FIT, st["posterior"]) if f}  # the Dirichlet models' training (tau table)
    res = {"settings": settings_json(st), "tau": taus, "tau_init": D.tau, "dirichlet_models": models, "near_ood": TARGETS,
           "far_ood": list(FAR_OOD), "sweep": sweep,
           "train": train_info, "nv_choice": nv_choice, "rows": [], "reliability": {}, "smoke": smoke}
    for method, by_seed in logits.items():
        for ts in (False, True):
            name = method + (" + TS" if ts else "")
            for seed, per in by_seed.items():
                probs = {k: v.softmax(-1) for k, v in per.items()}
                T = metrics.fit_temperature(probs["validation"].mean(0).clamp_min(1e-300).log(), labels["validation"]) if ts else 1.0
                scaled = {k: apply_temperature(v, T) if ts else v for k, v in probs.items()}
                scores = {d: uncertainty_scores(scaled[d], per[d] if method == "map" and not ts else None) for d in sets}
                row = {"method": name, "seed": seed, "temperature": T, "detection": detection(scores)}
                for d in REVIEW_DOMAINS:
                    row[d] = metrics.uncertainty_metrics(scaled[d], labels[d])
                    if d != SOURCE:
                        row[d]["auroc_entropy"] = row["detection"]["entropy"][d]["auroc"]
                        row[d]["auroc_mi"] = row["detection"]["mi"][d]["auroc"] if "mi" in row["detection"] else None
                res["rows"].append(row)
                if seed == min(by_seed):
                    ood = torch.cat([scaled[d] for d in TARGETS], 1)
                    res["reliability"][name] = {"in-domain": metrics.reliability_bins(scaled[SOURCE], labels[SOURCE]),
                                                "out-of-domain": metrics.reliability_bins(ood, torch.cat([labels[d] for d in TARGETS]))}
    res["seconds"] = sum(r["seconds"] for r in per_seed.values())  # per-seed wall time with fine-tuning (cached parts excluded)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res


def learnt_tau(folder: Path) -> list[float]:
    """The concentration scale tau of each Dirichlet attention layer of a saved fine-tuned model."""
    from safetensors.torch import load_file

    return [float(v.exp()) for k, v in load_file(str(folder / "model.safetensors")).items() if k.endswith("log_tau")]

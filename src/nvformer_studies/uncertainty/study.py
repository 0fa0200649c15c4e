"""Bayesian attention and uncertainty (issue 8): Dirichlet attention vs MAP, MC dropout, NV sampling,
a deep ensemble, each with and without temperature scaling, on reviews with domain shift
(docs/RESULTS.md section "bayes"; text: :mod:`nvformer_studies.uncertainty.report`; the methods:
:mod:`nvformer_studies.uncertainty.harness`).

Model: all-MiniLM-L6-v2 + classification head fine-tuned on ``books`` (train split of
``domain_splits('books', 0)``; 2 epochs, batch 16, AdamW 5e-5, reviews truncated to 128 tokens to fit
the CPU budget), standard attention (MAP) or Dirichlet attention in all 6 layers (``DirichletSpec``
defaults: softmax concentration, tau 10 (learnable, per layer), prior centred on the deterministic
attention), for seeds 0, 1, 2; per seed also a deep ensemble of that seed's MAP model and two more
(``ensemble_seeds``). Evaluation: ``n_eval`` reviews (seed 0) of the test split of each of
the seven domains (books in-domain; dvd, electronics, kitchen, airline, imdb, blog out of domain);
Monte Carlo methods average ``samples`` forwards. Temperature scaling and the NV ``stdev_tau`` are
fitted on the books validation split. OOD detection: books test vs each other domain's test reviews.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from nvformer import DirichletSpec, metrics
from nvformer.tasks import TextBatches, classification_batches

from ..common.checkpoints import load_minilm
from ..common.data import REVIEW_DOMAINS
from ..common.finetune import FinetuneConfig
from ..common.subsets import seeded_subset
from ..common.tensorfiles import load_tensors, save_tensors
from ..sentiment.data import domain_splits
from .harness import METHODS, apply_temperature, finetune_variant, predictive_probs, sampled_nv

__all__ = ["BROAD", "BROAD_SPEC", "D", "SOURCE", "TARGETS", "ensemble_seeds", "learnt_tau", "read_seed_cache", "run_bayes_study", "seed_run",
           "settings", "write_seed_cache"]

SOURCE = "books"
TARGETS = [d for d in REVIEW_DOMAINS if d != SOURCE]
NV_GRID = (0.05, 0.1, 0.2)


def settings(smoke: bool) -> dict:
    """The study's sizes: the docs/RESULTS.md budget, or a tiny end-to-end check (``smoke``)."""
    if smoke:
        return {"seeds": [0], "finetune": FinetuneConfig(epochs=1, max_length=32, batch_size=16), "n_eval": 24, "n_val": 24, "samples": 2,
                "n_train": 48, "nv_grid": (0.1,), "ensemble_size": 2, "broad_prior_seed": 0}
    return {"seeds": [0, 1, 2], "finetune": FinetuneConfig(epochs=2, max_length=128, batch_size=16), "n_eval": 200, "n_val": 200,
            "samples": 4, "n_train": None, "nv_grid": NV_GRID, "ensemble_size": 3, "broad_prior_seed": 1}


BROAD = "dirichlet-mean, broad prior"  # the pathology: BROAD_SPEC, one seed
BROAD_SPEC = DirichletSpec(prior_tau=1.0)
D = DirichletSpec()  # the defaults the main Dirichlet rows use


def ensemble_seeds(seed: int, size: int) -> list[int]:
    """Training seeds of the ensemble reported under ``seed``: the MAP model of ``seed`` and
    ``size - 1`` extra members of their own (seeds ``100 + (size - 1) seed + j``), so that the
    ensembles of different seeds share no member."""
    return [seed] + [100 + (size - 1) * seed + j for j in range(size - 1)]


def _data(st: dict):
    """Tokenizer, the evaluation sets per domain, the source validation set and the prior batches."""
    _, tok = load_minilm()
    L = st["finetune"].max_length
    splits = {d: domain_splits(d, 0) for d in REVIEW_DOMAINS}

    def reviews(split: tuple[list[str], list[int]], n: int) -> TextBatches:
        # n reviews drawn with seed 0, in drawing order (the splits are sorted by file position and
        # the files are grouped by label, so a prefix would be one class)
        idx = seeded_subset(len(split[0]), n, 0, sort=False)
        return classification_batches(tok, [split[0][i] for i in idx], [split[1][i] for i in idx], batch_size=32, max_length=L)

    sets = {d: reviews(splits[d]["test"], st["n_eval"]) for d in REVIEW_DOMAINS}
    val = reviews(splits[SOURCE]["validation"], st["n_val"])
    prior_batches = classification_batches(tok, splits[SOURCE]["train"][0][:256], batch_size=32, max_length=L).batches
    return sets, val, prior_batches


def _settings_json(st: dict) -> dict:
    """The settings as JSON (the fine-tuning config as a dict, tuples as lists)."""
    return {k: (v.__dict__ if k == "finetune" else list(v) if isinstance(v, tuple) else v) for k, v in st.items()}


def seed_run(seed: int, st: dict, out: Path, data, *, quiet: bool = False, train_only: bool = False) -> dict | None:
    """Every method's predictive samples for one seed (``{method: {split: [S, N, C]}}``), with the
    training summaries and the NV choice; cached in ``out/probs-s{seed}.safetensors`` (the probabilities bit-exact, the rest
    as JSON metadata) while the settings match."""
    cache = out / f"probs-s{seed}.safetensors"
    key = json.dumps(_settings_json(st), sort_keys=True)
    saved = read_seed_cache(cache, key)
    if saved is not None:
        return saved
    sets, val, prior_batches = data
    t0 = time.time()

    def fit(attention: str, s: int, spec: DirichletSpec = D, tag: str = ""):
        return finetune_variant(out / f"{'map' if attention == 'standard' else 'dirichlet' + tag}-s{s}", attention, s, st["finetune"], spec,
                                n_train=st["n_train"], show_progress=not quiet)

    def evaluate_all(method: str, models) -> dict[str, torch.Tensor]:
        return {"validation": predictive_probs(method, models, val, st["samples"], seed)} | {
            d: predictive_probs(method, models, x, st["samples"], seed) for d, x in sets.items()}

    (map_model, _, map_info), (dir_model, _, dir_info) = fit("standard", seed), fit("dirichlet", seed)
    members = [map_model] + [fit("standard", x)[0] for x in ensemble_seeds(seed, st["ensemble_size"])[1:]]
    broad = fit("dirichlet", seed, BROAD_SPEC, "-prior1") if seed == st["broad_prior_seed"] else None
    broad_info = broad[2] if broad else None
    if train_only:
        return None
    probs = {"map": evaluate_all("map", [map_model]), "mc-dropout": evaluate_all("mc-dropout", [map_model]),
             "ensemble": evaluate_all("ensemble", members)}
    probs["dirichlet-mean"] = evaluate_all("dirichlet-mean", [dir_model])
    probs["dirichlet-sample"] = evaluate_all("dirichlet-sample", [dir_model])
    if broad is not None:
        probs[BROAD] = evaluate_all("dirichlet-mean", [broad[0]])
    del members, dir_model, broad
    # NV sampling on the MAP model: stdev_tau by source validation NLL
    best = None
    for s in st["nv_grid"]:
        m = sampled_nv(fit("standard", seed)[0], prior_batches, s)
        nll = metrics.uncertainty_metrics(predictive_probs("nv-sample", [m], val, st["samples"], seed), val.labels)["nll"]
        if best is None or nll < best[1]:
            best = (s, nll, m)
    probs["nv-sample"] = evaluate_all("nv-sample", [best[2]])
    saved = {"key": key, "probs": probs, "seconds": time.time() - t0, "nv_choice": {"stdev_tau": best[0], "val_nll": best[1]},
             "train": {f"{k}-s{seed}": {f: i[f] for f in ("train_loss", "val_accuracy", "best_epoch")}
                       for k, i in (("map", map_info), ("dirichlet", dir_info), ("dirichlet-prior1", broad_info)) if i}}
    out.mkdir(parents=True, exist_ok=True)
    write_seed_cache(cache, saved)
    return saved


def write_seed_cache(path: Path, saved: dict) -> None:
    """Write one seed's run (:func:`seed_run`): the predictive probabilities as safetensors (bit-exact), the rest as JSON metadata."""
    save_tensors(path, {"probs": saved["probs"]}, {k: v for k, v in saved.items() if k != "probs"})


def read_seed_cache(path: Path, key: str) -> dict | None:
    """The run :func:`write_seed_cache` wrote to ``path``, or None if there is none or its settings ``key`` differs."""
    if not path.exists():
        return None
    tensors, saved = load_tensors(path)
    return {**saved, "probs": tensors.get("probs", {})} if saved.get("key") == key else None


def run_bayes_study(out: Path, *, smoke: bool = False, seeds: list[int] | None = None, quiet: bool = False,
                    train_only: bool = False) -> dict | None:
    """Every seed's run (:func:`seed_run`; ``seeds``: only these, cached for a later aggregation),
    then the metrics of every method with and without temperature scaling, aggregated into
    ``out/results.json``; returns the results (None if only some seeds ran, or with ``train_only``)."""
    st = settings(smoke)
    seeds = st["seeds"] if seeds is None else seeds
    data = _data(st)
    per_seed = {seed: seed_run(seed, st, out, data, quiet=quiet, train_only=train_only) for seed in seeds}
    if train_only or set(seeds) != set(st["seeds"]):
        print(f"seeds {seeds} done; run without --seeds / --train-only to aggregate all of {st['seeds']}")
        return None
    sets, val, _ = data
    methods = [m for m in (*METHODS, BROAD) if any(m in r["probs"] for r in per_seed.values())]
    probs = {m: {seed: r["probs"][m] for seed, r in per_seed.items() if m in r["probs"]} for m in methods}
    train_info = {k: v for r in per_seed.values() for k, v in r["train"].items()}
    nv_choice = {seed: r["nv_choice"] for seed, r in per_seed.items()}
    taus = {name: learnt_tau(out / name) for name in train_info if name.startswith("dirichlet")}
    labels = {d: s.labels for d, s in sets.items()} | {"validation": val.labels}
    res = {"settings": _settings_json(st), "tau": taus,
           "train": train_info, "nv_choice": nv_choice, "rows": [], "reliability": {}, "smoke": smoke}
    for method, by_seed in probs.items():
        for ts in (False, True):
            name = method + (" + TS" if ts else "")
            for seed, per in by_seed.items():
                T = metrics.fit_temperature(per["validation"].mean(0).clamp_min(1e-300).log(), labels["validation"]) if ts else 1.0
                row = {"method": name, "seed": seed, "temperature": T}
                for d in REVIEW_DOMAINS:
                    p = apply_temperature(per[d], T) if ts else per[d]
                    m = metrics.uncertainty_metrics(p, labels[d])
                    row[d] = m
                    if d != SOURCE:
                        p_in = apply_temperature(per[SOURCE], T) if ts else per[SOURCE]
                        row[d]["auroc_entropy"] = metrics.ood_auroc(metrics.predictive_entropy(p_in), metrics.predictive_entropy(p))
                        row[d]["auroc_mi"] = (metrics.ood_auroc(metrics.mutual_information(per[SOURCE]), metrics.mutual_information(per[d]))
                                              if per[d].shape[0] > 1 and not ts else None)
                res["rows"].append(row)
                if seed == min(by_seed):
                    ood = torch.cat([apply_temperature(per[d], T) if ts else per[d] for d in TARGETS], 1)
                    res["reliability"][name] = {"in-domain": metrics.reliability_bins(apply_temperature(per[SOURCE], T) if ts else per[SOURCE],
                                                                                       labels[SOURCE]),
                                                "out-of-domain": metrics.reliability_bins(ood, torch.cat([labels[d] for d in TARGETS]))}
    res["seconds"] = sum(r["seconds"] for r in per_seed.values())  # per-seed wall time with fine-tuning (cached parts excluded)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res


def learnt_tau(folder: Path) -> list[float]:
    """The concentration scale tau of each Dirichlet attention layer of a saved fine-tuned model."""
    from safetensors.torch import load_file

    return [float(v.exp()) for k, v in load_file(str(folder / "model.safetensors")).items() if k.endswith("log_tau")]

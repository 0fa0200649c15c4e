"""Bayesian attention and uncertainty (issue 8): Dirichlet attention vs MAP, MC dropout, NV sampling,
a deep ensemble, each with and without temperature scaling, on reviews with domain shift.

    .venv/bin/python experiments/bayes_study.py            # fine-tune (cached in runs/bayes/), evaluate, write RESULTS
    .venv/bin/python experiments/bayes_study.py --seeds 1 --threads 1   # one seed only (cached in runs/bayes/probs-s1.pt), e.g. in
                                                                        # parallel processes; then the plain command aggregates
    .venv/bin/python experiments/bayes_study.py --reuse    # rewrite the section from runs/bayes/results.json
    .venv/bin/python experiments/bayes_study.py --smoke --out runs/bayes-smoke --no-results

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

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "experiments"))

from identity import write_section  # noqa: E402
from nvformer import metrics  # noqa: E402
from nvformer.data import REVIEW_DOMAINS  # noqa: E402
from nvformer.evaluate import TokenizedSet  # noqa: E402
from nvformer.plots import line_panels  # noqa: E402
from nvformer.sentiment import domain_splits  # noqa: E402
from nvformer.train import FinetuneConfig  # noqa: E402
from nvformer.bayes import DirichletSpec  # noqa: E402
from nvformer.uncertainty import apply_temperature, finetune_variant, predictive_probs, sampled_nv  # noqa: E402

SOURCE = "books"
TARGETS = [d for d in REVIEW_DOMAINS if d != SOURCE]
METHOD_ORDER = ("map", "mc-dropout", "ensemble", "dirichlet-mean", "dirichlet-sample", "nv-sample")
NV_GRID = (0.05, 0.1, 0.2)


def settings(smoke: bool) -> dict:
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
    from nvformer.hf.checkpoints import load_minilm

    _, tok = load_minilm()
    L = st["finetune"].max_length
    splits = {d: domain_splits(d, 0) for d in REVIEW_DOMAINS}
    sets = {d: TokenizedSet.build(tok, *subset(splits[d]["test"], st["n_eval"]), batch_size=32, max_length=L) for d in REVIEW_DOMAINS}
    val = TokenizedSet.build(tok, *subset(splits[SOURCE]["validation"], st["n_val"]), batch_size=32, max_length=L)
    prior_batches = TokenizedSet.build(tok, splits[SOURCE]["train"][0][:256], batch_size=32, max_length=L).batches
    return sets, val, prior_batches


def _settings_json(st: dict) -> dict:
    return {k: (v.__dict__ if k == "finetune" else list(v) if isinstance(v, tuple) else v) for k, v in st.items()}


def seed_run(seed: int, st: dict, out: Path, data, *, quiet: bool = False, train_only: bool = False) -> dict | None:
    """Every method's predictive samples for one seed (``{method: {split: [S, N, C]}}``), with the
    training summaries and the NV choice; cached in ``out/probs-s{seed}.pt`` while the settings match."""
    cache = out / f"probs-s{seed}.pt"
    key = json.dumps(_settings_json(st), sort_keys=True)
    if cache.exists():
        saved = torch.load(cache, weights_only=False)
        if saved["key"] == key:
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
        nll = metrics.uncertainty_metrics(predictive_probs("nv-sample", [m], val, st["samples"], seed), torch.tensor(val.labels))["nll"]
        if best is None or nll < best[1]:
            best = (s, nll, m)
    probs["nv-sample"] = evaluate_all("nv-sample", [best[2]])
    saved = {"key": key, "probs": probs, "seconds": time.time() - t0, "nv_choice": {"stdev_tau": best[0], "val_nll": best[1]},
             "train": {f"{k}-s{seed}": {f: i[f] for f in ("train_loss", "val_accuracy", "best_epoch")}
                       for k, i in (("map", map_info), ("dirichlet", dir_info), ("dirichlet-prior1", broad_info)) if i}}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(saved, cache)
    return saved


def run(args, out: Path) -> dict | None:
    st = settings(args.smoke)
    t0 = time.time()
    seeds = st["seeds"] if args.seeds is None else [int(x) for x in args.seeds.split(",")]
    data = _data(st)
    per_seed = {seed: seed_run(seed, st, out, data, quiet=args.quiet, train_only=args.train_only) for seed in seeds}
    if args.train_only or set(seeds) != set(st["seeds"]):
        print(f"seeds {seeds} done; run without --seeds / --train-only to aggregate all of {st['seeds']}")
        return None
    sets, val, _ = data
    methods = [m for m in (*METHOD_ORDER, BROAD) if any(m in r["probs"] for r in per_seed.values())]
    probs = {m: {seed: r["probs"][m] for seed, r in per_seed.items() if m in r["probs"]} for m in methods}
    train_info = {k: v for r in per_seed.values() for k, v in r["train"].items()}
    nv_choice = {seed: r["nv_choice"] for seed, r in per_seed.items()}
    taus = {name: learnt_tau(out / name) for name in train_info if name.startswith("dirichlet")}
    labels = {d: torch.tensor(s.labels) for d, s in sets.items()} | {"validation": torch.tensor(val.labels)}
    res = {"settings": _settings_json(st), "tau": taus,
           "train": train_info, "nv_choice": nv_choice, "rows": [], "reliability": {}, "smoke": args.smoke}
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


def subset(split: tuple[list[str], list[int]], n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """``n`` reviews of a split drawn with ``seed`` (the splits are sorted by file position, and the
    files are grouped by label, so a prefix would be one class)."""
    idx = torch.randperm(len(split[0]), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return [split[0][i] for i in idx], [split[1][i] for i in idx]


def _fresh_map(out: Path, seed: int, st: dict):
    """A new copy of the cached MAP model of ``seed`` (NV conversion is in place)."""
    return finetune_variant(out / f"map-s{seed}", "standard", seed, st["finetune"], n_train=st["n_train"], show_progress=False)[0]


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _mean_of(values: list[float | None]) -> str:
    return "-" if any(v is None for v in values) else f"{statistics.mean(values):.3f}"


def section(res: dict, fig_dir: Path) -> str:
    st = res["settings"]
    methods = list(dict.fromkeys(r["method"] for r in res["rows"]))
    lines = ["## Bayesian attention and uncertainty (reviews, books -> six domains)", "",
             f"Command: `.venv/bin/python experiments/bayes_study.py` ({res['seconds'] / 60:.0f} min of single-thread processes for the recorded per-seed runs, fine-tuning counted only where a run trained its models rather than loading them from `runs/bayes/`; seeds can run in parallel with `--seeds`). "
             f"Model: all-MiniLM-L6-v2 fine-tuned on `books` ({st['finetune']['epochs']} epochs, batch {st['finetune']['batch_size']}, "
             f"reviews truncated to {st['finetune']['max_length']} tokens), seeds {st['seeds']}; standard attention (MAP; MC dropout; "
             "NV sampling with the empirical prior of 256 books training reviews and stdev_tau chosen on books validation NLL from "
             f"{st['nv_grid']}; per seed, a deep ensemble of {st['ensemble_size']} MAP models, that seed's and {st['ensemble_size'] - 1} of its own, seeds 100 + {st['ensemble_size'] - 1} seed + j) or Dirichlet attention in all six layers (`DirichletSpec` "
             f"defaults: {D.concentration} concentration, tau {D.tau:g} (learnable, per layer), prior {D.prior} on the deterministic attention "
             f"with prior_tau {D.prior_tau:g}; loss NLL + KL / N_train; the row 'broad prior' is the same with prior_tau {BROAD_SPEC.prior_tau:g}, seed "
             f"{st.get('broad_prior_seed')} only). {st['samples']} samples per Monte Carlo prediction. Data: Amazon reviews (Blitzer et al. "
             f"2007) and airline / imdb / blog (as in Ryu & Lee 2020), split seed 0, {st['n_eval']} test reviews per domain drawn with seed 0; "
             f"temperatures fitted on {st['n_val']} books validation reviews. Mean ± sd over seeds. "
             "OOD = mean over the six other domains; AUROC = books test vs each domain's test reviews, by predictive entropy (H) or "
             "mutual information (MI, Monte Carlo methods only).", "",
             "| method | books acc | books NLL | books Brier | books ECE | OOD acc | OOD NLL | OOD Brier | OOD ECE | AUROC (H) | AUROC (MI) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in methods:
        rows = [r for r in res["rows"] if r["method"] == m]

        def agg(key, domains):
            vals = [statistics.mean(r[d][key] for d in domains) for r in rows if all(r[d].get(key) is not None for d in domains)]
            return _mean_sd(vals) if vals else "-"

        lines.append(f"| {m} | {agg('accuracy', [SOURCE])} | {agg('nll', [SOURCE])} | {agg('brier', [SOURCE])} | {agg('ece', [SOURCE])} | "
                     f"{agg('accuracy', TARGETS)} | {agg('nll', TARGETS)} | {agg('brier', TARGETS)} | {agg('ece', TARGETS)} | "
                     f"{agg('auroc_entropy', TARGETS)} | {agg('auroc_mi', TARGETS)} |")
    kinds = {}
    for name, info in res["train"].items():
        kinds.setdefault(name.rsplit("-s", 1)[0], []).append(info)
    lines += ["", "Fine-tuning (books validation accuracy of the kept epoch / last epoch's training loss, which includes the KL term; "
              "mean over the seeds trained): " + "; ".join(
                  f"{k}: {statistics.mean(max(i['val_accuracy']) for i in v):.3f} / {statistics.mean(i['train_loss'][-1] for i in v):.3g}"
                  f" ({len(v)} seed{'s' if len(v) > 1 else ''})" for k, v in kinds.items()) + "."]
    if res.get("tau"):
        lo, hi = min(min(t) for t in res["tau"].values()), max(max(t) for t in res["tau"].values())
        lines[-1] += (f" Learnt Dirichlet concentration scales tau (all layers, all Dirichlet models): {lo:.3g} to {hi:.3g}, from {D.tau:g} at "
                      "initialisation: at the fine-tuning learning rate tau barely moves, so the posterior's spread is set by its "
                      "initial value.") if hi - lo < 0.5 and abs(hi - D.tau) < 0.5 else f" Learnt tau: {lo:.3g} to {hi:.3g} ({D.tau:g} at initialisation)."
    for title, keys in (("accuracy / ECE / AUROC by entropy", ("accuracy", "ece", "auroc_entropy")),
                        ("NLL / Brier / AUROC by mutual information", ("nll", "brier", "auroc_mi"))):
        lines += ["", f"Per domain ({title}, mean over seeds; - = not defined for the method):", "",
                  "| method | " + " | ".join(TARGETS) + " |", "| --- |" + " --- |" * len(TARGETS)]
        for m in methods:
            rows = [r for r in res["rows"] if r["method"] == m]
            cells = [" / ".join(_mean_of([r[d].get(k) for r in rows]) for k in keys) for d in TARGETS]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if res.get("nv_choice"):
        lines += ["", "NV stdev_tau chosen per seed: " + ", ".join(f"seed {s}: {v['stdev_tau']}" for s, v in res["nv_choice"].items()) + "."]
    panels = {}
    for where in ("in-domain", "out-of-domain"):
        panels[where] = {m: (b[where]["confidence"], b[where]["accuracy"]) for m, b in res["reliability"].items() if "+ TS" not in m}
    name = line_panels(panels, fig_dir / "bayes_reliability.png", xlabel="confidence", ylabel="accuracy", diagonal=True, width=5.0).name
    lines += ["", f"![reliability diagrams, first seed, no temperature scaling](figures/{name})", "", reading(res), ""]
    return "\n".join(lines)


def reading(res: dict) -> str:
    """The paper's claim checked against the recorded rows: is attention-space inference (Dirichlet)
    competitive on calibration and OOD detection at no large cost in accuracy? Means over seeds;
    "competitive" = within the seed spread (one sd) of the best method, or better."""
    def stat(method: str, key: str, domains: list[str]) -> tuple[float, float] | None:
        vals = [statistics.mean(r[d][key] for d in domains) for r in res["rows"] if r["method"] == method
                and all(r[d].get(key) is not None for d in domains)]
        if not vals:
            return None
        return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

    base = ["map", "mc-dropout", "ensemble", "nv-sample"]
    ours = ["dirichlet-mean", "dirichlet-sample"]
    parts, verdicts = [], []
    for key, domains, label, higher in (("accuracy", [SOURCE], "books accuracy", True), ("accuracy", TARGETS, "OOD accuracy", True),
                                         ("nll", TARGETS, "OOD NLL", False), ("ece", TARGETS, "OOD ECE", False),
                                         ("auroc_entropy", TARGETS, "OOD-detection AUROC (entropy)", True),
                                         ("auroc_mi", TARGETS, "OOD-detection AUROC (mutual information)", True)):
        vals = {m: stat(m, key, domains) for m in base + ours}
        vals = {m: v for m, v in vals.items() if v is not None}
        if not vals:
            continue
        best = (max if higher else min)(vals, key=lambda m: vals[m][0])
        d = max((vals[m] for m in ours if m in vals), key=lambda v: v[0] if higher else -v[0], default=None)
        if d is None:
            continue
        gap = (vals[best][0] - d[0]) * (1 if higher else -1)
        verdict = "best" if best in ours else ("within one sd of the best" if gap <= max(vals[best][1], d[1]) else "behind the best")
        parts.append(f"{label}: best {best} {vals[best][0]:.3f}, Dirichlet {d[0]:.3f} ({verdict})")
        verdicts.append(verdict)
    text = ("**Reading (the recorded run), without temperature scaling.** " + "; ".join(parts) + ". ")
    n_ok = sum(v != "behind the best" for v in verdicts)
    text += (f"Dirichlet attention is best or within one sd of the best on {n_ok} of {len(verdicts)} of these metrics "
             f"({sum(v == 'best' for v in verdicts)} best): ")
    text += ("competitive, as the paper claims, but not clearly better. " if n_ok == len(verdicts) else "not competitive everywhere. ")
    spread = [stat(m, "auroc_entropy", TARGETS) for m in base + ours]
    spread = [v[0] for v in spread if v]
    if spread:
        text += (f"OOD detection is weak for every method here (entropy AUROC {min(spread):.3f} to {max(spread):.3f}, 0.5 = chance). ")
    pair = [stat(m, k, TARGETS) for m in ours for k in ("nll", "ece")]
    if all(pair):
        text += (f"Sampling the Dirichlet posterior changes little over its mean (OOD NLL {pair[0][0]:.3f} vs {pair[2][0]:.3f}, ECE "
                 f"{pair[1][0]:.3f} vs {pair[3][0]:.3f}, mean vs sample). ")
    ts = {m: stat(m + " + TS", "ece", TARGETS) for m in base + ours}
    ts = {m: v for m, v in ts.items() if v}
    if ts:
        text += "With temperature scaling (fitted on books validation), OOD ECE: " + ", ".join(f"{m} {v[0]:.3f}" for m, v in ts.items()) + ". "
    broad = stat(BROAD, "accuracy", [SOURCE])
    if broad:
        mp = stat("map", "accuracy", [SOURCE])
        text += (f"With the broad prior (prior_tau {BROAD_SPEC.prior_tau:g}) the Dirichlet model reaches books accuracy {broad[0]:.3f} (MAP {mp[0]:.3f})"
                 + (": near chance (0.5), the prior's pathology. " if broad[0] < 0.6 else ". "))
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bayes"))
    parser.add_argument("--results", default=str(ROOT / "docs" / "RESULTS.md"))
    parser.add_argument("--no-results", action="store_true")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seeds", default=None, help="comma list: only compute (and cache) these seeds; run again without it to aggregate")
    parser.add_argument("--train-only", action="store_true", help="only fine-tune (cached) the models of the seeds")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    res = json.loads((out / "results.json").read_text()) if args.reuse else run(args, out)
    if res is None:
        return
    text = section(res, out / "figures" if args.no_results else ROOT / "docs" / "figures")
    print(text)
    if not args.no_results:
        write_section(text, "bayes", Path(args.results))


if __name__ == "__main__":
    main()

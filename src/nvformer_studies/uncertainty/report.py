"""The "bayes" section of docs/RESULTS.md: tables, reliability figure and reading of the Bayesian
attention study, recomputed from its ``results.json`` (:func:`~nvformer_studies.uncertainty.study.run_bayes_study`)."""

from __future__ import annotations

import statistics
from pathlib import Path

from ..common.docs import table
from ..common.plots import line_panels
from .study import BROAD, BROAD_SPEC, SOURCE, TARGETS, D

__all__ = ["reading", "section"]

# the main table: (header, where, metric); where = "books" (in domain) or "ood" (the mean over the six other domains)
MAIN_COLUMNS = (("books acc", "books", "accuracy"), ("books NLL", "books", "nll"), ("books Brier", "books", "brier"), ("books ECE", "books", "ece"),
                ("OOD acc", "ood", "accuracy"), ("OOD NLL", "ood", "nll"), ("OOD Brier", "ood", "brier"), ("OOD ECE", "ood", "ece"),
                ("AUROC (H)", "ood", "auroc_entropy"), ("AUROC (MI)", "ood", "auroc_mi"))


def _mean_sd_fields(key: str, res: dict, method: str, metric: str, domains: list[str]) -> dict:
    """Table fields ``key`` and ``key_sd``: mean and standard deviation over the seeds of a
    method's ``metric`` averaged over ``domains`` (sd None for one seed; both None if undefined)."""
    vals = [statistics.mean(r[d][metric] for d in domains) for r in res["rows"] if r["method"] == method
            and all(r[d].get(metric) is not None for d in domains)]
    return {key: statistics.mean(vals) if vals else None, f"{key}_sd": statistics.stdev(vals) if len(vals) > 1 else None}


def _mean_sd(key: str):
    """A table cell: ``mean ± sd`` (the mean alone for one seed; ``-`` if undefined)."""
    def cell(r: dict) -> str:
        if r[key] is None:
            return "-"
        return f"{r[key]:.3f}" if r[f"{key}_sd"] is None else f"{r[key]:.3f} ± {r[f'{key}_sd']:.3f}"

    return cell


def _mean_of(values: list[float | None]) -> float | None:
    """The mean of ``values``, None if any is undefined."""
    return None if any(v is None for v in values) else statistics.mean(values)


def _means(domain: str, keys: tuple[str, ...]):
    """A table cell: the means of ``keys`` on ``domain``, ``-`` where undefined."""
    return lambda r: " / ".join("-" if r[f"{domain}_{k}"] is None else f"{r[f'{domain}_{k}']:.3f}" for k in keys)


def section(res: dict, fig_dir: Path, csv_dir: Path | None = None) -> str:
    """The "bayes" section of docs/RESULTS.md from ``res`` of :func:`~nvformer_studies.uncertainty.study.run_bayes_study`
    (the reliability figure written to ``fig_dir``; tables through ``csv_dir`` if given)."""
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
             table([{"method": m, **{k: v for _, where, key in MAIN_COLUMNS
                                     for k, v in _mean_sd_fields(f"{where}_{key}", res, m, key, [SOURCE] if where == "books" else TARGETS).items()}}
                    for m in methods], {"method": "{method}", **{head: _mean_sd(f"{where}_{key}") for head, where, key in MAIN_COLUMNS}},
                   csv_dir, "bayes")]
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
        per_domain = [{"method": m, **{f"{d}_{k}": _mean_of([r[d].get(k) for r in res["rows"] if r["method"] == m]) for d in TARGETS for k in keys}}
                      for m in methods]
        lines += ["", f"Per domain ({title}, mean over seeds; - = not defined for the method):", "",
                  table(per_domain, {"method": "{method}", **{d: _means(d, keys) for d in TARGETS}}, csv_dir, f"bayes-{'-'.join(keys)}")]
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

"""The "bayes" section of docs/RESULTS.md: tables, reliability figure and reading of the Bayesian
attention study, recomputed from its ``results.json`` (:func:`~nvformer_studies.uncertainty.study.run_bayes_study`).

Tables (each through :func:`nvformer_studies.common.docs.table`, a CSV in docs/results/): the main
comparison (``bayes``), per-domain accuracy / ECE / AUROC and NLL / Brier / AUROC
(``bayes-accuracy-ece-auroc_entropy``, ``bayes-nll-brier-auroc_mi``), OOD detection near and far
(``bayes-ood-near``, ``bayes-ood-far``) and per far-OOD set (``bayes-ood-far-sets``), the learnt
concentration scales per layer (``bayes-tau``) and the tau sweep (``bayes-sweep``). Every number in
the reading is computed from the results.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

from ..common.docs import table
from ..common.plots import line_panels
from .study import BROAD, BROAD_SPEC, LEARNT, SCORES, SOURCE, TARGETS, D, dirichlet_name

__all__ = ["reading", "section", "sweep_table"]

# the main table: (header, where, metric); where = "books" (in domain) or "ood" (the mean over the six other domains)
MAIN_COLUMNS = (("books acc", "books", "accuracy"), ("books NLL", "books", "nll"), ("books Brier", "books", "brier"), ("books ECE", "books", "ece"),
                ("OOD acc", "ood", "accuracy"), ("OOD NLL", "ood", "nll"), ("OOD Brier", "ood", "brier"), ("OOD ECE", "ood", "ece"),
                ("AUROC (H)", "ood", "auroc_entropy"), ("AUROC (MI)", "ood", "auroc_mi"))
SCORE_LABELS = {"maxp": "1 - max p", "entropy": "entropy", "mi": "mutual information", "energy": "energy (-logsumexp z)"}
DETECTION_COLUMNS = (("AUROC", "auroc"), ("AUPR", "aupr"), ("FPR@95%TPR", "fpr95"))


def _stat(vals: list[float]) -> tuple[float, float] | None:
    """``(mean, sd)`` of per-seed values (sd 0 for one value), None for none."""
    if not vals:
        return None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def _per_seed(res: dict, method: str, value: Callable[[dict], float | None]) -> list[float]:
    """``value(row)`` of each seed's row of ``method`` where it is defined."""
    vals = [value(r) for r in res["rows"] if r["method"] == method]
    return [v for v in vals if v is not None]


def _domain_mean(metric: str, domains: list[str]) -> Callable[[dict], float | None]:
    """A row's ``metric`` averaged over ``domains`` (None if undefined on one)."""
    return lambda r: None if any(r[d].get(metric) is None for d in domains) else statistics.mean(r[d][metric] for d in domains)


def _detect_mean(score: str, metric: str, sets: list[str]) -> Callable[[dict], float | None]:
    """A row's OOD-detection ``metric`` of ``score`` averaged over ``sets`` (None if the row has no such score)."""
    def value(r: dict) -> float | None:
        by_set = r.get("detection", {}).get(score)
        return None if by_set is None else statistics.mean(by_set[s][metric] for s in sets)

    return value


def _mean_sd_fields(key: str, vals: list[float]) -> dict:
    """Table fields ``key`` and ``key_sd``: mean and standard deviation over the seeds (sd None
    for one seed; both None if undefined)."""
    return {key: statistics.mean(vals) if vals else None, f"{key}_sd": statistics.stdev(vals) if len(vals) > 1 else None}


def _mean_sd(key: str):
    """A table cell: ``mean ± sd`` (the mean alone for one seed; ``-`` if undefined)."""
    def cell(r: dict) -> str:
        if r[key] is None:
            return "-"
        return f"{r[key]:.3f}" if r[f"{key}_sd"] is None else f"{r[key]:.3f} ± {r[f'{key}_sd']:.3f}"

    return cell


def _mean_of(values: list[float | None]) -> float | None:
    """The mean of ``values``, None if any is undefined (or there are none)."""
    return None if not values or any(v is None for v in values) else statistics.mean(values)


def _means(prefix: str, keys: tuple[str, ...]):
    """A table cell: the means of ``keys`` under ``prefix``, ``-`` where undefined."""
    return lambda r: " / ".join("-" if r[f"{prefix}_{k}"] is None else f"{r[f'{prefix}_{k}']:.3f}" for k in keys)


def _lr(variational_lr: float | None, network_lr: float) -> str:
    """How a model's tau was trained: its own learning rate, or the network's."""
    return f"network's ({network_lr:g})" if variational_lr is None else f"{variational_lr:g}"


def _detection_pairs(res: dict, methods: list[str]) -> list[tuple[str, str]]:
    """``(method, score)`` rows of the OOD tables: every method without temperature scaling, each score it has."""
    pairs = []
    for m in methods:
        have = {k for r in res["rows"] if r["method"] == m for k in r.get("detection", {})}
        pairs += [(m, k) for k in SCORES if k in have]
    return pairs


def _ood_tables(res: dict, methods: list[str], csv_dir: Path | None) -> list[str]:
    """The near- and far-OOD detection tables and the per-set far-OOD table (markdown lines)."""
    near, far = res.get("near_ood", TARGETS), res["far_ood"]
    pairs = _detection_pairs(res, [m for m in methods if "+ TS" not in m])
    lines = []
    for label, sets, name in (("Near OOD (the six other review domains)", near, "bayes-ood-near"),
                              (f"Far OOD (text that is not a review: {', '.join(far)})", far, "bayes-ood-far")):
        rows = [{"method": m, "score": SCORE_LABELS[k], **{f: v for _, key in DETECTION_COLUMNS
                                                         for f, v in _mean_sd_fields(key, _per_seed(res, m, _detect_mean(k, key, sets))).items()}}
                for m, k in pairs]
        lines += ["", (f"{label}: detection of each set against books test (OOD = positive class; mean over the {len(sets)} sets, "
                       "mean ± sd over seeds):"), "",
                  table(rows, {"method": "{method}", "score": "{score}", **{h: _mean_sd(key) for h, key in DETECTION_COLUMNS}}, csv_dir, name)]
    rows = [{"method": m, "score": SCORE_LABELS[k], **{f"{s}_{key}": _mean_of(_per_seed(res, m, _detect_mean(k, key, [s])))
                                                      for s in far for key in ("auroc", "fpr95")}} for m, k in pairs]
    lines += ["", "Per far-OOD set (AUROC / FPR@95%TPR, mean over seeds):", "",
              table(rows, {"method": "{method}", "score": "{score}", **{s: _means(s, ("auroc", "fpr95")) for s in far}}, csv_dir,
                    "bayes-ood-far-sets")]
    return lines


def _tau_table(res: dict, csv_dir: Path | None) -> list[str]:
    """The learnt concentration scales per layer and Dirichlet model (mean ± sd over seeds)."""
    lr = res["settings"]["finetune"]["lr"]
    rows = []
    for stem, info in res["dirichlet_models"].items():
        taus = [t for name, t in res["tau"].items() if name.rsplit("-s", 1)[0] == stem]
        if not taus:
            continue
        rows.append({"model": stem, "tau_lr": _lr(info["variational_lr"], lr), "prior_tau": info["prior_tau"], "seeds": len(taus),
                     **{f: v for i in range(len(taus[0])) for f, v in _mean_sd_fields(f"layer{i + 1}", [t[i] for t in taus]).items()}})
    if not rows:
        return []
    n_layers = max(int(k[5:]) for r in rows for k in r if k.startswith("layer") and not k.endswith("_sd"))
    return ["", f"Learnt concentration scales tau per layer (all start at {res.get('tau_init', D.tau):g}; mean ± sd over the seeds trained):", "",
            table(rows, {"model": "{model}", "tau lr": "{tau_lr}", "prior_tau": "{prior_tau:g}", "seeds": "{seeds}",
                         **{f"layer {i}": _mean_sd(f"layer{i}") for i in range(1, n_layers + 1)}}, csv_dir, "bayes-tau")]


def sweep_table(sweep: dict, network_lr: float, csv_dir: Path | None = None) -> str:
    """The tau sweep (:func:`nvformer_studies.uncertainty.sweep.run_tau_sweep`) as a table: per grid
    point the books validation metrics of the posterior-mean / sampled predictive and the learnt tau."""
    chosen = sweep["choice"]
    rows = [{"tau_lr": _lr(p["variational_lr"], network_lr), "prior_tau": p["prior_tau"], "accuracy": p["accuracy_mean"],
             "nll_mean": p["nll_mean"], "nll_sample": p["nll_sample"], "ece_mean": p["ece_mean"], "ece_sample": p["ece_sample"],
             "mi_sample": p["mi_sample"], "tau_min": min(p["tau"]), "tau_max": max(p["tau"]),
             "chosen": "reference" if p["variational_lr"] is None else "yes" if (p["variational_lr"], p["prior_tau"]) == (chosen["variational_lr"], chosen["prior_tau"]) else "no"}
            for p in sweep["points"]]
    return table(rows, {"tau lr": "{tau_lr}", "prior_tau": "{prior_tau:g}", "val acc (mean)": "{accuracy:.3f}",
                        "val NLL mean / sample": "{nll_mean:.4f} / {nll_sample:.4f}", "val ECE mean / sample": "{ece_mean:.3f} / {ece_sample:.3f}",
                        "val MI (sample)": "{mi_sample:.2e}", "tau (layers)": "{tau_min:.3g} to {tau_max:.3g}", "chosen": "{chosen}"},
                 csv_dir, "bayes-sweep")


def section(res: dict, fig_dir: Path, csv_dir: Path | None = None) -> str:
    """The "bayes" section of docs/RESULTS.md from ``res`` of :func:`~nvformer_studies.uncertainty.study.run_bayes_study`
    (the reliability figure written to ``fig_dir``; tables through ``csv_dir`` if given)."""
    st = res["settings"]
    methods = list(dict.fromkeys(r["method"] for r in res["rows"]))
    post, sweep = st.get("posterior"), res.get("sweep")
    learnt_text = ""
    if post:
        learnt_text = (f" Rows '..., learnt tau': Dirichlet attention whose tau has an AdamW group of its own (learning rate "
                       f"{post['variational_lr']:g}, no weight decay, the same warm-up and decay; the network at {st['finetune']['lr']:g}) and "
                       f"prior_tau {post['prior_tau']:g}, chosen by the tau sweep below (books validation, seed {sweep['seed']}; command "
                       "`.venv/bin/python experiments/bayes_study.py --sweep`).")
    lines = ["## Bayesian attention and uncertainty (reviews, books -> six domains and five non-review sources)", "",
             f"Command: `.venv/bin/python experiments/bayes_study.py` ({res['seconds'] / 60:.0f} min of single-thread processes for the recorded per-seed runs, fine-tuning counted only where a run trained its models rather than loading them from `runs/bayes/`; seeds can run in parallel with `--seeds`). "
             f"Model: all-MiniLM-L6-v2 fine-tuned on `books` ({st['finetune']['epochs']} epochs, batch {st['finetune']['batch_size']}, "
             f"reviews truncated to {st['finetune']['max_length']} tokens), seeds {st['seeds']}; standard attention (MAP; MC dropout; "
             "NV sampling with the empirical prior of 256 books training reviews and stdev_tau chosen on books validation NLL from "
             f"{st['nv_grid']}; per seed, a deep ensemble of {st['ensemble_size']} MAP models, that seed's and {st['ensemble_size'] - 1} of its own, seeds 100 + {st['ensemble_size'] - 1} seed + j) or Dirichlet attention in all six layers (`DirichletSpec` "
             f"defaults: {D.concentration} concentration, tau {D.tau:g} (learnable, per layer, at the network's learning rate), prior {D.prior} on the deterministic attention "
             f"with prior_tau {D.prior_tau:g}; loss NLL + KL / N_train; the row 'broad prior' is the same with prior_tau {BROAD_SPEC.prior_tau:g}, seed "
             f"{st.get('broad_prior_seed')} only).{learnt_text} {st['samples']} samples per Monte Carlo prediction. Data: Amazon reviews (Blitzer et al. "
             f"2007) and airline / imdb / blog (as in Ryu & Lee 2020), split seed 0, {st['n_eval']} test reviews per domain drawn with seed 0; "
             + (f"far OOD: {st['n_eval']} texts (seed 0, distinct, disjoint across sources) of each of WikiText-2 test paragraphs and the English side "
                "of the koran / law / medical / it test sets (../shared/data/mt-domains). " if res.get("far_ood") else "")
             + f"Temperatures fitted on {st['n_val']} books validation reviews. Mean ± sd over seeds. "
             "OOD = mean over the six other domains; AUROC = books test vs each domain's test reviews, by predictive entropy (H) or "
             "mutual information (MI, Monte Carlo methods only).", "",
             table([{"method": m, **{k: v for _, where, key in MAIN_COLUMNS
                                     for k, v in _mean_sd_fields(f"{where}_{key}", _per_seed(res, m, _domain_mean(key, [SOURCE] if where == "books"
                                                                                                               else TARGETS))).items()}}
                    for m in methods], {"method": "{method}", **{head: _mean_sd(f"{where}_{key}") for head, where, key in MAIN_COLUMNS}},
                   csv_dir, "bayes")]
    kinds = {}
    for name, info in res["train"].items():
        kinds.setdefault(name.rsplit("-s", 1)[0], []).append(info)
    lines += ["", "Fine-tuning (books validation accuracy of the kept epoch / last epoch's training loss, which includes the KL term; "
              "mean over the seeds trained): " + "; ".join(
                  f"{k}: {statistics.mean(max(i['val_accuracy']) for i in v):.3f} / {statistics.mean(i['train_loss'][-1] for i in v):.3g}"
                  f" ({len(v)} seed{'s' if len(v) > 1 else ''})" for k, v in kinds.items()) + "."]
    if res.get("dirichlet_models"):
        lines += _tau_table(res, csv_dir)
    if sweep:
        lines += ["", (f"Tau sweep (seed {sweep['seed']}, books validation, {st['n_val']} reviews; chosen: the smallest NLL of the sampled "
                       "predictive among the points with a learning rate of their own; the point at the network's learning rate is the reference):"),
                  "", sweep_table(sweep, st["finetune"]["lr"], csv_dir)]
    for title, keys in (("accuracy / ECE / AUROC by entropy", ("accuracy", "ece", "auroc_entropy")),
                        ("NLL / Brier / AUROC by mutual information", ("nll", "brier", "auroc_mi"))):
        per_domain = [{"method": m, **{f"{d}_{k}": _mean_of([r[d].get(k) for r in res["rows"] if r["method"] == m]) for d in TARGETS for k in keys}}
                      for m in methods]
        lines += ["", f"Per domain ({title}, mean over seeds; - = not defined for the method):", "",
                  table(per_domain, {"method": "{method}", **{d: _means(d, keys) for d in TARGETS}}, csv_dir, f"bayes-{'-'.join(keys)}")]
    if res.get("far_ood"):
        lines += _ood_tables(res, methods, csv_dir)
    if res.get("nv_choice"):
        lines += ["", "NV stdev_tau chosen per seed: " + ", ".join(f"seed {s}: {v['stdev_tau']}" for s, v in res["nv_choice"].items()) + "."]
    panels = {}
    for where in ("in-domain", "out-of-domain"):
        panels[where] = {m: (b[where]["confidence"], b[where]["accuracy"]) for m, b in res["reliability"].items() if "+ TS" not in m}
    name = line_panels(panels, fig_dir / "bayes_reliability.png", xlabel="confidence", ylabel="accuracy", diagonal=True, width=5.0).name
    lines += ["", f"![reliability diagrams, first seed, no temperature scaling](figures/{name})", "", reading(res), ""]
    return "\n".join(lines)


def _stat_of(res: dict, method: str, value: Callable[[dict], float | None]) -> tuple[float, float] | None:
    """``(mean, sd)`` over seeds of ``value(row)`` for ``method``."""
    return _stat(_per_seed(res, method, value))


def _verdict(vals: dict[str, tuple[float, float]], ours: list[str], higher: bool) -> tuple[str, tuple[float, float], str] | None:
    """``(best method, our best (mean, sd), verdict)``: "best", "within one sd of the best" or "behind the best"."""
    best = (max if higher else min)(vals, key=lambda m: vals[m][0])
    d = max((vals[m] for m in ours if m in vals), key=lambda v: v[0] if higher else -v[0], default=None)
    if d is None:
        return None
    gap = (vals[best][0] - d[0]) * (1 if higher else -1)
    return best, d, "best" if best in ours else ("within one sd of the best" if gap <= max(vals[best][1], d[1]) else "behind the best")


def reading(res: dict) -> str:
    """The paper's claim checked against the recorded rows: is attention-space inference (Dirichlet)
    competitive on calibration and OOD detection at no large cost in accuracy? Then OOD detection near
    vs far, and what the learnt posterior changes. Means over seeds; "competitive" = within the seed
    spread (one sd) of the best method, or better."""
    methods = list(dict.fromkeys(r["method"] for r in res["rows"]))
    base = [m for m in ("map", "mc-dropout", "ensemble", "nv-sample") if m in methods]
    ours = [m for m in methods if m.startswith("dirichlet-") and "+ TS" not in m and m != BROAD]
    parts, verdicts = [], []
    for key, domains, label, higher in (("accuracy", [SOURCE], "books accuracy", True), ("accuracy", TARGETS, "OOD accuracy", True),
                                         ("nll", TARGETS, "OOD NLL", False), ("ece", TARGETS, "OOD ECE", False),
                                         ("auroc_entropy", TARGETS, "OOD-detection AUROC (entropy)", True),
                                         ("auroc_mi", TARGETS, "OOD-detection AUROC (mutual information)", True)):
        vals = {m: _stat_of(res, m, _domain_mean(key, domains)) for m in base + ours}
        vals = {m: v for m, v in vals.items() if v is not None}
        got = _verdict(vals, ours, higher) if vals else None
        if got is None:
            continue
        best, d, verdict = got
        parts.append(f"{label}: best {best} {vals[best][0]:.3f}, Dirichlet {d[0]:.3f} ({verdict})")
        verdicts.append(verdict)
    text = ("**Reading (the recorded run), without temperature scaling.** " + "; ".join(parts) + ". ")
    n_ok = sum(v != "behind the best" for v in verdicts)
    text += (f"Dirichlet attention is best or within one sd of the best on {n_ok} of {len(verdicts)} of these metrics "
             f"({sum(v == 'best' for v in verdicts)} best): ")
    text += ("competitive, as the paper claims, but not clearly better. " if n_ok == len(verdicts) else "not competitive everywhere. ")
    text += _near_far_reading(res, base, ours)
    pair = [_stat_of(res, m, _domain_mean(k, TARGETS)) for m in ("dirichlet-mean", "dirichlet-sample") for k in ("nll", "ece")]
    if all(pair):
        text += (f"Sampling the Dirichlet posterior at the network's learning rate changes little over its mean (OOD NLL {pair[0][0]:.3f} vs "
                 f"{pair[2][0]:.3f}, ECE {pair[1][0]:.3f} vs {pair[3][0]:.3f}, mean vs sample). ")
    text += _learnt_reading(res)
    ts = {m: _stat_of(res, m + " + TS", _domain_mean("ece", TARGETS)) for m in base + ours}
    ts = {m: v for m, v in ts.items() if v}
    if ts:
        text += "With temperature scaling (fitted on books validation), OOD ECE: " + ", ".join(f"{m} {v[0]:.3f}" for m, v in ts.items()) + ". "
    broad = _stat_of(res, BROAD, _domain_mean("accuracy", [SOURCE]))
    mp = _stat_of(res, "map", _domain_mean("accuracy", [SOURCE]))
    if broad and mp:
        text += (f"With the broad prior (prior_tau {BROAD_SPEC.prior_tau:g}) the Dirichlet model reaches books accuracy {broad[0]:.3f} (MAP {mp[0]:.3f})"
                 + (": near chance (0.5), the prior's pathology. " if broad[0] < 0.6 else ". "))
    return text


def _near_far_reading(res: dict, base: list[str], ours: list[str]) -> str:
    """OOD detection near vs far: the spread of AUROC by entropy over the methods, the best detector
    of each, where the Dirichlet rows stand, the energy score, and the checks that ``1 - max p`` ranks
    as entropy does and that temperature scaling changes no detection metric."""
    near, far = res.get("near_ood", TARGETS), res.get("far_ood")
    text = ""
    if not far or not any("detection" in r for r in res["rows"]):
        spread = [v[0] for v in (_stat_of(res, m, _domain_mean("auroc_entropy", TARGETS)) for m in base + ours) if v]
        if spread:
            text += f"OOD detection is weak for every method here (entropy AUROC {min(spread):.3f} to {max(spread):.3f}, 0.5 = chance). "
        return text
    cands = _detection_pairs(res, base + ours)
    for label, sets in (("Near OOD", near), ("Far OOD", far)):
        auroc = {(m, k): _stat_of(res, m, _detect_mean(k, "auroc", sets)) for m, k in cands}
        fpr = {(m, k): _stat_of(res, m, _detect_mean(k, "fpr95", sets)) for m, k in cands}
        ent = [auroc[(m, "entropy")][0] for m in base + ours if (m, "entropy") in auroc]
        best = max(auroc, key=lambda c: auroc[c][0])
        low = min(fpr, key=lambda c: fpr[c][0])
        by_method = {m: max((auroc[c] for c in cands if c[0] == m), key=lambda v: v[0]) for m in base + ours}
        got = _verdict(by_method, ours, True)
        text += (f"{label} ({len(sets)} sets): AUROC by entropy {min(ent):.3f} to {max(ent):.3f} over the methods; best detector "
                 f"{best[0]} by {SCORE_LABELS[best[1]]} (AUROC {auroc[best][0]:.3f}, AUPR "
                 f"{_stat_of(res, best[0], _detect_mean(best[1], 'aupr', sets))[0]:.3f}), lowest FPR@95%TPR {fpr[low][0]:.3f} "
                 f"({low[0]} by {SCORE_LABELS[low[1]]})")
        if got:
            text += f"; Dirichlet's best AUROC {got[1][0]:.3f} ({got[2]})"
        if ("map", "energy") in auroc:
            text += f"; the MAP model's energy score: AUROC {auroc[('map', 'energy')][0]:.3f}"
        text += ". "
    same = _max_gap(res, lambda r: r["method"], "maxp", "entropy")
    ts = _max_gap(res, lambda r: r["method"].removesuffix(" + TS"), None, None)
    if same is not None:
        text += (f"With two classes 1 - max p and entropy rank examples alike (largest difference of any detection metric between them "
                 f"{same:.1e}), ")
    if ts is not None:
        text += f"and temperature scaling changes no detection metric of theirs by more than {ts:.1e} (a monotone map of the same ranking). "
    return text


def _max_gap(res: dict, group: Callable[[dict], str], a: str | None, b: str | None) -> float | None:
    """The largest absolute difference of a detection metric: between scores ``a`` and ``b`` of the
    same row, or (``a`` None) between the rows with and without temperature scaling of each method,
    seed, score and set (``group`` maps a row to its method without the suffix)."""
    gaps = []
    if a is not None:
        for r in res["rows"]:
            det = r.get("detection", {})
            if a in det and b in det:
                gaps += [abs(det[a][s][k] - det[b][s][k]) for s in det[a] for k in det[a][s]]
    else:
        plain = {(r["method"], r["seed"]): r for r in res["rows"] if "+ TS" not in r["method"]}
        for r in res["rows"]:
            if "+ TS" in r["method"] and (group(r), r["seed"]) in plain:
                other = plain[(group(r), r["seed"])]["detection"]
                gaps += [abs(v[s][k] - other[sc][s][k]) for sc, v in r.get("detection", {}).items() for s in v for k in v[s]]
    return max(gaps) if gaps else None


def _learnt_reading(res: dict) -> str:
    """What the concentration scales learnt, what the sweep chose on validation, and the learnt
    posterior against the recorded one (tau at the network's learning rate) on test."""
    text = ""
    fixed = [x for name, t in res.get("tau", {}).items() if name.rsplit("-s", 1)[0] == dirichlet_name(None, D.prior_tau) for x in t]
    if fixed:
        moved = max(abs(x - res.get("tau_init", D.tau)) for x in fixed)
        text += (f"At the network's learning rate tau stays within {moved:.2g} of its initial {res.get('tau_init', D.tau):g} "
                 f"({min(fixed):.3g} to {max(fixed):.3g}, all layers and seeds)")
        text += ": the posterior's spread is set by its initial value. " if moved < 0.5 else ". "
    sweep, post = res.get("sweep"), res["settings"].get("posterior")
    if not (sweep and post):
        return text
    pts = sweep["points"]
    ref = next((p for p in pts if p["variational_lr"] is None and p["prior_tau"] == D.prior_tau), None)
    chosen = next(p for p in pts if (p["variational_lr"], p["prior_tau"]) == (post["variational_lr"], post["prior_tau"]))
    learnt_pts = [p for p in pts if p["variational_lr"] is not None]
    text += (f"Tau sweep (books validation, seed {sweep['seed']}): with a learning rate of its own tau ends between "
             f"{min(min(p['tau']) for p in learnt_pts):.3g} and {max(max(p['tau']) for p in learnt_pts):.3g}; the NLL of the sampled predictive "
             f"ranges from {min(p['nll_sample'] for p in learnt_pts):.4f} to {max(p['nll_sample'] for p in learnt_pts):.4f}")
    if ref:
        better = [p for p in learnt_pts if p["nll_sample"] < ref["nll_sample"]]
        text += (f" against {ref['nll_sample']:.4f} at the network's learning rate: {len(better)} of {len(learnt_pts)} learnt points "
                 f"are better on validation")
        if better:
            text += " (" + ", ".join(f"lr {p['variational_lr']:g} / prior_tau {p['prior_tau']:g}" for p in better) + ")"
    text += (f"; chosen: lr {chosen['variational_lr']:g}, prior_tau {chosen['prior_tau']:g} (tau {min(chosen['tau']):.3g} to "
             f"{max(chosen['tau']):.3g}). ")
    text += _sweep_mechanism(learnt_pts, res.get("tau_init", D.tau))
    comps = []
    checks = [("OOD NLL", "dirichlet-sample", _domain_mean("nll", TARGETS), False), ("OOD ECE", "dirichlet-sample", _domain_mean("ece", TARGETS), False),
              ("books accuracy (posterior mean)", "dirichlet-mean", _domain_mean("accuracy", [SOURCE]), True),
              ("near-OOD AUROC (MI)", "dirichlet-sample", _detect_mean("mi", "auroc", res.get("near_ood", TARGETS)), True)]
    if res.get("far_ood"):
        checks += [(f"far-OOD AUROC ({SCORE_LABELS[k]})", "dirichlet-sample", _detect_mean(k, "auroc", res["far_ood"]), True) for k in ("mi", "entropy")]
    for label, method, value, higher in checks:
        a, b = _stat_of(res, method, value), _stat_of(res, method + LEARNT, value)
        if a is None or b is None:
            continue
        diff = (b[0] - a[0]) * (1 if higher else -1)
        how = "no clear change" if abs(b[0] - a[0]) <= max(a[1], b[1]) else ("better" if diff > 0 else "worse")
        comps.append(f"{label} {a[0]:.3f} -> {b[0]:.3f} ({how})")
    if comps:
        text += "On test, the learnt posterior against the recorded one (sampled predictive unless noted; 'no clear change' = within one sd): " + "; ".join(comps) + ". "
        text += _optimiser_effect(res, post)
    pair = [_stat_of(res, m + LEARNT, _domain_mean("nll", TARGETS)) for m in ("dirichlet-mean", "dirichlet-sample")]
    if all(pair):
        text += f"Sampling the learnt posterior vs its mean: OOD NLL {pair[1][0]:.3f} vs {pair[0][0]:.3f}. "
    return text


def _optimiser_effect(res: dict, post: dict, still: float = 0.01) -> str:
    """When the chosen model's tau also stayed at its initial value (within ``still`` in every layer
    and seed), its rows differ from the recorded ones by the optimisation alone, not by a learnt
    posterior: say so, and name the optimiser's differences (:func:`parameter_groups`)."""
    stem, init = dirichlet_name(**post), res.get("tau_init", D.tau)
    taus = [x for name, t in res.get("tau", {}).items() if name.rsplit("-s", 1)[0] == stem for x in t]
    if not taus or max(abs(x - init) for x in taus) > still or post["prior_tau"] != init:
        return ""
    return (f"But tau ended within {max(abs(x - init) for x in taus):.2g} of its initial {init:g} in this model too (every layer and seed): "
            "with tau equal to prior_tau the posterior's concentrations are the centred prior's, the KL is (nearly) 0, and both models "
            "minimise the same loss with the same posterior. They differ only in the optimiser's set-up (tau's own group: its gradient "
            "clipped apart from the network's, no weight decay on log tau), which changes the training trajectory as another seed "
            "would. So these differences are run-to-run variation of fine-tuning, not the effect of a learnt posterior. ")


def _sweep_mechanism(points: list[dict], tau_init: float) -> str:
    """Why tau moves or not in the sweep, from its own numbers: with ``prior_tau`` equal to tau's initial
    value the centred prior makes the KL 0 for any attention and minimal in tau at the start (no KL
    gradient in tau); with another ``prior_tau`` the KL is large from the first step."""
    text = ""
    same = [p for p in points if p["prior_tau"] == tau_init]
    other = [p for p in points if p["prior_tau"] != tau_init]
    if same:
        moved = max(abs(x - tau_init) for p in same for x in p["tau"])
        text += (f"With prior_tau equal to tau's initial {tau_init:g}, the prior (centred on the deterministic attention) makes the KL 0 "
                 f"for any attention and minimal in tau at the start, so tau gets no gradient from it there and only the likelihood "
                 f"(through the sampled attention) moves it: by at most {moved:.2g}, even at learning rate {max(p['variational_lr'] for p in same):g}. ")
    if same and other:
        priors = ", ".join(sorted({format(p["prior_tau"], "g") for p in other}))
        loss = {k: [p["train_loss"][0] for p in ps] for k, ps in (("other", other), ("same", same))}
        acc = {k: [p["accuracy_mean"] for p in ps] for k, ps in (("other", other), ("same", same))}
        text += (f"With prior_tau {priors} the KL is large from the first step: first-epoch training loss {min(loss['other']):.3g} to "
                 f"{max(loss['other']):.3g} against {min(loss['same']):.3g} to {max(loss['same']):.3g}, and books validation accuracy "
                 f"{min(acc['other']):.3f} to {max(acc['other']):.3f} against {min(acc['same']):.3f} to {max(acc['same']):.3f} (chance: 0.5). ")
    return text

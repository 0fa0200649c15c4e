"""The "fit-knobs" section of docs/RESULTS.md from :func:`nvformer_studies.fitknobs.study.run_fit_study`:
the gain of every method per target with paired bootstrap intervals (docs/results/fit_knobs.csv), the
transfer of fitted knobs between targets (fit_knobs_transfer.csv), the gain against input length
(fit_knobs_length.csv), plots of the gains and of the fitted knobs, and a reading computed from the numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nvformer.metrics import paired_bootstrap

from ..common.docs import markdown_table, read_csv, write_csv
from ..common.plots import pyplot, save
from .study import FIT_METHODS, LABEL_FREE

__all__ = ["fit_rows", "fit_section", "length_rows", "transfer_rows"]



def _model(res: dict[str, Any]) -> str:
    """The model column of a classifier part: its setting (``finetuned`` / ``frozen``)."""
    return res["config"].get("setting", "finetuned")


def _correct(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(-1) == labels).double()


def fit_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (target, method) and per method over all targets (``target`` = ``mean``): test
    accuracy, its gain over the baseline in points with a paired bootstrap interval (per-target
    resampling for the mean), the in-domain (source test) change, forward equivalents and seconds."""
    cfg, lg, lab = res["config"], res["logits"], res["labels"]
    src, targets = cfg["source"], cfg["targets"]
    n = cfg["bootstrap"]
    by = {(r["method"], r["target"], r["domain"]): r for r in res["rows"]}
    methods = [m for m in FIT_METHODS if any(r["method"] == m for r in res["rows"])]
    model = _model(res)
    rows = []
    for m in methods:
        base_t, new_t, base_s, new_s = [], [], [], []
        for t in targets:
            a, b = _correct(lg[f"baseline|{t}|{t}"], lab[t]), _correct(lg[f"{m}|{t}|{t}"], lab[t])
            a_s, b_s = _correct(lg[f"baseline|{t}|{src}"], lab[src]), _correct(lg[f"{m}|{t}|{src}"], lab[src])
            base_t.append(a), new_t.append(b), base_s.append(a_s), new_s.append(b_s)
            ci = paired_bootstrap(a, b, n_resamples=n, seed=cfg["seed"])
            r = by[(m, t, t)]
            rows.append({"model": model, "target": t, "method": m, "metric": "accuracy", "unit": "points", "baseline": 100 * ci["a"],
                         "value": 100 * ci["b"], "gain": 100 * ci["diff"], "ci_low": 100 * ci["low"], "ci_high": 100 * ci["high"],
                         "in_domain_gain": 100 * float(b_s.mean() - a_s.mean()), "label_free": m in LABEL_FREE,
                         "forward_equivalents": r["forward_equivalents"], "seconds": r["seconds"]})
        ci = paired_bootstrap(base_t, new_t, n_resamples=n, seed=cfg["seed"])
        per = [r for r in rows if r["method"] == m]
        rows.append({"model": model, "target": "mean", "method": m, "metric": "accuracy", "unit": "points", "baseline": 100 * ci["a"],
                     "value": 100 * ci["b"], "gain": 100 * ci["diff"], "ci_low": 100 * ci["low"], "ci_high": 100 * ci["high"],
                     "in_domain_gain": sum(r["in_domain_gain"] for r in per) / len(per), "label_free": m in LABEL_FREE,
                     "forward_equivalents": sum(r["forward_equivalents"] for r in per) / len(per),
                     "seconds": sum(r["seconds"] for r in per) / len(per)})
    return rows


def transfer_rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """The ``fit-layer`` knobs fitted on one target, on every target's test split: accuracy gain in points."""
    lg, lab = res["logits"], res["labels"]
    out = []
    for r in res["transfer"]:
        t = r["target"]
        base = float(_correct(lg[f"baseline|{t}|{t}"], lab[t]).mean())
        out.append({"model": _model(res), "method": "fit-layer", "fitted_on": r["fitted_on"], "target": t, "unit": "points",
                    "gain": 100 * (r["accuracy"] - base), "ci_low": None, "ci_high": None, "own": r["fitted_on"] == t})
    return out


def length_rows(res: dict[str, Any], buckets: int = 4) -> list[dict[str, Any]]:
    """The gain of each method against input length: the target test examples pooled, ranked by
    token count (ties in example order) and cut into ``buckets`` equal-count buckets; accuracy
    gain in points per bucket, with the bucket's token range."""
    cfg, lg, lab = res["config"], res["logits"], res["labels"]
    lengths = torch.cat([torch.tensor(res["lengths"][t]) for t in cfg["targets"]])
    chunks = torch.argsort(lengths, stable=True).tensor_split(buckets)
    base = torch.cat([_correct(lg[f"baseline|{t}|{t}"], lab[t]) for t in cfg["targets"]])
    out = []
    for m in FIT_METHODS:
        if m == "baseline" or f"{m}|{cfg['targets'][0]}|{cfg['targets'][0]}" not in lg:
            continue
        new = torch.cat([_correct(lg[f"{m}|{t}|{t}"], lab[t]) for t in cfg["targets"]])
        for k, idx in enumerate(chunks):
            if idx.numel() == 0:
                continue
            out.append({"model": _model(res), "method": m, "bucket": k + 1, "tokens_from": int(lengths[idx].min()), "tokens_to": int(lengths[idx].max()),
                        "n": int(idx.numel()), "gain": 100 * float((new[idx] - base[idx]).mean())})
    return out


def _figures(res: dict[str, Any], rows: list[dict], fig_dir: Path) -> list[str]:
    """The gain per target, the fitted per-layer knobs and the per-head knobs; file names carry the
    model (``fit_knobs_gain.png`` for ``finetuned``, ``fit_knobs_gain_frozen.png`` ...)."""
    plt = pyplot()
    cfg = res["config"]
    tag = "" if _model(res) == "finetuned" else f"_{_model(res)}"
    targets = [*cfg["targets"], "mean"]
    methods = [m for m in FIT_METHODS if m != "baseline" and any(r["method"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    _gain_bars(ax, rows, methods, targets, capsize=1.5)
    ax.set(ylabel="test accuracy gain (points, 95% CI)", title=f"Gain over the unregularised model per target domain ({_model(res)})")
    ax.legend(fontsize=6, ncol=4)
    names = [save(fig, fig_dir / f"fit_knobs_gain{tag}.png").name]
    fits = [r for r in res["rows"] if r["method"] == "fit-layer" and r["domain"] == r["target"]]
    if fits:
        names.append(_layer_knobs_plot(fits, "fit-layer", fig_dir / f"fit_knobs_layers{tag}.png"))
    heads = [r for r in res["rows"] if r["method"] == "fit-head" and r["domain"] == r["target"] and r.get("head_knobs")]
    if heads:
        fig, axes = plt.subplots(2, len(heads), figsize=(2.2 * len(heads) + 1, 4.6), squeeze=False)
        for j, r in enumerate(heads):
            keys = list(r["head_knobs"])
            scale = {k: r["nats"][k] / r["knobs"][k]["alpha_tau"] if r["knobs"][k]["alpha_tau"] else 0.0 for k in keys}
            nats = [[a * scale[k] for a in r["head_knobs"][k]["alpha_tau"]] for k in keys]
            sds = [r["head_knobs"][k]["stdev_tau"] for k in keys]
            im0 = axes[0][j].imshow(nats, aspect="auto", cmap="viridis")
            im1 = axes[1][j].imshow(sds, aspect="auto", cmap="magma")
            axes[0][j].set_title(r["target"], fontsize=8)
            for ax, im in ((axes[0][j], im0), (axes[1][j], im1)):
                ax.set_yticks(range(len(keys)), keys if j == 0 else [], fontsize=6)
                ax.set_xlabel("head", fontsize=7)
                fig.colorbar(im, ax=ax, fraction=0.08)
        axes[0][0].set_ylabel("alpha_tau * s_alpha (nats)", fontsize=7)
        axes[1][0].set_ylabel("stdev_tau", fontsize=7)
        names.append(save(fig, fig_dir / f"fit_knobs_heads{tag}.png").name)
    return names


def _standing(gain: float, rivals: dict[str, float]) -> str:
    """Which rivals a mean gain is ahead of and which not, as a sentence."""
    ahead = [m for m, g in rivals.items() if gain > g]
    behind = [m for m in rivals if m not in ahead]
    return (f"Ahead of {', '.join(ahead)}" if ahead else "Ahead of none") + (f"; not ahead of {', '.join(behind)}. " if behind else ". ")


def _reading(rows: list[dict], transfer: list[dict], lengths: list[dict], model: str = "finetuned") -> str:
    """What the numbers of one classifier part say; the issue's goals are checked for ``finetuned``."""
    goals = model == "finetuned"
    mean = {r["method"]: r for r in rows if r["target"] == "mean"}
    per = lambda m: [r for r in rows if r["method"] == m and r["target"] != "mean"]  # noqa: E731
    text = [f"**Reading, `{model}` (the recorded run).** "]
    fits = [m for m in ("fit-site", "fit-layer", "fit-head", "fit-layer-length") if m in mean]
    if fits:
        best = max(fits, key=lambda m: mean[m]["gain"])
        b = mean[best]
        rivals = [m for m in ("wise", "control", "search") if m in mean]
        ahead = all(b["gain"] > mean[m]["gain"] for m in rivals)
        reached = b["gain"] >= 1.5 and b["ci_low"] > 0 and ahead and b["in_domain_gain"] >= -0.5
        text.append(f"With target labels, the best fitted method is {best}: mean gain {b['gain']:+.2f} points "
                    f"[{b['ci_low']:+.2f}, {b['ci_high']:+.2f}], in-domain change {b['in_domain_gain']:+.2f}; "
                    + ", ".join(f"{m} {mean[m]['gain']:+.2f}" for m in rivals) + ". "
                    + (f"The goal (+1.5 points, interval above 0, ahead of WiSE-FT and the control, in-domain cost at most 0.5) is "
                       f"{'reached' if reached else 'not reached'}. " if goals else _standing(b["gain"], {m: mean[m]["gain"] for m in rivals})))
    free = [m for m in ("fit-entropy", "fit-im") if m in mean]
    if free:
        best = max(free, key=lambda m: mean[m]["gain"])
        b = mean[best]
        worst = min(r["gain"] for r in per(best))
        tent_gain = mean["tent"]["gain"] if "tent" in mean else None
        reached = b["gain"] >= 0.5 and worst >= -0.5 and (tent_gain is None or b["gain"] > tent_gain)
        text.append(f"Label-free, the best is {best}: mean {b['gain']:+.2f} [{b['ci_low']:+.2f}, {b['ci_high']:+.2f}], worst target "
                    f"{worst:+.2f}" + ("" if tent_gain is None else f", TENT {tent_gain:+.2f}")
                    + f"; the label-free goal (+0.5, no target below -0.5, ahead of TENT) is {'reached' if reached else 'not reached'}"
                    + ("" if goals else " for this model") + ". ")
    if "fit-layer" in mean:
        secs = [r["seconds"] for r in per("fit-layer")]
        text.append(f"Fitting per layer took {min(secs):.0f}-{max(secs):.0f} s per target inside this run (its threads, sharing the "
                    "machine with whatever else ran; the cost goal, under 60 s on 2 cores, is checked alone by `benchmarks/fit_cost.py`, "
                    "docs/PERFORMANCE.md) and "
                    f"{mean['fit-layer']['forward_equivalents']:.0f} forward equivalents on average, against "
                    f"{mean['search']['forward_equivalents']:.0f} for the search. " if "search" in mean else "")
    if transfer:
        own = [r["gain"] for r in transfer if str(r["own"]) == "True"]  # a bool, or its CSV text
        other = [r["gain"] for r in transfer if str(r["own"]) != "True"]
        if own and other:
            text.append(f"Transfer: knobs fitted on a target gain {sum(own) / len(own):+.2f} points there on average and "
                        f"{sum(other) / len(other):+.2f} on the other targets. ")
    for m in ("fit-layer", "fit-layer-length"):
        fl = [r for r in lengths if r["method"] == m]
        if fl:
            text.append(f"By input length ({m}, pooled targets): " + ", ".join(
                f"{r['tokens_from']}-{r['tokens_to']} tokens {r['gain']:+.2f}" for r in fl) + ". ")
    if "fit-layer-length" in mean and "fit-layer" in mean:
        d = mean["fit-layer-length"]["gain"] - mean["fit-layer"]["gain"]
        text.append(f"The length-aware prior changes the mean gain by {d:+.2f} points against fit-layer"
                    f"{'' if d > 0 else ': it does not help here'}. ")
    return "".join(text)


_MAIN_COLUMNS = [("target", "{target}"), ("method", "{method}"), ("accuracy", "{value:.1f}"), ("gain", "{gain:+.2f}"),
                 ("95% CI", "[{ci_low:+.2f}, {ci_high:+.2f}]"), ("in-domain", "{in_domain_gain:+.2f}"),
                 ("forward equivalents", "{forward_equivalents:.0f}"), ("seconds", "{seconds:.1f}")]
_LM_COLUMNS = [("target", "{target}"), ("method", "{method}"), ("perplexity", "{value:.2f}"), ("baseline", "{baseline:.2f}"),
               ("change", lambda r: f"{100 * r['gain']:+.1f}%"), ("95% CI", lambda r: f"[{100 * r['ci_low']:+.1f}%, {100 * r['ci_high']:+.1f}%]"),
               ("WikiText (in-domain)", lambda r: "-" if r["in_domain_gain"] is None else f"{100 * r['in_domain_gain']:+.1f}%"),
               ("forward equivalents", "{forward_equivalents:.0f}"), ("seconds", "{seconds:.1f}")]
CSV_FIELDS = ("model", "target", "method", "metric", "unit", "baseline", "value", "gain", "ci_low", "ci_high", "in_domain_gain",
              "label_free", "forward_equivalents", "seconds")


def _lm_figures(rows: list[dict], fig_dir: Path) -> list[str]:
    """SmolLM2: the perplexity change per target for each method (95% intervals), and the knobs that
    ``fit-lm-unlabelled`` fitted per layer on each target (``fit_knobs_gain_smollm2.png``,
    ``fit_knobs_layers_smollm2.png``)."""
    plt = pyplot()
    methods = [m for m in FIT_METHODS if m != "baseline" and any(r["method"] == m for r in rows)] + \
        [m for m in dict.fromkeys(r["method"] for r in rows) if m not in FIT_METHODS]
    targets = list(dict.fromkeys(r["target"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 3.4))
    _gain_bars(ax, rows, methods, targets, scale=100.0, capsize=2)
    ax.set(ylabel="test perplexity change (%, 95% CI)", title="SmolLM2: perplexity change per target domain")
    ax.legend(fontsize=7)
    names = [save(fig, fig_dir / "fit_knobs_gain_smollm2.png").name]
    fits = [r for r in rows if r["method"] == "fit-lm-unlabelled" and r.get("knobs")]
    if fits:
        names.append(_layer_knobs_plot(fits, "fit-lm-unlabelled", fig_dir / "fit_knobs_layers_smollm2.png", short=True))
    return names


def _gain_bars(ax, rows: list[dict], methods: list[str], targets: list[str], scale: float = 1.0, capsize: float = 1.5) -> None:
    """One bar per (target, method) with its 95% interval: ``scale`` times the rows' ``gain`` (and
    ``ci_low`` / ``ci_high``), targets on the x axis, a method's missing targets left empty."""
    width = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        rs = {r["target"]: r for r in rows if r["method"] == m}
        ts = [t for t in targets if t in rs]
        xs = [targets.index(t) + (j - len(methods) / 2 + 0.5) * width for t in ts]
        err = [[scale * (rs[t]["gain"] - rs[t]["ci_low"]) for t in ts], [scale * (rs[t]["ci_high"] - rs[t]["gain"]) for t in ts]]
        ax.bar(xs, [scale * rs[t]["gain"] for t in ts], width, yerr=err, capsize=capsize, label=m, error_kw={"lw": 0.6})
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xticks(range(len(targets)), targets)


def _layer_knobs_plot(fits: list[dict], method: str, path: Path, short: bool = False) -> str:
    """The per-layer knobs of ``fits`` (rows with ``knobs`` and ``nats`` per layer), one line per target:
    the pseudo-count shift in nats and ``stdev_tau``; ``short``: layers labelled by their index only."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for r in fits:
        keys = list(r["knobs"])
        axes[0].plot(range(len(keys)), [r["nats"][k] for k in keys], "o-", ms=3, label=r["target"])
        axes[1].plot(range(len(keys)), [r["knobs"][k]["stdev_tau"] for k in keys], "o-", ms=3, label=r["target"])
    for ax in axes:
        ax.set_xticks(range(len(keys)), [k.rsplit(".", 1)[-1] for k in keys] if short else keys, fontsize=6 if short else 7)
        ax.set_xlabel("layer")
    axes[0].set(ylabel="alpha_tau * s_alpha (nats)", title=f"{method}: token pseudo-count shift")
    axes[1].set(ylabel="stdev_tau", title=f"{method}: token standard deviation")
    axes[0].legend(fontsize=6)
    return save(fig, path).name


def _lm_reading(rows: list[dict]) -> str:
    fits = [r for r in rows if r["method"] == "fit-lm-unlabelled"]
    search = [r for r in rows if r["method"] == "search"]
    if not fits:
        return ""
    sig = [r["target"] for r in fits if r["ci_high"] < 0]
    worse = [r["target"] for r in fits if r["ci_low"] > 0]
    text = (f"**Reading, SmolLM2 (the recorded run).** Knobs fitted on unlabelled target text lower the test perplexity significantly "
            f"(interval below 0) on {len(sig)} of {len(fits)} target domains ({', '.join(sig) or 'none'}); significantly higher on "
            f"{', '.join(worse) or 'none'}. The goal (a significant reduction on at least 4 of the 5) is "
            f"{'reached' if len(sig) >= 4 and len(fits) >= 5 else 'not reached'}. ")
    if search:
        sig_s = [r["target"] for r in search if r["ci_high"] < 0]
        text += f"The search: significant on {len(sig_s)} of {len(search)} ({', '.join(sig_s) or 'none'}). "
    return text


def _lm_transfer_lines(transfer: list[dict], info: dict, max_tokens: int) -> list[str]:
    """The LM transfer matrix (rows: the target the knobs were fitted on; columns: where they are applied,
    WikiText-2 last) and its reading."""
    from .lm import SOURCE

    fits = [r for r in transfer if r["method"] == "fit-lm-unlabelled"]
    if not fits:
        return []
    fitted, applied = list(dict.fromkeys(r["fitted_on"] for r in fits)), list(dict.fromkeys(r["target"] for r in fits))
    cell = {(r["fitted_on"], r["target"]): r for r in fits}

    def text(r: dict) -> str:
        mark = "*" if r["ci_high"] < 0 or r["ci_low"] > 0 else ""
        return f"{100 * r['gain']:+.1f}%{mark}"

    table = [{"fitted_on": f, **{d: text(cell[(f, d)]) if (f, d) in cell else "-" for d in applied}} for f in fitted]
    own = [r["gain"] for r in fits if str(r["own"]) == "True"]
    other = [r["gain"] for r in fits if str(r["own"]) != "True" and r["target"] != SOURCE]
    src = [r for r in fits if r["target"] == SOURCE]
    search_src = [r for r in transfer if r["method"] == "search" and r["target"] == SOURCE]
    worse = lambda rs: [r["fitted_on"] for r in rs if r["ci_low"] > 0]  # noqa: E731
    reading = (f"**Reading, SmolLM2 transfer (the recorded run).** Knobs fitted on a target change its own test perplexity by "
               f"{100 * sum(own) / len(own):+.1f}% on average and the other targets' by {100 * sum(other) / max(len(other), 1):+.1f}%. "
               f"On WikiText-2 (the in-domain text) the fitted knobs change the perplexity by {100 * sum(r['gain'] for r in src) / len(src):+.1f}% "
               f"on average (significantly worse for the knobs of {', '.join(worse(src)) or 'no target'})")
    if search_src:
        reading += (f", the search's choices by {100 * sum(r['gain'] for r in search_src) / len(search_src):+.1f}% (significantly worse: "
                    f"{', '.join(worse(search_src)) or 'none'})")
    better_src = [r["fitted_on"] for r in src if r["ci_high"] < 0]
    if len(better_src) > len(src) / 2:
        reading += (f". The knobs of {len(better_src)} of {len(src)} targets lower WikiText-2's perplexity significantly as well: what "
                    f"is fitted is largely not specific to the target domain; on these short units (at most {max_tokens} tokens) the "
                    "regularised model is the better language model of most domains measured, the source included")
    return ["", f"Transfer and in-domain cost, `smollm2` (`.venv/bin/python experiments/fit_knobs.py --models smollm2-transfer`; "
            f"{info['seconds'] / 60:.0f} min, {info['threads']} torch threads): the `fit-lm-unlabelled` knobs fitted on the row's target, "
            f"applied to each column's test units (WikiText-2: its test paragraphs, the source of the prior); test perplexity change "
            f"against the unregularised model, * where the paired 95% interval excludes 0 (every interval in "
            f"`docs/results/fit_knobs_transfer.csv`).", "",
            markdown_table(table, [("fitted on", "{fitted_on}"), *((d, "{" + d + "}") for d in applied)]),
            "", reading + "."]


def _classifier_lines(res: dict[str, Any], rows: list[dict], table_rows: list[dict], fig_dir: Path, csv_dir: Path | None,
                      transfer: list[dict], lengths: list[dict]) -> list[str]:
    cfg, model = res["config"], _model(res)
    n_val = cfg["n_val"] or 200
    what = ("all-MiniLM-L6-v2 fine-tuned on books (the sentiment study's)" if model == "finetuned" else
            f"the pretrained all-MiniLM-L6-v2 encoder as frozen mean-pooled features with a logistic-regression head fitted on the "
            f"books training split (L2 {res['head']['l2']:g} chosen on books validation, accuracy {res['head']['val_accuracy']:.3f}; "
            "no WiSE-FT: nothing was fine-tuned)")
    lines = ["", f"Model `{model}` (`.venv/bin/python experiments/fit_knobs.py --models {model}`; {res['info']['seconds'] / 60:.0f} min, "
             f"{res['info']['threads']} torch threads): {what}; {res['n_layers']} NV layers, empirical prior of {cfg['prior_examples']} "
             f"books training reviews, identity knobs. Data: the review domains (Blitzer et al. 2007; Ryu & Lee 2020), split seed "
             f"{cfg['split_seed']}; per target, the validation split ({n_val} reviews) is all a method sees: fitting methods fit on "
             f"{1 - cfg['holdout']:.0%} of it and choose the step on the rest ({cfg['steps']} Adam steps at most, lr {cfg['lr']}, patience "
             f"{cfg['patience']}; TENT lr {cfg['tent_lr']}), the search ({cfg['trials']} trials) and the choices of WiSE-FT and the control "
             f"use all of it; test: the target's test split (gain in points with a paired bootstrap 95% interval, {cfg['bootstrap']} "
             "resamples; `mean`: resampling within each target) and the books test split (in-domain change of the target's choice). "
             "Methods: `nvformer_studies.fitknobs.study`.", "", markdown_table(table_rows, _MAIN_COLUMNS)]
    for f in _figures(res, rows, fig_dir):
        lines += ["", f"![{f}](figures/{f})"]
    if transfer:
        lines += ["", f"Transfer, `{model}` (test accuracy gain in points of the `fit-layer` knobs fitted on the row's target):", "",
                  markdown_table(transfer, [("fitted on", "{fitted_on}"), ("target", "{target}"), ("gain", "{gain:+.2f}")])]
    if lengths:
        lines += ["", f"Gain against input length, `{model}` (target test examples pooled, four equal-count buckets by token count):", "",
                  markdown_table(lengths, [("method", "{method}"), ("tokens", "{tokens_from}-{tokens_to}"), ("examples", "{n}"),
                                           ("gain", "{gain:+.2f}")])]
    return lines + ["", _reading(rows, transfer, lengths, model)]


def fit_section(classifiers: list[dict[str, Any]], fig_dir: Path, csv_dir: Path | None = None, lm: dict[str, Any] | None = None,
                translation: dict[str, Any] | None = None) -> str:
    """The section's markdown from the classifier parts ``classifiers`` (:func:`~nvformer_studies.fitknobs.study.run_fit_study`,
    one per setting), the LM part ``lm`` (:func:`~nvformer_studies.fitknobs.lm.run_fit_lm`) and the translation part
    ``translation`` (:func:`~nvformer_studies.fitknobs.translation.run_fit_translation`); any may be missing. Figures go to
    ``fig_dir``; every table through ``csv_dir``: ``fit_knobs.csv`` holds every model's rows, ``fit_knobs_transfer.csv`` the
    transfer of fitted knobs (the classifiers' and, when ``lm["transfer"]`` holds
    :func:`~nvformer_studies.fitknobs.lm.run_lm_transfer`'s result, SmolLM2's, whose WikiText-2 column is also the
    in-domain change of the LM rows) and ``fit_knobs_length.csv`` the classifiers' gain against length."""
    parts = [(res, fit_rows(res), transfer_rows(res), length_rows(res)) for res in classifiers]
    lm_rows = list(lm["rows"]) if lm is not None else []
    lm_transfer = list(lm["transfer"]["rows"]) if lm is not None and lm.get("transfer") else []
    if lm_transfer:  # the in-domain cost of each LM choice: its WikiText-2 change
        from .lm import SOURCE

        src = {(r["method"], r["fitted_on"]): r["gain"] for r in lm_transfer if r["target"] == SOURCE}
        lm_rows = [{**r, "in_domain_gain": src.get((r["method"], r["target"]), 0.0 if r["method"] == "baseline" else None)} for r in lm_rows]
    mt_rows = list(translation["rows"]) if translation is not None else []
    every = [{k: r.get(k) for k in CSV_FIELDS} for r in [r for p in parts for r in p[1]] + lm_rows + mt_rows]
    transfer = [r for p in parts for r in p[2]] + lm_transfer
    lengths = [r for p in parts for r in p[3]]
    if csv_dir is not None:
        every = read_csv(write_csv(Path(csv_dir) / "fit_knobs.csv", every))
        if transfer:
            transfer = read_csv(write_csv(Path(csv_dir) / "fit_knobs_transfer.csv", transfer))
        if lengths:
            lengths = read_csv(write_csv(Path(csv_dir) / "fit_knobs_length.csv", lengths))
    lines = ["## Fitted knobs: gradient-fitted NV knobs against search, TENT, WiSE-FT and the control", "",
             "Command: `.venv/bin/python experiments/fit_knobs.py` (every part; `--models` runs some, the section shows every part saved "
             "in `runs/fit-knobs/`). Cost columns: forwards over one example (a training step counts 3 per example: forward and "
             "backward) and seconds on this machine."]
    for res, rows, _, _ in parts:
        m = _model(res)
        lines += _classifier_lines(res, rows, [r for r in every if r["model"] == m], fig_dir, csv_dir,
                                   [r for r in transfer if r["model"] == m], [r for r in lengths if r["model"] == m])
    if lm is not None:
        c = lm["config"]
        lines += ["", f"Model `smollm2` (`.venv/bin/python experiments/fit_knobs.py --models smollm2`; {lm['info']['seconds'] / 60:.0f} min, "
                  f"{lm['info']['threads']} torch threads): SmolLM2-135M-Instruct, the LM study's data (prior: {c['n_prior']} WikiText-2 "
                  f"paragraphs; per target {c['n_val']} validation and {c['n_test']} test units of at most {c['max_tokens']} tokens, seed "
                  f"{c['seed']}). `fit-lm-unlabelled`: one setting per layer fitted on the NLL of {1 - c['holdout']:.0%} of the "
                  f"validation text (no labels exist or are needed), the step chosen on the rest ({c['steps']} steps at most, lr "
                  f"{c['lr']}); `search`: {c['trials']} Optuna trials on the validation perplexity. Change: test perplexity relative to "
                  f"the unregularised model, paired bootstrap over units ({c['bootstrap']} resamples).", "",
                  markdown_table([r for r in every if r["model"] == "smollm2"], _LM_COLUMNS)]
        lines += [x for f in _lm_figures(lm_rows, fig_dir) for x in ("", f"![{f}](figures/{f})")]
        lines += ["", _lm_reading(lm_rows)]
        if lm_transfer:
            lines += _lm_transfer_lines([r for r in transfer if r["model"] == "smollm2"], lm["transfer"]["info"], c["max_tokens"])
    if translation is not None:
        from .translation import translation_lines

        lines += translation_lines(translation, [r for r in every if r["model"] == "marian"])
    return "\n".join(lines) + "\n"

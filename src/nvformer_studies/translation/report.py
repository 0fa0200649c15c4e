"""Tables, figure, reading and doc section of the translation study (docs/RESULTS.md section
"translation"), recomputed from the results dict of
:func:`~nvformer_studies.translation.study.run_translation_study` (``results.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..common.docs import table
from ..common.plots import interval_panels

__all__ = ["figure", "reading", "section", "study_markdown"]


def study_markdown(res: dict[str, Any], csv_dir: Path | None = None) -> str:
    """Markdown tables of a :func:`~nvformer_studies.translation.study.run_translation_study` result
    (identity check, then the search; through ``csv_dir/translation-identity.csv`` and
    ``csv_dir/translation.csv`` if given)."""
    cfg = res["config"]
    identity = [{"domain": d, "test_pairs": r["sentences"], "bleu_vs_original": r["bleu_vs_original"], "identical_fraction": r["identical_fraction"]}
                for d, r in res["identity"].items()]
    tuned = []
    for d, sites in res["tuned"].items():
        b = res["baseline"][d]
        for site, r in sites.items():
            tuned.append({"domain": d, "site": site, "dev_bleu_base": b["dev"]["bleu"], "dev_bleu_identity": r["identity_corner_dev_bleu"],
                          "dev_bleu_best": r["best_dev_bleu"], "alpha_tau": next(v for k, v in r["best_params"].items() if k.endswith("alpha_tau")),
                          "alpha_scale": r.get("alpha_scale", 1.0), "stdev_tau": next(v for k, v in r["best_params"].items() if k.endswith("stdev_tau")),
                          **{f"{m}_{k}": v for m in ("bleu", "chrf") for k, v in (("base", b["test"][m]), ("nv", r["test"][m]),
                                                                                  *((q, r["bootstrap"][m][q]) for q in ("diff", "low", "high")))}})
    lines = [
        table(identity, {"domain": "{domain}", "test pairs": "{test_pairs}", "NV@identity vs original: BLEU": "{bleu_vs_original:.2f}",
                         "identical outputs": lambda r: f"{100 * r['identical_fraction']:.1f}%"}, csv_dir, "translation-identity"),
        "",
        f"Knobs searched per (domain, site) on the dev subset ({cfg['trials']} Optuna TPE trials, seed {cfg['tune_seed']}, "
        f"alpha_tau * s in {tuple(cfg['alpha_range'])} with s = "
        + ("the site's smallest s_alpha" if cfg["alpha_scale"] == "s_alpha" else "1")
        + f", stdev_tau in {tuple(cfg['stdev_range'])}, objective greedy dev BLEU); test BLEU / chrF "
        f"of the chosen knobs, difference to the unregularised model with a {cfg['n_bootstrap']}-resample paired bootstrap "
        "95% interval. Dev BLEU: unregularised / the search's identity corner / best.",
        "",
        table(tuned, [("domain", "{domain}"), ("site", "{site}"),
                      ("dev BLEU", lambda r: f"{r['dev_bleu_base']:.2f} / {_fmt(r['dev_bleu_identity'])} / {r['dev_bleu_best']:.2f}"),
                      ("alpha_tau (x s)", lambda r: f"{r['alpha_tau']:.4g} ({r['alpha_tau'] * r['alpha_scale']:.2f})"), ("stdev_tau", "{stdev_tau:.3f}"),
                      ("test BLEU base", "{bleu_base:.2f}"), ("test BLEU NV", "{bleu_nv:.2f}"), ("diff [95% CI]", _ci("bleu")),
                      ("test chrF base", "{chrf_base:.2f}"), ("test chrF NV", "{chrf_nv:.2f}"), ("diff [95% CI]", _ci("chrf"))], csv_dir, "translation"),
    ]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    """A BLEU score with two decimals, ``-`` for None."""
    return "-" if value is None else f"{value:.2f}"


def _ci(metric: str) -> str:
    """The table cell of a bootstrap difference with its interval."""
    return f"{{{metric}_diff:+.2f}} [{{{metric}_low:+.2f}}, {{{metric}_high:+.2f}}]"


def reading(res: dict, train_pairs: int | None = None) -> str:
    """What the recorded run shows, recomputed from results.json (significant = 95% CI excludes 0)."""
    base = {d: b["test"] for d, b in res["baseline"].items()}
    levels = ", ".join(f"{d} {b['bleu']:.1f} / {b['chrf']:.1f}" for d, b in base.items())
    sig = {"up": [], "down": []}
    for d, sites in res["tuned"].items():
        for site, r in sites.items():
            for metric in ("bleu", "chrf"):
                b = r["bootstrap"][metric]
                tag = f"{d} {site} {'BLEU' if metric == 'bleu' else 'chrF'} {b['diff']:+.2f} [{b['low']:+.2f}, {b['high']:+.2f}]"
                if b["low"] > 0:
                    sig["up"].append(tag)
                elif b["high"] < 0:
                    sig["down"].append(tag)
    return ("**Reading (the recorded run).** Unregularised test BLEU / chrF: " + levels + ". Significant gains of the chosen knobs "
            "(CI above 0): " + ("; ".join(sig["up"]) or "none") + ". Significant losses (CI below 0): " + ("; ".join(sig["down"]) or "none")
            + ". The remaining (domain, site, metric) cells are indistinguishable from the unregularised model (often the search "
            "kept the identity corner). Knobs are chosen on dev BLEU of a small subset, so a dev gain need not carry to test."
            + _weak_domains(base, train_pairs))


def _weak_domains(base: dict, train_pairs: int | None) -> str:
    weak = [d for d, b in base.items() if b["bleu"] < 2.0]
    if not weak:
        return ""
    trained = f"{train_pairs} Koran verse pairs" if train_pairs else "Koran verses only"
    return (f" The model barely translates {', '.join(weak)} (test BLEU below 2: a model trained on {trained} has "
            "almost no vocabulary for these domains), so BLEU differences there are differences between near-zero scores; "
            "chrF, which credits partial words, is the more telling metric out of domain.")


def figure(res: dict, path: Path) -> Path:
    """Test BLEU and chrF differences (NV minus unregularised, 95% CI) per domain and site."""
    panels = {}
    for metric in ("bleu", "chrf"):
        series: dict[str, list] = {}
        for d, sites in res["tuned"].items():
            for site, r in sites.items():
                b = r["bootstrap"][metric]
                series.setdefault(f"{site} knobs", []).append((d, b["diff"], b["low"], b["high"]))
        panels[f"test {'BLEU' if metric == 'bleu' else 'chrF'}"] = series
    return interval_panels(panels, path, xlabel="NV - unregularised (95% CI)")


def section(res: dict, train_info: dict, command: str, root: Path, figure_name: str | None = None, csv_dir: Path | None = None) -> str:
    """The "translation" section of docs/RESULTS.md: ``res`` of :func:`~nvformer_studies.translation.study.run_translation_study`,
    ``train_info`` of the model's training, the ``command`` that ran it (paths shown relative to
    the repository ``root``), the figure's file name, tables through ``csv_dir`` if given."""
    cfg, tcfg = res["config"], res["config"]["train"]
    hist = train_info["history"]
    it = res["data"].get("it")
    model_dir = Path(res["model_dir"])
    model_dir = model_dir.relative_to(root) if model_dir.is_relative_to(root) else model_dir
    sizes = ", ".join(f"{d} {v['dev_pairs']}/{v['test_pairs']}" for d, v in res["data"].items())
    s_min = ", ".join(f"{k} {v:.3g}" for k, v in res["prior"].get("s_alpha_min", {}).items())
    lines = [
        "## Translation across domains (koran-trained Marian model)",
        "",
        f"Command: `{command}` ({res['seconds'] / 60:.0f} min for the study on {res['threads']} thread(s); training "
        f"{(train_info.get('seconds') or 0) / 60:.0f} min on {train_info.get('threads', '?')} thread(s), cached in `{model_dir}/`).",
        "",
        f"Model: `MarianMTModel` from a config, {res['model']['parameters'] / 1e6:.1f}M parameters (d_model {tcfg['d_model']}, "
        f"{tcfg['layers']}+{tcfg['layers']} layers, {tcfg['heads']} heads, FFN {tcfg['ffn']}, tied shared embeddings), byte-level BPE "
        f"with {res['model']['vocab']} subwords trained on the training pairs. Data: `mt-domains/koran/train` German-to-English, "
        f"{train_info.get('train_pairs')} pairs, of which {hist.get('dropped_long', 0)} with a side longer than {tcfg['max_length']} "
        f"tokens are left out; {tcfg['epochs']} epochs (seed {tcfg['seed']}); "
        f"checkpoint of epoch {hist['best_epoch'] + 1} by greedy BLEU on {tcfg['val_size']} koran dev pairs (split seed "
        f"{tcfg['split_seed']}; per epoch: {', '.join(f'{b:.1f}' for b in hist['val_bleu'])}).",
        "",
        f"Prior: {cfg['n_prior']} koran training pairs (seed {cfg['prior_seed']}); smallest s_alpha per site: {s_min}. "
        f"Dev/test subsets (pairs, seed {cfg['subset_seed']}; koran dev excludes the checkpoint-selection pairs): {sizes}. "
        f"Decoding: greedy (num_beams {cfg['num_beams']}), sources truncated to {cfg['max_length']} tokens.",
    ]
    if it is not None:
        lines += ["", f"`it/` mojibake: {it['repaired_lines_dev']} of {2 * it['dev_total']} dev lines and {it['repaired_lines_test']} of "
                      f"{2 * it['test_total']} test lines (German and English sides counted separately) were double- or triple-encoded "
                      "UTF-8 and are repaired on reading (`nvformer_studies.common.data.read_parallel`)."]
    lines += ["", "Equivalence check of the pipeline (NV model at `alpha_tau = 1e4` vs the original model, greedy test output):", "",
              study_markdown(res, csv_dir)]
    if figure_name:
        lines += ["", f"![test BLEU / chrF differences per domain and site](figures/{figure_name})"]
    used = train_info["train_pairs"] - hist.get("dropped_long", 0) if train_info.get("train_pairs") else None
    lines += ["", reading(res, used)]
    return "\n".join(lines)

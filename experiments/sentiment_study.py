"""The out-of-domain sentiment study at full budget -> docs/RESULTS.md ("ood-study" section).

    .venv/bin/python experiments/sentiment_study.py            # ~1.5 h on 2 CPU cores (+ ~12 min fine-tuning if not cached)
    .venv/bin/python experiments/sentiment_study.py --reuse    # redraw tables/plots from runs/study-full

Runs ``nvformer.study.run_study(StudyConfig.full())`` (see that module for the methods), saves
results.json / logits.pt / plots in runs/study-full, copies the plots to docs/figures/ and writes
the tables into docs/RESULTS.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "experiments"))

from identity import write_section  # noqa: E402

from nvformer.study import StudyConfig, StudyResult, headline, plot, run_study, summary_markdown  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "study-full"))
    parser.add_argument("--model", default=str(ROOT / "runs" / "minilm-books"))
    parser.add_argument("--reuse", action="store_true", help="load the saved results instead of running the study")
    parser.add_argument("--results", default=str(ROOT / "docs" / "RESULTS.md"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.reuse:
        result = StudyResult.load(out)
        plot(result, out)
    else:
        result = run_study(StudyConfig.full(model_dir=args.model), out)
    figures = ROOT / "docs" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for name in ("gains.png", "layers.png", "wise.png"):
        if (out / name).exists():
            shutil.copy(out / name, figures / f"ood_{name}")
    text = section(result)
    print(text)
    write_section(text, "ood-study", Path(args.results))


def section(result: StudyResult) -> str:
    c = result.config
    head = [
        "## Out-of-domain sentiment: NV post-training regularisation vs alternatives",
        "",
        "Command: `.venv/bin/python experiments/sentiment_study.py` "
        f"(the recorded run: {result.info['seconds'] / 60:.0f} min wall time on 2 CPU cores, partly shared with other jobs). Model: all-MiniLM-L6-v2 fine-tuned on books "
        "(see \"Source model\"); data: `reviews/` (Blitzer et al. 2007; airline, imdb, blog from Ryu & Lee 2020), every "
        f"domain split by `domain_splits(domain, seed={c['split_seed']})` (stratified 0.7/0.1/0.2): validation "
        f"{c['n_val'] or 200} and test {c['n_test'] or 400} reviews per domain, max {c['max_length']} tokens. Prior: "
        f"{c['prior_examples']} books training reviews. Searches: Optuna TPE (seed {c['seed']}) over alpha_tau in "
        f"{tuple(c['alpha_tau'])}, stdev_tau in {tuple(c['stdev_tau'])}; {c['trials']} trials (all layers one setting), "
        f"{c['layer_trials']} per single layer, {c['joint_trials']} for per-layer knobs; WiSE weights {tuple(c['wise'])} and 1. "
        f"Confidence intervals: paired bootstrap ({c['bootstrap']} resamples, within each target) of the mean over targets.",
        "",
        f"Headline: {headline(result)}",
        "",
        reading(result),
        "",
        summary_markdown(result),
    ]
    if any(r["setting"] == "frozen" for r in result.rows):
        head += ["### Frozen-feature setting", "",
                 f"Pretrained MiniLM, mean-pooled normalised features, logistic head fitted on books train "
                 f"(L2 {result.info['frozen_head']['l2']}, books validation accuracy {result.info['frozen_head']['val_accuracy']:.3f}).",
                 "", summary_markdown(result, "frozen")]
    head += ["![mean gains](figures/ood_gains.png)", "", "![per layer](figures/ood_layers.png)", "",
             "![WiSE-FT](figures/ood_wise.png)", ""]
    return "\n".join(head)


def reading(result: StudyResult) -> str:
    """What the recorded run shows (the numbers are recomputed from the saved results)."""
    from nvformer.study import _fmt_ci, _gain, in_domain_change

    t = list(result.config["targets"])
    n = result.config["bootstrap"]

    def g(setting, method):
        return _fmt_ci(_gain(result, setting, method, t, n=n))

    frozen = any(r["setting"] == "frozen" for r in result.rows)
    text = [
        "**Reading (the recorded run).** On the fine-tuned model nothing we tried without training moves mean "
        f"out-of-domain accuracy by more than a few tenths of a point: NV knobs tuned on each target's validation split "
        f"{g('fine-tuned', 'nv-target')} points, WiSE-FT {g('fine-tuned', 'wise-target')}, NV on top of WiSE-FT "
        f"{g('fine-tuned', 'wise+nv-target')}, the prior-only control {g('fine-tuned', 'control-target')}. Per target "
        "(first table), the chosen setting leaves test accuracy unchanged on most targets, several searches keeping the "
        "identity corner. "
        "The goal of +2 points is not reached. Knobs chosen on the source validation split alone are harmful out of domain "
        f"({g('fine-tuned', 'nv-source')}) although they cost nothing in domain "
        f"({(in_domain_change(result, 'fine-tuned', 'nv-source') or 0) * 100:+.1f}): books validation accuracy does not "
        "predict robustness. The label-free rule (information maximisation on unlabelled target text) kept the "
        "identity corner on every target: no setting tried scored higher than the unregularised model, so the rule is "
        "safe but selects nothing here. On the fine-tuned model the prior-only control is destructive in every layer, "
        "most in the last two, so with a strong fine-tuned baseline there is no gain to locate.",
    ]
    if frozen:
        text.append(
            "With *frozen* sentence features and a logistic head (a much weaker baseline) the probe's finding is "
            f"reproduced: the gain lives in the last layer (knobs on layer 5 only: {g('frozen', 'nv-layer-5')}; prior-only "
            f"control on layer 5: {g('frozen', 'control-layer-5')}), and the blunt control chosen over layers "
            f"({g('frozen', 'control-target')}) beats every NV knob search (all layers {g('frozen', 'nv-target')}, best "
            f"single layer {g('frozen', 'nv-best-layer')}), at an in-domain cost of "
            f"{(in_domain_change(result, 'frozen', 'control-target') or 0) * 100:+.1f} points against "
            f"{(in_domain_change(result, 'frozen', 'nv-best-layer') or 0) * 100:+.1f} for the best NV layer. "
            "So in this setting the variational machinery (the Gaussian posterior, the pseudo-count interpolation) adds "
            "nothing measurable over sending the last layers' attention to the source mean.")
    return "\n\n".join(text)


if __name__ == "__main__":
    main()

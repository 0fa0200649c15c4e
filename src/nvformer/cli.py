"""The ``nvformer`` command line."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nvformer", description="Nonparametric variational attention for Transformers")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="build an NV Transformer and print what it verifies")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--steps", type=int, default=150, help="training steps of the two small models")
    tune = sub.add_parser("tune", help="search the NV knobs of a fine-tuned review classifier on a target domain")
    tune.add_argument("--model", required=True, help="folder of a fine-tuned *ForSequenceClassification model and its tokenizer")
    tune.add_argument("--source", default="books", help="source domain (its train split gives the empirical prior)")
    tune.add_argument("--target", required=True, help="target domain: knobs chosen on its validation split, reported on its test split")
    tune.add_argument("--trials", type=int, default=50)
    tune.add_argument("--sites", default="all", help="'all' (one setting) or a comma list of sites tuned separately")
    tune.add_argument("--per-layer", action="store_true")
    tune.add_argument("--alpha-range", type=float, nargs=2, default=(-15.0, 10.0))
    tune.add_argument("--stdev-range", type=float, nargs=2, default=(0.0, 0.5))
    tune.add_argument("--sampler", choices=("tpe", "random"), default="tpe")
    tune.add_argument("--seed", type=int, default=0, help="sampler seed")
    tune.add_argument("--split-seed", type=int, default=0)
    tune.add_argument("--max-length", type=int, default=256)
    tune.add_argument("--storage", default=None, help="Optuna storage URL (default: SQLite file in --out)")
    tune.add_argument("--study", default=None, help="study name (default: SOURCE-to-TARGET)")
    tune.add_argument("--out", required=True, help="output folder: study.db, trials.csv, best.json, plots")
    study = sub.add_parser("study", help="the out-of-domain sentiment study (fine-tunes MiniLM on books once, then no training)")
    study.add_argument("--budget", choices=("demo", "full"), default="demo", help="demo: minutes; full: the docs/RESULTS.md budget")
    study.add_argument("--model", default="runs/minilm-books", help="fine-tuned classifier folder (created by fine-tuning if missing)")
    study.add_argument("--data", default=None, help="folder holding reviews/ (default: ../shared/data or $NVFORMER_DATA)")
    study.add_argument("--targets", default=None, help="comma list of target domains (default: all six)")
    study.add_argument("--out", default=None, help="output folder (default: runs/study-BUDGET)")
    study.add_argument("--seed", type=int, default=0, help="sampler seed")
    study.add_argument("--split-seed", type=int, default=0)
    ts = sub.add_parser("translate-study", help="the cross-domain translation study (trains the koran Marian model once, ~1 h on 2 cores)")
    ts.add_argument("--model", default="runs/marian-koran", help="checkpoint folder (trained and cached there if missing)")
    ts.add_argument("--out", default="runs/translation-study", help="output folder: results.json, summary.md, Optuna studies")
    ts.add_argument("--domains", default=None, help="comma list of target domains (default: koran,law,medical,it)")
    ts.add_argument("--sites", default=None, help="comma list of sites tuned separately (default: encoder,cross,decoder)")
    ts.add_argument("--n-dev", type=int, default=None, help="dev pairs per domain for the knob search")
    ts.add_argument("--n-test", type=int, default=None, help="test pairs per domain")
    ts.add_argument("--trials", type=int, default=None, help="Optuna trials per (domain, site)")
    ts.add_argument("--seed", type=int, default=0, help="sampler seed")
    args = parser.parse_args(argv)
    if args.command == "translate-study":
        return _translate_study(args)
    if args.command == "demo":
        from .demo import run

        return 0 if run(seed=args.seed, steps=args.steps) else 1
    if args.command == "tune":
        return _tune(args)
    if args.command == "study":
        return _study(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


def _tune(args) -> int:
    import json

    from .evaluate import KnobCache
    from .sentiment import accuracy_objective, metrics_report, prepare
    from .tune import KnobSpace, tune

    prep = prepare(args.model, args.source, args.target, seed=args.split_seed, max_length=args.max_length)
    cache = KnobCache(prep.model)  # memoised; layers before the first changed one are replayed
    sites = None if args.sites == "all" else tuple(s.strip() for s in args.sites.split(","))
    space = KnobSpace(sites=sites, per_layer=args.per_layer, alpha_tau=tuple(args.alpha_range), stdev_tau=tuple(args.stdev_range))
    res = tune(prep.model, accuracy_objective(prep.validation, cache), space=space, n_trials=args.trials, storage=args.storage,
               study_name=args.study or f"{args.source}-to-{args.target}", seed=args.seed, sampler=args.sampler,
               out_dir=args.out, report=metrics_report(prep.test, cache))
    print(json.dumps({"target": args.target, "identity_val_accuracy": res.identity_value, "best_val_accuracy": res.best_value,
                      "best_params": res.best_params, "test_metrics_of_best": res.best_report}, indent=2))
    return 0


def _study(args) -> int:
    import sys
    from pathlib import Path

    from .data import default_data_dir
    from .study import StudyConfig, headline, run_study, summary_markdown

    try:
        data = Path(args.data) if args.data else default_data_dir()
    except FileNotFoundError:
        data = Path("../shared/data")
    if not (data / "reviews").is_dir():
        print(f"nvformer study: no reviews/ folder under {data}. Point --data (or $NVFORMER_DATA) at the data folder "
              "that holds reviews/ (see ../shared/data/README.md).", file=sys.stderr)
        return 2
    kw = {"model_dir": args.model, "data_dir": str(data), "seed": args.seed, "split_seed": args.split_seed}
    if args.targets:
        kw["targets"] = tuple(t.strip() for t in args.targets.split(","))
    cfg = StudyConfig.demo(**kw) if args.budget == "demo" else StudyConfig.full(**kw)
    out = Path(args.out or f"runs/study-{args.budget}")
    result = run_study(cfg, out)
    print(summary_markdown(result))
    if cfg.frozen:
        print(summary_markdown(result, "frozen"))
    print(headline(result))
    print(f"({result.info['seconds']:.0f} s; tables, plots, results.json and logits.pt in {out}/)")
    return 0


def _translate_study(args) -> int:
    from dataclasses import replace

    from .mt import TranslationStudyConfig, run_translation_study, study_markdown

    over = {k: v for k, v in (("n_dev", args.n_dev), ("n_test", args.n_test), ("trials", args.trials)) if v is not None}
    if args.domains:
        over["domains"] = tuple(d.strip() for d in args.domains.split(","))
    if args.sites:
        over["sites"] = tuple(s.strip() for s in args.sites.split(","))
    cfg = replace(TranslationStudyConfig(tune_seed=args.seed), **over)
    res = run_translation_study(cfg, args.out, model_dir=args.model)
    print(study_markdown(res))
    print(f"({res['seconds'] / 60:.1f} min; results.json and summary.md in {args.out}/)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

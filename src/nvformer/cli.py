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
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        return 0 if run(seed=args.seed, steps=args.steps) else 1
    if args.command == "tune":
        return _tune(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


def _tune(args) -> int:
    import json

    from .sentiment import accuracy_objective, metrics_report, prepare
    from .tune import KnobSpace, tune

    prep = prepare(args.model, args.source, args.target, seed=args.split_seed, max_length=args.max_length)
    sites = None if args.sites == "all" else tuple(s.strip() for s in args.sites.split(","))
    space = KnobSpace(sites=sites, per_layer=args.per_layer, alpha_tau=tuple(args.alpha_range), stdev_tau=tuple(args.stdev_range))
    res = tune(prep.model, accuracy_objective(prep.validation), space=space, n_trials=args.trials, storage=args.storage,
               study_name=args.study or f"{args.source}-to-{args.target}", seed=args.seed, sampler=args.sampler,
               out_dir=args.out, report=metrics_report(prep.test))
    print(json.dumps({"target": args.target, "identity_val_accuracy": res.identity_value, "best_val_accuracy": res.best_value,
                      "best_params": res.best_params, "test_metrics_of_best": res.best_report}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

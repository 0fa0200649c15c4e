"""Bayesian attention and uncertainty (issues 8 and 17): Dirichlet attention vs MAP, MC dropout, NV
sampling, a deep ensemble, each with and without temperature scaling, on reviews with domain shift
(near OOD) and on text that is not a review (far OOD); the Dirichlet posterior learnt with its own
learning rate for tau, chosen by a sweep on books validation.

    # 1. the tau sweep (seed 0, books validation; cached in runs/bayes/), parts of the grid in parallel processes, each
    #    followed by fine-tuning (only) the models of a seed that do not depend on the choice; then choose
    .venv/bin/python experiments/bayes_study.py --sweep --prior-taus 10 --threads 1 --quiet   # the reference and 3 points
    .venv/bin/python experiments/bayes_study.py --sweep --prior-taus 3 --threads 1 --quiet    # 3 points
    .venv/bin/python experiments/bayes_study.py --train-only --posterior fixed --seeds 1 --threads 1 --quiet
    .venv/bin/python experiments/bayes_study.py --sweep                    # prints the sweep, writes runs/bayes/sweep.json (the choice)
    # 2. the study with the chosen posterior, one seed per process (cached in runs/bayes/logits-s1.safetensors, ...),
    #    then aggregate and write the section of docs/RESULTS.md (tables: docs/results/bayes*.csv)
    .venv/bin/python experiments/bayes_study.py --seeds 1 --threads 1 --quiet
    .venv/bin/python experiments/bayes_study.py
    .venv/bin/python experiments/bayes_study.py --reuse                    # rewrite the section from runs/bayes/results.json
    .venv/bin/python experiments/bayes_study.py --posterior fixed          # without the learnt-posterior rows (no sweep needed)
    .venv/bin/python experiments/bayes_study.py --smoke --sweep --out /tmp/bayes-smoke --no-results
    .venv/bin/python experiments/bayes_study.py --smoke --out /tmp/bayes-smoke --results /tmp/bayes-smoke/RESULTS.md

Model, data, methods and settings: the docstrings of ``nvformer_studies.uncertainty.study`` (the
study), ``.harness`` (the methods), ``.data`` (near and far OOD) and ``.sweep`` (the tau sweep); the
section (tables via docs/results/bayes*.csv): ``nvformer_studies.uncertainty.report``.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvformer_studies.common.scripts import doc_dirs, publish, script_parser, set_threads
from nvformer_studies.uncertainty.report import section, sweep_table
from nvformer_studies.uncertainty.study import POSTERIORS, run_bayes_study, settings
from nvformer_studies.uncertainty.sweep import run_tau_sweep

ROOT = Path(__file__).resolve().parents[1]


def _numbers(text: str | None, none: bool = False) -> list | None:
    """A comma list of numbers (``none`` allows the word "none" for None), or None if not given."""
    if text is None:
        return None
    return [None if none and x.strip().lower() == "none" else float(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, ROOT, run="bayes", no_results=True, reuse=True,
                           smoke=True, threads=True)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--seeds", default=None, help="comma list: only compute (and cache) these seeds; run again without it to aggregate")
    parser.add_argument("--train-only", action="store_true", help="only fine-tune (cached) the models of the seeds")
    parser.add_argument("--posterior", choices=POSTERIORS, default="learnt",
                        help="learnt: add the rows of the posterior the tau sweep chose (OUT/sweep.json); fixed: without them")
    parser.add_argument("--sweep", action="store_true", help="run the tau sweep (seed 0, books validation) and print it; the whole "
                        "grid writes the choice to OUT/sweep.json; the section is not written")
    parser.add_argument("--tau-lrs", default=None, help="with --sweep: only these learning rates of the grid (comma list; 'none' = the "
                        "network's), e.g. for parallel processes")
    parser.add_argument("--prior-taus", default=None, help="with --sweep: only these prior_tau values of the grid (comma list)")
    args = parser.parse_args(argv)
    if not args.sweep and (args.tau_lrs or args.prior_taus):
        parser.error("--tau-lrs and --prior-taus need --sweep")
    if args.sweep and (args.seeds or args.train_only or args.reuse):
        parser.error("--sweep runs seed 0 and fine-tunes and evaluates its points: no --seeds, --train-only or --reuse")
    set_threads(args)
    out = Path(args.out)
    if args.sweep:
        sweep = run_tau_sweep(out, smoke=args.smoke, variational_lrs=_numbers(args.tau_lrs, none=True), prior_taus=_numbers(args.prior_taus),
                              quiet=args.quiet)
        if sweep is not None:
            print(sweep_table(sweep, settings(args.smoke)["finetune"].lr))
            print(f"chosen: {sweep['choice']} ({out / 'sweep.json'})")
        return
    if args.reuse:
        res = json.loads((out / "results.json").read_text())
    else:
        seeds = None if args.seeds is None else [int(x) for x in args.seeds.split(",")]
        res = run_bayes_study(out, smoke=args.smoke, seeds=seeds, quiet=args.quiet, train_only=args.train_only, posterior=args.posterior)
    if res is None:
        return
    fig_dir, csv_dir = doc_dirs(args)
    publish(section(res, fig_dir, csv_dir), "bayes", args)


if __name__ == "__main__":
    main()

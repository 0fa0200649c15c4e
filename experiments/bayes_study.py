"""Bayesian attention and uncertainty (issue 8): Dirichlet attention vs MAP, MC dropout, NV sampling,
a deep ensemble, each with and without temperature scaling, on reviews with domain shift.

    .venv/bin/python experiments/bayes_study.py            # fine-tune (cached in runs/bayes/), evaluate, write RESULTS
    .venv/bin/python experiments/bayes_study.py --seeds 1 --threads 1   # one seed only (cached in runs/bayes/probs-s1.safetensors), e.g. in
                                                                        # parallel processes; then the plain command aggregates
    .venv/bin/python experiments/bayes_study.py --reuse    # rewrite the section from runs/bayes/results.json
    .venv/bin/python experiments/bayes_study.py --smoke --out runs/bayes-smoke --no-results

Model, data, methods and settings: the docstring of ``nvformer_studies.uncertainty.study`` (the
study) and ``nvformer_studies.uncertainty.harness`` (the methods); the section (tables via
docs/results/bayes*.csv): ``nvformer_studies.uncertainty.report``.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvformer_studies.common.scripts import doc_dirs, publish, script_parser, set_threads
from nvformer_studies.uncertainty.report import section
from nvformer_studies.uncertainty.study import run_bayes_study

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, ROOT, run="bayes", no_results=True, reuse=True,
                           smoke=True, threads=True)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--seeds", default=None, help="comma list: only compute (and cache) these seeds; run again without it to aggregate")
    parser.add_argument("--train-only", action="store_true", help="only fine-tune (cached) the models of the seeds")
    args = parser.parse_args(argv)
    set_threads(args)
    out = Path(args.out)
    if args.reuse:
        res = json.loads((out / "results.json").read_text())
    else:
        seeds = None if args.seeds is None else [int(x) for x in args.seeds.split(",")]
        res = run_bayes_study(out, smoke=args.smoke, seeds=seeds, quiet=args.quiet, train_only=args.train_only)
    if res is None:
        return
    publish(section(res, *doc_dirs(args, ROOT)), "bayes", args)


if __name__ == "__main__":
    main()

"""The NVAE study (issue 7): NVAE vs a plain Transformer autoencoder vs a pooled Gaussian VAE.

    .venv/bin/python experiments/nvae_study.py                 # train the three models (cached), evaluate, write RESULTS
    .venv/bin/python experiments/nvae_study.py --train-only    # only train / load runs/nvae/*
    .venv/bin/python experiments/nvae_study.py --reuse         # rewrite the section from runs/nvae/results.json
    .venv/bin/python experiments/nvae_study.py --smoke --out runs/nvae-smoke --no-results   # tiny end-to-end check

Data, models and training: the docstring of ``nvformer_studies.nvae.study``; the section (tables via
docs/results/nvae*.csv): ``nvformer_studies.nvae.report``.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvformer_studies.common.scripts import doc_dirs, publish, script_parser, set_threads
from nvformer_studies.nvae.report import section
from nvformer_studies.nvae.study import MODELS, run_nvae_study

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, ROOT, run="nvae", no_results=True, reuse=True,
                           smoke=True, threads=True)
    parser.add_argument("--train-only", action="store_true", help="only train (and cache) the models")
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of the models to train and evaluate")
    args = parser.parse_args(argv)
    set_threads(args)
    out = Path(args.out)
    if args.reuse:
        res = json.loads((out / "results.json").read_text())
    else:
        res = run_nvae_study(out, [n.strip() for n in args.models.split(",")], smoke=args.smoke, train_only=args.train_only)
        if res is None:
            return
    publish(section(res, out, *doc_dirs(args)), "nvae", args)


if __name__ == "__main__":
    main()

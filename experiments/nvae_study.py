"""The NVAE study (issue 7): NVAE vs a plain Transformer autoencoder vs a pooled Gaussian VAE.

    .venv/bin/python experiments/nvae_study.py                 # train the three models (cached), evaluate, write RESULTS
    .venv/bin/python experiments/nvae_study.py --train-only    # only train / load runs/nvae/*
    .venv/bin/python experiments/nvae_study.py --reuse         # rewrite the section from runs/nvae/results.json
    .venv/bin/python experiments/nvae_study.py --smoke --out runs/nvae-smoke --no-results   # tiny end-to-end check

Data, models and training: the docstring of ``nvformer_studies.nvae.study``; the section (tables via
docs/results/nvae*.csv): ``nvformer_studies.nvae.report``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from nvformer_studies.common.docs import write_section
from nvformer_studies.nvae.report import section
from nvformer_studies.nvae.study import MODELS, run_nvae_study

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "nvae"))
    parser.add_argument("--results", default=str(ROOT / "docs" / "RESULTS.md"))
    parser.add_argument("--no-results", action="store_true")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.reuse:
        res = json.loads((out / "results.json").read_text())
    else:
        res = run_nvae_study(out, [n.strip() for n in args.models.split(",")], smoke=args.smoke, train_only=args.train_only)
        if res is None:
            return
    results = Path(args.results)
    text = section(res, out, out / "figures" if args.no_results else ROOT / "docs" / "figures",
                   None if args.no_results else results.parent / "results")
    print(text)
    if not args.no_results:
        write_section(text, "nvae", results)


if __name__ == "__main__":
    main()

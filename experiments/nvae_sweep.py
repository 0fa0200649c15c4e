"""The NVAE sparsity sweep (issue 17): how many latent vectors an NVAE keeps, against reconstruction.

    .venv/bin/python experiments/nvae_sweep.py                        # train the sweep (cached in runs/nvae/), evaluate, write RESULTS
    .venv/bin/python experiments/nvae_sweep.py --models a,b --train-only --threads 1   # train a subset, e.g. in parallel processes
    .venv/bin/python experiments/nvae_sweep.py --reuse                # rewrite the section from runs/nvae/sweep.json
    .venv/bin/python experiments/nvae_sweep.py --smoke --out runs/nvae-smoke --no-results

Models: ``nvformer_studies.nvae.study.SWEEP`` (delta, lambda_D, kappa, annealing, prior pseudo-count;
the autoencoder and the pooled VAE as reference points), each trained as the NVAE study's models are
(same data, tokenizer and sizes; 6 epochs, half the study's budget, seed 0; cached in runs/nvae/sweep/). Evaluation: greedy
reconstructions of 500 WikiText-2 test sentences and 500 law sentences (split seed 0), with the
authors' evaluation threshold (pseudo-count <= 0.1 pruned). The section (tables via
docs/results/nvae_sweep.csv): ``nvformer_studies.nvae.report.sweep_section``.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvformer_studies.common.scripts import doc_dirs, publish, script_parser, set_threads
from nvformer_studies.nvae.report import sweep_section
from nvformer_studies.nvae.study import SWEEP, run_nvae_sweep

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, ROOT, run="nvae", no_results=True, reuse=True, smoke=True, threads=True)
    parser.add_argument("--train-only", action="store_true", help="only train (and cache) the models")
    parser.add_argument("--models", default=",".join(SWEEP), help="comma list of the sweep's models to train and evaluate")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.models.split(",")]
    unknown = [n for n in names if n not in SWEEP]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)} (the sweep's: {', '.join(SWEEP)})")
    set_threads(args)
    out = Path(args.out)
    if args.reuse:
        res = json.loads((out / "sweep.json").read_text())
    else:
        res = run_nvae_sweep(out, names, smoke=args.smoke, train_only=args.train_only)
        if res is None:
            return
    publish(sweep_section(res, *doc_dirs(args)), "nvae-sweep", args)


if __name__ == "__main__":
    main()

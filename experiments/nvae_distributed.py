"""One process vs two gloo processes (torchrun + Accelerate) training the same NVAE.

    .venv/bin/python experiments/nvae_distributed.py            # 2 seeds x {1, 2} processes, writes the "nvae-distributed" section
    .venv/bin/python experiments/nvae_distributed.py --reuse    # rewrite the section from runs/nvae-distributed/*

What each run does and what is compared: the docstring of ``nvformer_studies.nvae.distributed``;
the section (table via docs/results/nvae-distributed.csv): ``nvformer_studies.nvae.report.distributed_section``.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvformer_studies.common.scripts import doc_dirs, publish, script_parser
from nvformer_studies.nvae.distributed import run_distributed
from nvformer_studies.nvae.report import distributed_section

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, ROOT, run="nvae-distributed", reuse=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (each run on 1 and on 2 processes)")
    parser.add_argument("--epochs", type=int, default=4, help="training epochs of every run")
    args = parser.parse_args(argv)
    out = Path(args.out)
    res = json.loads((out / "results.json").read_text()) if args.reuse else run_distributed(out, args.seeds, args.epochs, ROOT)
    publish(distributed_section(res, *doc_dirs(args)), "nvae-distributed", args)


if __name__ == "__main__":
    main()

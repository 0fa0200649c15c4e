"""Knobs fitted by gradient (issue 18) against today's search, TENT, WiSE-FT and the prior-only control,
on the fine-tuned sentiment classifier and six target domains -> docs/RESULTS.md ("fit-knobs" section).

    .venv/bin/python experiments/fit_knobs.py                 # the study (fine-tunes runs/minilm-books first if missing)
    .venv/bin/python experiments/fit_knobs.py --reuse         # rewrite the section from runs/fit-knobs
    .venv/bin/python experiments/fit_knobs.py --smoke --out /tmp/fit-smoke --results /tmp/fit-smoke/RESULTS.md

Model, data, methods, budget: ``nvformer_studies.fitknobs.study`` (the docstring and ``FitStudyConfig``);
the section (tables via docs/results/fit_knobs*.csv): ``nvformer_studies.fitknobs.report``.
"""

from __future__ import annotations

from pathlib import Path

from nvformer_studies.common.scripts import doc_dirs, publish, script_parser, set_threads
from nvformer_studies.fitknobs.report import fit_section
from nvformer_studies.fitknobs.study import FitStudyConfig, load_fit_study, run_fit_study

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, ROOT, run="fit-knobs", no_results=True, reuse=True, smoke=True, threads=True)
    parser.add_argument("--model", default=str(ROOT / "runs" / "minilm-books"), help="the fine-tuned books classifier (fine-tuned there if missing)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    set_threads(args)
    out = Path(args.out)
    if args.reuse:
        res = load_fit_study(out)
    else:
        cfg = (FitStudyConfig.smoke if args.smoke else FitStudyConfig)(model_dir=args.model)
        res = run_fit_study(cfg, out, show_progress=not args.quiet)
    publish(fit_section(res, *doc_dirs(args)), "fit-knobs", args)


if __name__ == "__main__":
    main()

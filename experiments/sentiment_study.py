"""The out-of-domain sentiment study at full budget -> docs/RESULTS.md ("ood-study" section).

    .venv/bin/python experiments/sentiment_study.py            # ~1.5 h on 2 CPU cores (+ ~12 min fine-tuning if not cached)
    .venv/bin/python experiments/sentiment_study.py --reuse    # redraw tables/plots from runs/study-full

Runs ``nvformer_studies.sentiment.study.run_study(StudyConfig.full())`` (see that module for the
methods), saves results.json / logits.safetensors / plots in runs/study-full, copies the plots to
docs/figures/ and writes the tables (via docs/results/ood-study-*.csv) into docs/RESULTS.md.
"""

from __future__ import annotations

from pathlib import Path

from nvformer_studies.common.scripts import doc_dirs, publish, script_parser
from nvformer_studies.sentiment.report import copy_figures, section, write_outputs
from nvformer_studies.sentiment.study import StudyConfig, StudyResult, run_study

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, ROOT, run="study-full", reuse="load the saved results instead of running the study")
    parser.add_argument("--model", default=str(ROOT / "runs" / "minilm-books"), help="the fine-tuned books classifier (fine-tuned there if missing)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    result = StudyResult.load(out) if args.reuse else run_study(StudyConfig.full(model_dir=args.model), out)
    write_outputs(result, out)
    copy_figures(out, ROOT / "docs" / "figures")
    publish(section(result, doc_dirs(args)[1]), "ood-study", args)


if __name__ == "__main__":
    main()

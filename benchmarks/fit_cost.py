"""Issue 18's cost goal: fitting the knobs on 200 validation reviews with MiniLM, in seconds, alone on the machine.

    .venv/bin/python benchmarks/fit_cost.py                 # every target, site / layer / head; writes the "fit-cost" section
                                                            # of docs/PERFORMANCE.md and docs/results/fit_cost.csv (~10 min on 2 cores)
    .venv/bin/python benchmarks/fit_cost.py --targets dvd --groups layer
    .venv/bin/python benchmarks/fit_cost.py --quick         # a tiny budget on one target; prints only

Each fit is :func:`nvformer.fit_knobs` with the labels (``nll``) exactly as the fitted-knobs study runs it
(``nvformer_studies.fitknobs.study.time_fits``: the books classifier of ``--model`` converted at the identity
with the empirical prior of 256 books training reviews; per target the 200 validation reviews, 150 to fit
and 50 held out to choose the step and stop early; at most 50 Adam steps, lr 0.3, patience 3), timed by
``FitResult.seconds`` (the whole call, held-out measurements included) with nothing else in the process.
The study's own seconds column is measured while the study does everything else around it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from nvformer_studies.common.docs import markdown_table, read_csv, write_csv, write_section
from nvformer_studies.common.scripts import comma_choices, script_parser, set_threads
from nvformer_studies.fitknobs.study import FitStudyConfig, time_fits
from nvformer_studies.sentiment.study import TARGETS

ROOT = Path(__file__).resolve().parents[1]
GROUPS = ("site", "layer", "head")
GOAL_SECONDS = 60.0
_COLUMNS = [("target", "{target}"), ("groups", "{groups}"), ("examples", "{examples}"), ("steps", "{steps}"),
            ("forward equivalents", "{forward_equivalents:.0f}"), ("seconds", "{seconds:.1f}")]


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, ROOT, doc_file="PERFORMANCE.md", doc_option="--out", threads=True)
    parser.add_argument("--model", default=str(ROOT / "runs" / "minilm-books"), help="the fine-tuned books classifier (fine-tuned there if missing)")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma list of target domains")
    parser.add_argument("--groups", default=",".join(GROUPS), help="comma list of knob groups to fit: site, layer, head")
    parser.add_argument("--quick", action="store_true", help="24 validation reviews, 3 steps, the first target only; prints only")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    given = " ".join(a for a in (sys.argv[1:] if argv is None else argv) if a != "--quiet")
    targets = comma_choices(parser, args.targets, TARGETS, "--targets")
    groups = comma_choices(parser, args.groups, GROUPS, "--groups")
    set_threads(args)
    cfg = FitStudyConfig(model_dir=args.model, targets=targets[:1] if args.quick else targets,
                         **(dict(n_val=24, steps=3, prior_examples=16) if args.quick else {}))
    rows = time_fits(cfg, groups, show_progress=not args.quiet)
    worst = max(r["seconds"] for r in rows)
    setting = f"CPU, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    if args.quick:
        print(markdown_table(rows, _COLUMNS))
        return
    rows = read_csv(write_csv(ROOT / "docs" / "results" / "fit_cost.csv", rows))
    text = "\n".join([
        "## Fitting the knobs: the cost of issue 18", "",
        f"Command: `.venv/bin/python benchmarks/fit_cost.py{' ' + given if given else ''}` ({setting}; nothing else in the process; "
        "details in its docstring). "
        f"One labelled `nvformer.fit_knobs` per target and knob group, as the fitted-knobs study runs it (all-MiniLM-L6-v2 "
        f"fine-tuned on books, 200 validation reviews of the target: 150 fitted, 50 held out; split seed {cfg.split_seed}). "
        "Table: `docs/results/fit_cost.csv`.", "",
        markdown_table(rows, _COLUMNS), "",
        f"The slowest fit took {worst:.1f} s; the goal (under {GOAL_SECONDS:.0f} s on 2 cores) is "
        f"{'met' if worst < GOAL_SECONDS else 'not met'}.", ""])
    print(text)
    write_section(text, "fit-cost", Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

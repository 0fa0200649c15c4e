"""Knobs fitted by gradient (issue 18) against today's search, TENT, WiSE-FT and the prior-only control:
the fine-tuned sentiment classifier (``finetuned``) and frozen MiniLM features with a linear head
(``frozen``) on six target review domains, SmolLM2 on five text domains fitted on unlabelled target
text (``smollm2``; ``smollm2-transfer``: its fitted knobs on the other domains and on WikiText-2, the
in-domain cost), and the koran Marian translation model's three sites on law / medical / it
(``marian``) -> docs/RESULTS.md ("fit-knobs" section).

    .venv/bin/python experiments/fit_knobs.py                          # every part (fine-tunes runs/minilm-books and trains
                                                                       # runs/marian-koran first if missing)
    .venv/bin/python experiments/fit_knobs.py --models finetuned       # one part; the section shows every part saved in OUT
    .venv/bin/python experiments/fit_knobs.py --reuse                  # rewrite the section from runs/fit-knobs
    .venv/bin/python experiments/fit_knobs.py --smoke --out /tmp/fit-smoke --results /tmp/fit-smoke/RESULTS.md

A part stopped midway resumes with its next target when run again with the same settings (the
finished targets are kept in OUT/<part>/partial.safetensors, for marian OUT/marian.partial.json,
until the part ends).

Model, data, methods, budget: ``nvformer_studies.fitknobs.study`` (``FitStudyConfig``),
``nvformer_studies.fitknobs.lm`` (``FitLMConfig``) and ``nvformer_studies.fitknobs.translation``
(``FitMTConfig``); the section (tables via docs/results/fit_knobs*.csv):
``nvformer_studies.fitknobs.report``.
"""

from __future__ import annotations

import json
from pathlib import Path

from nvformer_studies.common.scripts import comma_choices, doc_dirs, publish, script_parser, set_threads
from nvformer_studies.fitknobs.lm import FitLMConfig, run_fit_lm, run_lm_transfer
from nvformer_studies.fitknobs.report import fit_section
from nvformer_studies.fitknobs.study import SETTINGS, FitStudyConfig, load_fit_study, run_fit_study
from nvformer_studies.fitknobs.translation import FitMTConfig, run_fit_translation

ROOT = Path(__file__).resolve().parents[1]
PARTS = (*SETTINGS, "smollm2", "smollm2-transfer", "marian")


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, ROOT, run="fit-knobs", no_results=True, reuse=True, smoke=True, threads=True)
    parser.add_argument("--models", default=",".join(PARTS), help="comma list of the parts to run: " + ", ".join(PARTS))
    parser.add_argument("--model", default=str(ROOT / "runs" / "minilm-books"), help="the fine-tuned books classifier (fine-tuned there if missing)")
    parser.add_argument("--marian", default=str(ROOT / "runs" / "marian-koran"), help="the koran translation model (trained there if missing)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    parts = comma_choices(parser, args.models, PARTS, "--models")
    out = Path(args.out)
    if "smollm2-transfer" in parts and "smollm2" not in parts and not args.reuse and not (out / "smollm2.json").exists():
        parser.error(f"--models smollm2-transfer needs the smollm2 part's {out / 'smollm2.json'}: run --models smollm2 first")
    set_threads(args)
    if not args.reuse:
        for setting in SETTINGS:
            if setting in parts:
                cfg = (FitStudyConfig.smoke if args.smoke else FitStudyConfig)(setting=setting, model_dir=args.model)
                run_fit_study(cfg, out / setting, show_progress=not args.quiet)
        out.mkdir(parents=True, exist_ok=True)
        if "smollm2" in parts:
            lm = run_fit_lm(FitLMConfig.smoke() if args.smoke else FitLMConfig(), show_progress=not args.quiet)
            (out / "smollm2.json").write_text(json.dumps(lm, indent=1, default=str))
        if "smollm2-transfer" in parts:
            lm = json.loads((out / "smollm2.json").read_text())
            cfg = FitLMConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in lm["config"].items()})
            (out / "smollm2_transfer.json").write_text(json.dumps(run_lm_transfer(cfg, lm, show_progress=not args.quiet), indent=1, default=str))
        if "marian" in parts:
            mt = run_fit_translation((FitMTConfig.smoke if args.smoke else FitMTConfig)(model_dir=args.marian), show_progress=not args.quiet,
                                     partial_dir=out)
            (out / "marian.json").write_text(json.dumps(mt, indent=1, default=str))
    classifiers = [load_fit_study(out / s) for s in SETTINGS if (out / s / "results.json").exists()]
    lm, mt = (json.loads((out / f).read_text()) if (out / f).exists() else None for f in ("smollm2.json", "marian.json"))
    if lm is not None and (out / "smollm2_transfer.json").exists():
        lm["transfer"] = json.loads((out / "smollm2_transfer.json").read_text())
    if not classifiers and lm is None and mt is None:
        parser.error(f"nothing saved in {out}: run without --reuse first")
    publish(fit_section(classifiers, *doc_dirs(args), lm=lm, translation=mt), "fit-knobs", args)


if __name__ == "__main__":
    main()

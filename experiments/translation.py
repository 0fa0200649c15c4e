"""Translation across domains with NV post-training regularisation (issue 6, translation half).

    .venv/bin/python experiments/translation.py                  # trains once (cached), then the study
    .venv/bin/python experiments/translation.py --train-only     # only train / load runs/marian-koran
    .venv/bin/python experiments/translation.py --time-steps 30  # only time 30 training steps (nothing saved)
    .venv/bin/python experiments/translation.py --smoke --model runs/marian-smoke --out runs/translation-smoke --no-results

1. Model: a Marian-architecture ``MarianMTModel`` built from a config (``nvformer_studies.translation.model.TranslationConfig``
   defaults: d_model 256, 3+3 layers, 4 heads, FFN 1024, tied shared embeddings, dropout 0.1; byte-level
   BPE, 8000 subwords shared by German and English, trained on the training pairs with ``tokenizers``),
   trained on ``../shared/data/mt-domains/koran/train.{de,en}`` German-to-English (17,982 pairs; the
   1.5% with a side longer than 96 tokens are left out; 10 epochs, AdamW 1e-3 with 500 warm-up
   steps then inverse square root, label smoothing 0.1, ~2048 padded tokens per batch, seed 0;
   checkpoint chosen by greedy BLEU on 500 koran dev pairs, a seeded permutation with seed 0). Cached in ``runs/marian-koran/`` (ignored by
   git) with ``nvformer_translation.json``; reused while the config matches. Training saves its state after every
   epoch (``training_state.safetensors``): stopped, the same command continues after the last finished epoch.
2. Study (``nvformer_studies.translation.study.run_translation_study``, ``TranslationStudyConfig`` defaults): prior from 2000
   koran training pairs (seed 0); conversion with ``alpha_tau = 1e4`` and the equivalence check (BLEU
   of the NV model's greedy output against the original model's, per domain, must be 100); then for
   each of koran, law, medical, it and each site (encoder, cross, decoder) separately, 12 Optuna TPE
   trials (seed 0) maximising greedy BLEU on 100 dev pairs, and test BLEU / chrF on 500 test pairs of
   the chosen knobs against the unregularised model with 1000-resample paired bootstrap intervals.
   Subsets are seeded (seed 0); koran's dev subset excludes the checkpoint-selection pairs.

Writes ``runs/translation-study/`` (results.json, summary.md, the Optuna studies and plots) and the
"translation" section of docs/RESULTS.md (tables via docs/results/translation*.csv).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from nvformer_studies.common.scripts import doc_dirs, publish, script_parser, set_threads
from nvformer_studies.translation.model import INFO_FILE, load_or_train, measure_training_speed
from nvformer_studies.translation.report import figure, section
from nvformer_studies.translation.study import SMOKE_STUDY, SMOKE_TRAIN, TranslationStudyConfig, run_translation_study, with_train

ROOT = Path(__file__).resolve().parents[1]
COMMAND = ".venv/bin/python experiments/translation.py"


def _relevant_args(argv: list[str]) -> list[str]:
    """The command-line arguments that change results (drops --results PATH / --no-results)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--results":
            skip = True
        elif not a.startswith("--results=") and a != "--no-results":
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, ROOT, run="translation-study", no_results=True, threads=True,
                           reuse="rewrite the section and figure from OUT/results.json without rerunning",
                           smoke="a tiny model and study (seconds; checks the command end to end)")
    parser.add_argument("--model", default=str(ROOT / "runs" / "marian-koran"), help="checkpoint folder (trained if missing)")
    parser.add_argument("--force", action="store_true", help="retrain even if a matching checkpoint exists")
    parser.add_argument("--train-only", action="store_true", help="only train (or load) the model")
    parser.add_argument("--time-steps", type=int, default=0, help="only time this many training steps of the model config (0: off)")
    parser.add_argument("--epochs", type=int, default=None, help="override the training epochs (a different cache key; none: the config's)")
    parser.add_argument("--n-dev", type=int, default=None, help="dev pairs per domain for the knob search (none: the study's)")
    parser.add_argument("--n-test", type=int, default=None, help="test pairs per domain (none: the study's)")
    parser.add_argument("--trials", type=int, default=None, help="Optuna trials per (domain, site) (none: the study's)")
    parser.add_argument("--domains", default=None, help="comma list (none: koran,law,medical,it)")
    parser.add_argument("--sites", default=None, help="comma list (none: encoder,cross,decoder)")
    args = parser.parse_args(argv)
    set_threads(args)
    cfg = TranslationStudyConfig()
    if args.smoke:
        cfg = replace(with_train(cfg, **SMOKE_TRAIN), **SMOKE_STUDY)
    if args.epochs:
        cfg = with_train(cfg, epochs=args.epochs)
    over = {k: v for k, v in (("n_dev", args.n_dev), ("n_test", args.n_test), ("trials", args.trials)) if v is not None}
    if args.domains:
        over["domains"] = tuple(d.strip() for d in args.domains.split(","))
    if args.sites:
        over["sites"] = tuple(s.strip() for s in args.sites.split(","))
    cfg = replace(cfg, **over)
    if args.time_steps:
        t0 = time.time()
        r = measure_training_speed(cfg.train, steps=args.time_steps)
        r["wall_seconds"] = time.time() - t0
        print(json.dumps(r, indent=2))
        return
    if args.reuse:
        res = json.loads((Path(args.out) / "results.json").read_text())
        info = json.loads((Path(res["model_dir"]) / INFO_FILE).read_text())
        write(res, info, res.get("command", COMMAND), args)
        return
    model, _, info = load_or_train(args.model, cfg.train, force=args.force)
    print(f"model: {info['parameters'] / 1e6:.1f}M parameters, best epoch {info['history']['best_epoch'] + 1}, "
          f"dev BLEU per epoch {info['history']['val_bleu']}")
    if args.train_only:
        return
    del model
    res = run_translation_study(cfg, args.out, model_dir=args.model)
    res["command"] = " ".join([COMMAND, *_relevant_args(argv if argv is not None else sys.argv[1:])])
    (Path(args.out) / "results.json").write_text(json.dumps(res, indent=2, default=str))
    write(res, info, res["command"], args)
    print(f"config: {json.dumps(asdict(cfg))}")


def write(res: dict, info: dict, command: str, args) -> None:
    """Print the section; unless ``--no-results``, draw the figure and write the section (and its
    tables' CSV files) next to the results file."""
    name = None
    if not args.no_results:
        name = figure(res, ROOT / "docs" / "figures" / "translation.png").name
    publish(section(res, info, command, ROOT, name, doc_dirs(args)[1]), "translation", args)


if __name__ == "__main__":
    main()

"""Fine-tune all-MiniLM-L6-v2 with a classification head on the `books` reviews (the source model).

    .venv/bin/python experiments/finetune_books.py            # ~10-15 min on 2 CPU cores; cached

Data: ../shared/data/reviews/books (Blitzer et al. 2007), 2000 reviews, split with
``nvformer_studies.sentiment.data.domain_splits("books", seed=0)`` (stratified, 0.7 / 0.1 / 0.2) into
train / validation / test, the splits of the sentiment study. Training:
``nvformer_studies.common.finetune.FinetuneConfig`` defaults (3 epochs, AdamW 5e-5, batch 16, max
256 tokens, seed 0). The checkpoint and its config go to ``runs/minilm-books/`` (ignored by git);
an existing checkpoint with the same config is reused. Writes the "Source model" section of
docs/RESULTS.md (books validation and test accuracy of the checkpoint; table via
docs/results/source-model.csv).
"""

from __future__ import annotations

from pathlib import Path

from nvformer_studies.common.finetune import FinetuneConfig
from nvformer_studies.common.scripts import doc_dirs, publish, script_parser
from nvformer_studies.sentiment.data import load_or_finetune
from nvformer_studies.sentiment.report import source_model_section

ROOT = Path(__file__).resolve().parents[1]
SPLIT_SEED = 0


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, ROOT, run="minilm-books")
    parser.add_argument("--force", action="store_true", help="retrain even if a matching checkpoint exists")
    args = parser.parse_args(argv)
    config = FinetuneConfig()
    model, tok, info = load_or_finetune(Path(args.out), "books", SPLIT_SEED, config, force=args.force)
    publish(source_model_section(model, tok, info, config, SPLIT_SEED, doc_dirs(args)[1]), "source-model", args)


if __name__ == "__main__":
    main()

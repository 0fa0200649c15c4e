"""Fine-tune all-MiniLM-L6-v2 with a classification head on the `books` reviews (the source model).

    .venv/bin/python experiments/finetune_books.py            # ~10-15 min on 2 CPU cores; cached

Data: ../shared/data/reviews/books (Blitzer et al. 2007), 2000 reviews, split with
``nvformer.sentiment.domain_splits("books", seed=0)`` (stratified, 0.7 / 0.1 / 0.2) into train /
validation / test, the same splits ``nvformer tune`` uses. Training: ``nvformer.train.FinetuneConfig`` defaults (3 epochs, AdamW 5e-5,
batch 16, max 256 tokens, seed 0). The checkpoint and its config go to ``runs/minilm-books/``
(ignored by git); an existing checkpoint with the same config is reused. Writes the "Source
model" section of docs/RESULTS.md (books validation and test accuracy of the checkpoint).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "experiments"))

from identity import write_section  # noqa: E402
from nvformer.sentiment import FRACTIONS, domain_splits, load_or_finetune  # noqa: E402
from nvformer.evaluate import TokenizedSet, predict_logits  # noqa: E402
from nvformer.metrics import classification_metrics  # noqa: E402
from nvformer.train import FinetuneConfig  # noqa: E402

SPLIT_SEED = 0


def books_splits():
    """(train, validation, test) of books: the same splits `nvformer tune` uses."""
    s = domain_splits("books", SPLIT_SEED)
    return s["train"], s["validation"], s["test"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "minilm-books"))
    parser.add_argument("--force", action="store_true", help="retrain even if a matching checkpoint exists")
    parser.add_argument("--results", default=str(ROOT / "docs" / "RESULTS.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    config = FinetuneConfig()
    model, tok, info = load_or_finetune(Path(args.out), "books", SPLIT_SEED, config, force=args.force)
    _, val, test = books_splits()
    rows = []
    for name, (texts, labels) in (("validation", val), ("test", test)):
        data = TokenizedSet.build(tok, texts, labels, batch_size=64, max_length=config.max_length)
        m = classification_metrics(predict_logits(model, data), data.labels)
        rows.append(f"| books {name} | {len(texts)} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | {m['nll']:.3f} | {m['ece']:.3f} |")
    text = "\n".join([
        "## Source model: all-MiniLM-L6-v2 fine-tuned on books",
        "",
        "Command: `.venv/bin/python experiments/finetune_books.py`. Data: `reviews/books` (Blitzer et al.",
        f"2007), stratified split {FRACTIONS} (train/validation/test) with seed {SPLIT_SEED}; training "
        f"{asdict(config)}; best epoch {info['best_epoch'] + 1} by validation accuracy "
        f"(per epoch: {', '.join(f'{a:.3f}' for a in info['val_accuracy'])}).",
        "",
        "| split | reviews | accuracy | macro-F1 | NLL | ECE |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
    ])
    print(text)
    write_section(text, "source-model", Path(args.results))


if __name__ == "__main__":
    main()

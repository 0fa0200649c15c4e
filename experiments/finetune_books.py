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
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "experiments"))

from identity import write_section  # noqa: E402
from nvformer.sentiment import FRACTIONS, domain_splits  # noqa: E402
from nvformer.evaluate import TokenizedSet, predict_logits  # noqa: E402
from nvformer.hf.checkpoints import load_minilm  # noqa: E402
from nvformer.metrics import classification_metrics  # noqa: E402
from nvformer.train import FinetuneConfig, finetune_classifier  # noqa: E402

SPLIT_SEED = 0


def books_splits():
    """(train, validation, test) of books: the same splits `nvformer tune` uses."""
    s = domain_splits("books", SPLIT_SEED)
    return s["train"], s["validation"], s["test"]


def load_or_train(out: Path, config: FinetuneConfig, force: bool = False):
    """The fine-tuned model and tokenizer (trained once, then loaded from ``out``)."""
    from transformers import AutoModelForSequenceClassification

    meta = {"config": asdict(config), "split_seed": SPLIT_SEED, "fractions": list(FRACTIONS), "base": "all-MiniLM-L6-v2"}
    _, tok = load_minilm()
    if not force and (out / "nvformer_finetune.json").exists() and json.loads((out / "nvformer_finetune.json").read_text())["meta"] == meta:
        return AutoModelForSequenceClassification.from_pretrained(out).eval(), tok, json.loads((out / "nvformer_finetune.json").read_text())
    (train, val, _) = books_splits()
    model, tok = load_minilm(head="classification")
    hist = finetune_classifier(model, tok, *train, *val, config=config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"meta": meta, "train_loss": hist.train_loss, "val_accuracy": hist.val_accuracy, "best_epoch": hist.best_epoch}
    (out / "nvformer_finetune.json").write_text(json.dumps(info, indent=2))
    return model.eval(), tok, info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "minilm-books"))
    parser.add_argument("--force", action="store_true", help="retrain even if a matching checkpoint exists")
    parser.add_argument("--results", default=str(ROOT / "docs" / "RESULTS.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())
    config = FinetuneConfig()
    model, tok, info = load_or_train(Path(args.out), config, args.force)
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

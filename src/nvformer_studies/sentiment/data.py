"""The review data of the sentiment studies (reviews in ../shared/data) and the fine-tuned source model.

Every domain is split with ``stratified_split(labels, (0.7, 0.1, 0.2), seed)`` into
train / validation / test (for target domains only validation and test are used). The source
model's empirical prior comes from its own training split.
"""

from __future__ import annotations

from pathlib import Path

from ..common.data import read_reviews
from ..common.subsets import stratified_split

FRACTIONS = (0.7, 0.1, 0.2)


def domain_splits(domain: str, seed: int = 0, data_dir=None) -> dict[str, tuple[list[str], list[int]]]:
    """``{"train", "validation", "test"}`` -> ``(texts, labels)`` of a review domain."""
    r = read_reviews(domain, data_dir)
    parts = stratified_split(r.labels, FRACTIONS, seed=seed)
    return {name: ([r.texts[i] for i in p], [r.labels[i] for i in p]) for name, p in zip(("train", "validation", "test"), parts)}


def load_classifier(model_dir: str | Path, source: str = "books", split_seed: int = 0, *, data_dir=None, show_progress: bool = True):
    """``(model, tokenizer, info)`` of a study's source classifier: a user's own classifier folder
    (``config.json`` without this project's fine-tuning record) loaded as it is, else
    :func:`load_or_finetune` (the project's books model, fine-tuned there if missing)."""
    given = Path(model_dir)
    if (given / "config.json").exists() and not (given / "nvformer_finetune.json").exists():
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        return AutoModelForSequenceClassification.from_pretrained(given).eval(), AutoTokenizer.from_pretrained(given), {"checkpoint": str(given)}
    return load_or_finetune(given, source, split_seed, data_dir=data_dir, show_progress=show_progress)


def load_or_finetune(out: str | Path, source: str = "books", split_seed: int = 0, config=None, *, force: bool = False,
                     data_dir=None, show_progress: bool = True):
    """``(model, tokenizer, info)``: all-MiniLM-L6-v2 with a classification head fine-tuned on the
    ``source`` train split (validation split for the best epoch), trained once and then loaded
    from ``out`` as long as the recorded training settings match.

    ``info`` holds the settings (``meta``), the per-epoch loss / validation accuracy and the best epoch.
    """
    import json
    from dataclasses import asdict

    from transformers import AutoModelForSequenceClassification

    from ..common.checkpoints import load_minilm
    from ..common.finetune import FinetuneConfig, finetune_classifier

    config = config or FinetuneConfig()
    out = Path(out)
    meta = {"config": asdict(config), "split_seed": split_seed, "fractions": list(FRACTIONS), "base": "all-MiniLM-L6-v2"}
    if source != "books":
        meta["source"] = source
    info_file = out / "nvformer_finetune.json"
    if not force and info_file.exists() and json.loads(info_file.read_text())["meta"] == meta:
        _, tok = load_minilm()
        return AutoModelForSequenceClassification.from_pretrained(out).eval(), tok, json.loads(info_file.read_text())
    splits = domain_splits(source, split_seed, data_dir)
    model, tok = load_minilm(head="classification", seed=config.seed)
    hist = finetune_classifier(model, tok, *splits["train"], *splits["validation"], config=config, show_progress=show_progress)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"meta": meta, "train_loss": hist.train_loss, "val_accuracy": hist.val_accuracy, "best_epoch": hist.best_epoch}
    info_file.write_text(json.dumps(info, indent=2))
    return model.eval(), tok, info

"""Cross-domain sentiment with NV post-training regularisation (reviews in ../shared/data).

Every domain is split with ``stratified_split(labels, (0.7, 0.1, 0.2), seed)`` into
train / validation / test (for target domains only validation and test are used). The source
model's empirical prior comes from its own training split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from nvformer.metrics import classification_metrics
from nvformer.tasks import TextBatches, classification_batches, predict_logits

from ..common.data import REVIEW_DOMAINS, read_reviews, stratified_split

FRACTIONS = (0.7, 0.1, 0.2)


def domain_splits(domain: str, seed: int = 0, data_dir=None) -> dict[str, tuple[list[str], list[int]]]:
    """``{"train", "validation", "test"}`` -> ``(texts, labels)`` of a review domain."""
    r = read_reviews(domain, data_dir)
    parts = stratified_split(r.labels, FRACTIONS, seed=seed)
    return {name: ([r.texts[i] for i in p], [r.labels[i] for i in p]) for name, p in zip(("train", "validation", "test"), parts)}


@dataclass
class Prepared:
    model: nn.Module
    validation: TextBatches
    test: TextBatches


def prepare(model_dir: str | Path, source: str, target: str, *, seed: int = 0, max_length: int = 256,
            prior_examples: int = 512, data_dir=None, show_progress: bool = True) -> Prepared:
    """Load a fine-tuned classifier, estimate its prior on ``source`` train text, convert it, and
    tokenise the ``target`` validation and test splits once."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from nvformer import convert, estimate_prior

    if source not in REVIEW_DOMAINS or target not in REVIEW_DOMAINS:
        raise ValueError(f"prepare: domains must be among {REVIEW_DOMAINS}, got {source!r}, {target!r}")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    src = domain_splits(source, seed, data_dir)["train"]
    prior_set = classification_batches(tok, src[0][:prior_examples], batch_size=32, max_length=max_length)
    priors = estimate_prior(model, prior_set.batches, show_progress=show_progress)
    convert(model, prior=priors, alpha_tau=1e4)
    tgt = domain_splits(target, seed, data_dir)
    return Prepared(
        model,
        classification_batches(tok, *tgt["validation"], batch_size=32, max_length=max_length),
        classification_batches(tok, *tgt["test"], batch_size=32, max_length=max_length),
    )


def _logits(model: nn.Module, data: TextBatches, cache) -> torch.Tensor:
    return predict_logits(model, data) if cache is None else cache.logits(data)


def accuracy_objective(data: TextBatches, cache=None):
    """``objective(model) -> accuracy`` on a tokenised split (forward passes only; through a
    :class:`nvformer.evaluate.KnobCache` of the same model if given)."""

    @torch.no_grad()
    def objective(model: nn.Module) -> float:
        return classification_metrics(_logits(model, data, cache), data.labels)["accuracy"]

    return objective


def metrics_report(data: TextBatches, cache=None):
    """``report(model) -> {accuracy, macro_f1, nll, ece}`` on the test split."""
    return lambda model: classification_metrics(_logits(model, data, cache), data.labels)


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
    model, tok = load_minilm(head="classification")
    hist = finetune_classifier(model, tok, *splits["train"], *splits["validation"], config=config, show_progress=show_progress)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"meta": meta, "train_loss": hist.train_loss, "val_accuracy": hist.val_accuracy, "best_epoch": hist.best_epoch}
    info_file.write_text(json.dumps(info, indent=2))
    return model.eval(), tok, info

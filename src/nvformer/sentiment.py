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

from .data import REVIEW_DOMAINS, read_reviews, stratified_split
from .evaluate import TokenizedSet, predict_logits
from .metrics import classification_metrics

FRACTIONS = (0.7, 0.1, 0.2)


def domain_splits(domain: str, seed: int = 0, data_dir=None) -> dict[str, tuple[list[str], list[int]]]:
    """``{"train", "validation", "test"}`` -> ``(texts, labels)`` of a review domain."""
    r = read_reviews(domain, data_dir)
    parts = stratified_split(r.labels, FRACTIONS, seed=seed)
    return {name: ([r.texts[i] for i in p], [r.labels[i] for i in p]) for name, p in zip(("train", "validation", "test"), parts)}


@dataclass
class Prepared:
    model: nn.Module
    validation: TokenizedSet
    test: TokenizedSet


def prepare(model_dir: str | Path, source: str, target: str, *, seed: int = 0, max_length: int = 256,
            prior_examples: int = 512, data_dir=None, show_progress: bool = True) -> Prepared:
    """Load a fine-tuned classifier, estimate its prior on ``source`` train text, convert it, and
    tokenise the ``target`` validation and test splits once."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from . import convert, estimate_prior

    if source not in REVIEW_DOMAINS or target not in REVIEW_DOMAINS:
        raise ValueError(f"prepare: domains must be among {REVIEW_DOMAINS}, got {source!r}, {target!r}")
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    src = domain_splits(source, seed, data_dir)["train"]
    prior_set = TokenizedSet.build(tok, src[0][:prior_examples], batch_size=32, max_length=max_length)
    priors = estimate_prior(model, prior_set.batches, show_progress=show_progress)
    convert(model, prior=priors, alpha_tau=1e4)
    tgt = domain_splits(target, seed, data_dir)
    return Prepared(
        model,
        TokenizedSet.build(tok, *tgt["validation"], batch_size=32, max_length=max_length),
        TokenizedSet.build(tok, *tgt["test"], batch_size=32, max_length=max_length),
    )


def accuracy_objective(data: TokenizedSet):
    """``objective(model) -> accuracy`` on a tokenised split (forward passes only)."""

    @torch.no_grad()
    def objective(model: nn.Module) -> float:
        return classification_metrics(predict_logits(model, data), data.labels)["accuracy"]

    return objective


def metrics_report(data: TokenizedSet):
    """``report(model) -> {accuracy, macro_f1, nll, ece}`` on the test split."""
    return lambda model: classification_metrics(predict_logits(model, data), data.labels)

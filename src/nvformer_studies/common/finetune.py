"""Fine-tuning a sequence classifier (the source-domain model of the post-training studies).

A plain, seeded AdamW loop with linear warm-up/decay, length-bucketed batches, a progress bar and
a per-epoch validation accuracy; the best epoch's weights are kept. CPU-sized: MiniLM on ~1400
reviews of 256 tokens takes a few minutes per epoch on 2 cores.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from nvformer._progress import progress
from nvformer.metrics import classification_metrics
from nvformer.tasks import classification_batches, predict_logits

__all__ = ["FinetuneConfig", "finetune_classifier"]


@dataclass(frozen=True)
class FinetuneConfig:
    epochs: int = 3
    lr: float = 5e-5
    weight_decay: float = 0.01
    batch_size: int = 16
    max_length: int = 256
    warmup: float = 0.1
    seed: int = 0


@dataclass
class FinetuneHistory:
    train_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    best_epoch: int = -1


def finetune_classifier(model: nn.Module, tokenizer, train_texts: list[str], train_labels: list[int], val_texts: list[str],
                        val_labels: list[int], config: FinetuneConfig = FinetuneConfig(), show_progress: bool = True,
                        extra_loss: Callable[[nn.Module], torch.Tensor] | None = None) -> FinetuneHistory:
    """Fine-tune ``model`` (a ``*ForSequenceClassification``) in place; returns the history.

    ``extra_loss(model)``, if given, is added to the classification loss after every forward
    (e.g. the KL term of an ELBO). The weights of the epoch with the best validation accuracy
    are restored at the end.
    """
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    train = classification_batches(tokenizer, train_texts, train_labels, batch_size=config.batch_size, max_length=config.max_length)
    val = classification_batches(tokenizer, val_texts, val_labels, batch_size=64, max_length=config.max_length)
    labels_by_batch = [train.labels[train.order[i * config.batch_size:(i + 1) * config.batch_size]] for i in range(len(train.batches))]
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    total = config.epochs * len(train.batches)
    warm = max(1, int(config.warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    hist = FinetuneHistory()
    best_acc, best_state = -1.0, None
    for epoch in range(config.epochs):
        model.train()
        losses = []
        for i in progress(torch.randperm(len(train.batches), generator=g).tolist(), f"epoch {epoch + 1}/{config.epochs}", show_progress):
            out = model(**train.batches[i], labels=labels_by_batch[i])
            loss = out.loss if extra_loss is None else out.loss + extra_loss(model)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
        hist.train_loss.append(sum(losses) / len(losses))
        acc = classification_metrics(predict_logits(model, val), val.labels)["accuracy"]
        hist.val_accuracy.append(acc)
        if acc > best_acc:
            best_acc, best_state, hist.best_epoch = acc, copy.deepcopy(model.state_dict()), epoch
    model.load_state_dict(best_state)
    model.eval()
    return hist

"""Fine-tuning a sequence classifier (the source-domain model of the post-training studies).

A plain, seeded AdamW loop with linear warm-up/decay, length-bucketed batches, a progress bar and
a per-epoch validation accuracy; the best epoch's weights are kept. CPU-sized: MiniLM on ~1400
reviews of 256 tokens takes a few minutes per epoch on 2 cores.

Variational parameters (Dirichlet attention's concentration scale, :func:`parameter_groups`) can
get a learning rate of their own: at the network's 5e-5 they barely move in a fine-tuning run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from nvformer._progress import progress
from nvformer.dirichlet.module import variational_parameters
from nvformer.metrics import classification_metrics
from nvformer.tasks import classification_batches, predict_logits

__all__ = ["FinetuneConfig", "FinetuneHistory", "clip_per_group", "finetune_classifier", "parameter_groups"]


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of :func:`finetune_classifier` (AdamW, linear warm-up over ``warmup`` of the steps,
    then linear decay to 0). Its ``asdict`` is the cache key of the studies' fine-tuned models, so
    a new setting that changes no recorded run is an argument of :func:`finetune_classifier`
    instead (``variational_lr``)."""

    epochs: int = 3
    lr: float = 5e-5
    weight_decay: float = 0.01
    batch_size: int = 16
    max_length: int = 256
    warmup: float = 0.1
    seed: int = 0


@dataclass
class FinetuneHistory:
    """Per epoch the mean training loss (extra loss included) and the validation accuracy; the kept epoch."""

    train_loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    best_epoch: int = -1


def clip_per_group(opt: torch.optim.Optimizer, max_norm: float) -> list[float]:
    """Clip the gradient norm of each parameter group of ``opt`` to ``max_norm`` separately (a
    large KL gradient of tau does not shrink the network's step); returns the norms before clipping."""
    return [float(torch.nn.utils.clip_grad_norm_(group["params"], max_norm)) for group in opt.param_groups]


def parameter_groups(model: nn.Module, config: FinetuneConfig, variational_lr: float | None = None) -> list[dict]:
    """The AdamW parameter groups of :func:`finetune_classifier`, each named (``"name"``).

    Without ``variational_lr``: one group ``"all"`` of every parameter at ``config.lr`` and
    ``config.weight_decay`` (the recorded runs). With it: the variational parameters
    (:func:`nvformer.dirichlet.module.variational_parameters`: each Dirichlet attention module's
    ``log_tau``) in a group ``"variational"`` at ``variational_lr`` without weight decay (decay
    would pull ``log tau`` to 0, i.e. ``tau`` to 1, a prior of its own), and the rest in a group
    ``"network"`` at ``config.lr`` and ``config.weight_decay``. Both follow the same warm-up and
    decay schedule, and :func:`finetune_classifier` clips the gradient norm of each group to 1
    separately (a large KL gradient of tau would otherwise shrink the network's step). A model
    without variational parameters with ``variational_lr`` is an error.
    """
    if variational_lr is None:
        return [{"name": "all", "params": list(model.parameters()), "lr": config.lr, "weight_decay": config.weight_decay}]
    if not variational_lr >= 0:
        raise ValueError(f"parameter_groups: `variational_lr` must be >= 0, got {variational_lr}")
    variational = variational_parameters(model)
    if not variational:
        raise ValueError("parameter_groups: `variational_lr` is given but the model has no variational parameters (no Dirichlet attention)")
    ids = {id(p) for _, p in variational}
    return [{"name": "network", "params": [p for p in model.parameters() if id(p) not in ids], "lr": config.lr,
             "weight_decay": config.weight_decay},
            {"name": "variational", "params": [p for _, p in variational], "lr": variational_lr, "weight_decay": 0.0}]


def finetune_classifier(model: nn.Module, tokenizer, train_texts: list[str], train_labels: list[int], val_texts: list[str],
                        val_labels: list[int], config: FinetuneConfig = FinetuneConfig(), show_progress: bool = True,
                        extra_loss: Callable[[nn.Module], torch.Tensor] | None = None, *,
                        variational_lr: float | None = None) -> FinetuneHistory:
    """Fine-tune ``model`` (a ``*ForSequenceClassification``) in place; returns the history.

    ``extra_loss(model)``, if given, is added to the classification loss after every forward
    (e.g. the KL term of an ELBO). ``variational_lr``: the learning rate of the variational
    parameters (:func:`parameter_groups`); None: they train with the network's. The weights of
    the epoch with the best validation accuracy are restored at the end.
    """
    g = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    train = classification_batches(tokenizer, train_texts, train_labels, batch_size=config.batch_size, max_length=config.max_length)
    val = classification_batches(tokenizer, val_texts, val_labels, batch_size=64, max_length=config.max_length)
    labels_by_batch = [train.labels[train.order[i * config.batch_size:(i + 1) * config.batch_size]] for i in range(len(train.batches))]
    opt = torch.optim.AdamW(parameter_groups(model, config, variational_lr))
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
            clip_per_group(opt, 1.0)
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

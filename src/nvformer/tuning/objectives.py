"""Objectives for fitting the knobs by gradient (:func:`nvformer.fit_knobs`): pure functions of a
model's logits, minimised.

* :func:`nll`: labelled; cross-entropy of classification logits, or the model's own ``loss``
  (a Hugging Face model given ``labels``: LM next-token NLL, seq2seq target NLL). For a causal LM,
  NLL on unlabelled target text is itself label-free.
* :func:`entropy`: label-free; mean entropy of the predictions (TENT, Wang et al. ICLR 2021).
* :func:`information_maximisation`: label-free; mean entropy minus the entropy of the mean
  prediction (SHOT, Liang et al. ICML 2020), which guards against collapse to one class.

Logits are ``[B, C]`` (one prediction per example) or ``[B, T, C]`` (one per token; ``mask [B, T]``
True = counted, e.g. the attention mask).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["OBJECTIVES", "entropy", "information_maximisation", "nll", "objective_from_outputs", "predictions"]


def predictions(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """The rows of log-probabilities that count: ``[M, C]`` from ``[B, C]`` or masked ``[B, T, C]`` logits (float32 at least)."""
    logp = F.log_softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, dim=-1)
    if logp.dim() == 2:
        return logp
    if logp.dim() != 3:
        raise ValueError(f"objective: logits must be [B, C] or [B, T, C], got {tuple(logits.shape)}")
    if mask is None:
        return logp.reshape(-1, logp.shape[-1])
    if tuple(mask.shape) != tuple(logp.shape[:2]):
        raise ValueError(f"objective: mask {tuple(mask.shape)} does not match logits {tuple(logits.shape)}")
    return logp[mask.bool()]


def nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of ``[B, C]`` logits against ``[B]`` class labels."""
    return F.cross_entropy(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, labels)


def entropy(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean entropy (nats) of the predictive distributions: ``-mean_i sum_c p_ic log p_ic``."""
    logp = predictions(logits, mask)
    return -(logp.exp() * logp).sum(-1).mean()


def information_maximisation(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean entropy minus the entropy of the mean prediction (minimised: confident and diverse)."""
    logp = predictions(logits, mask)
    p_mean = logp.exp().mean(0)
    marginal = -(p_mean * p_mean.clamp_min(1e-30).log()).sum()
    return -(logp.exp() * logp).sum(-1).mean() - marginal


OBJECTIVES = ("nll", "entropy", "information_maximisation")


def objective_from_outputs(name: str) -> Callable[[Any, Any], Tensor]:
    """``f(outputs, batch) -> scalar``: the named objective read from a model's outputs (``.loss`` /
    ``.logits`` or a logits tensor) and its batch (``labels``, ``attention_mask`` of a dict batch).

    ``nll`` uses ``outputs.loss`` when the model computed one (it was given ``labels``), else the
    cross-entropy of ``[B, C]`` logits against ``batch["labels"]``. The label-free objectives never
    read labels; for ``[B, T, C]`` logits they count the tokens of ``batch["attention_mask"]``.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"objective: unknown {name!r}; objectives are {OBJECTIVES} or a callable f(outputs, batch) -> scalar")

    def f(outputs: Any, batch: Any) -> Tensor:
        logits = outputs if isinstance(outputs, Tensor) else getattr(outputs, "logits", None)
        labels = batch.get("labels") if isinstance(batch, dict) else None
        if name == "nll":
            loss = getattr(outputs, "loss", None)
            if loss is not None:
                return loss
            if logits is None or labels is None or logits.dim() != 2:
                raise ValueError("objective 'nll': the model returned no loss, and the batch has no `labels` for [B, C] logits")
            return nll(logits, labels)
        if logits is None:
            raise ValueError(f"objective {name!r}: the model's output has no logits")
        mask = batch.get("attention_mask") if isinstance(batch, dict) and logits.dim() == 3 else None
        return (entropy if name == "entropy" else information_maximisation)(logits, mask)

    return f

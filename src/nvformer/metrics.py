"""Classification metrics (torchmetrics) and paired bootstrap confidence intervals.

* :func:`classification_metrics`: accuracy, macro-F1, NLL and expected calibration error (15 bins,
  L1) of logits against labels, via ``torchmetrics.functional`` (NLL via ``cross_entropy``).
* :func:`paired_bootstrap`: the confidence interval of a metric *difference* between two systems
  scored on the same examples, resampling examples (the same indices for both systems).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["classification_metrics", "paired_bootstrap", "METRICS"]

METRICS = ("accuracy", "macro_f1", "nll", "ece")


def _check(logits: Tensor, labels: Tensor) -> int:
    if logits.dim() != 2 or labels.dim() != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"metrics: need logits [N, C] and labels [N], got {tuple(logits.shape)} and {tuple(labels.shape)}")
    return logits.shape[1]


def classification_metrics(logits: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, float]:
    """``{accuracy, macro_f1, nll, ece}`` of ``logits [N, C]`` against integer ``labels [N]``."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error, multiclass_f1_score

    C = _check(logits, labels)
    logits, labels = logits.float(), labels.long()
    probs = logits.softmax(-1)
    return {
        "accuracy": float(multiclass_accuracy(probs, labels, num_classes=C, average="micro")),
        "macro_f1": float(multiclass_f1_score(probs, labels, num_classes=C, average="macro")),
        "nll": float(torch.nn.functional.cross_entropy(logits, labels)),
        "ece": float(multiclass_calibration_error(probs, labels, num_classes=C, n_bins=n_bins, norm="l1")),
    }


def paired_bootstrap(
    logits_a: Tensor,
    logits_b: Tensor,
    labels: Tensor,
    metric: str | Callable[[Tensor, Tensor], float] = "accuracy",
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Difference ``metric(b) - metric(a)`` with a paired percentile bootstrap interval.

    Returns ``{"diff", "low", "high"}``. Both systems are scored on the same resampled examples.
    """
    _check(logits_a, labels)
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"paired_bootstrap: the two systems' logits differ in shape: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    fn = metric if callable(metric) else (lambda lg, y: classification_metrics(lg, y)[metric])
    if not callable(metric) and metric not in METRICS:
        raise ValueError(f"paired_bootstrap: unknown metric {metric!r}; metrics are {METRICS}")
    g = torch.Generator().manual_seed(seed)
    n = labels.shape[0]
    diffs = []
    for _ in range(n_resamples):
        idx = torch.randint(0, n, (n,), generator=g)
        diffs.append(fn(logits_b[idx], labels[idx]) - fn(logits_a[idx], labels[idx]))
    d = torch.tensor(diffs, dtype=torch.float64)
    alpha = (1.0 - confidence) / 2
    return {
        "diff": fn(logits_b, labels) - fn(logits_a, labels),
        "low": float(torch.quantile(d, alpha)),
        "high": float(torch.quantile(d, 1 - alpha)),
    }


def per_example_scores(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """``{"accuracy": [N] 0/1 correct, "nll": [N] -log p(label)}`` (their means are the metrics)."""
    _check(logits, labels)
    logp = torch.log_softmax(logits.double(), -1)
    return {"accuracy": (logits.argmax(-1) == labels).double(), "nll": -logp.gather(-1, labels[:, None]).squeeze(-1)}


def paired_bootstrap_mean(
    scores_a: list[Tensor],
    scores_b: list[Tensor],
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Paired bootstrap of the difference of a *mean over groups* of per-example scores.

    ``scores_a[g]`` and ``scores_b[g]`` are ``[N_g]`` per-example scores of two systems on group
    ``g`` (e.g. one target domain; see :func:`per_example_scores`). The statistic is
    ``mean_g (mean(scores_b[g]) - mean(scores_a[g]))``; each resample redraws every group's examples
    (with replacement, within the group), the same draws for both systems. With one group this
    is :func:`paired_bootstrap` for a per-example metric. Returns ``{"diff", "low", "high"}``.
    """
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError(f"paired_bootstrap_mean: need the same non-zero number of groups, got {len(scores_a)} and {len(scores_b)}")
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(n_resamples, dtype=torch.float64)
    diff = 0.0
    for a, b in zip(scores_a, scores_b):
        if a.shape != b.shape or a.dim() != 1:
            raise ValueError(f"paired_bootstrap_mean: group scores must be equal-length vectors, got {tuple(a.shape)} and {tuple(b.shape)}")
        d = (b.double() - a.double())
        idx = torch.randint(0, d.numel(), (n_resamples, d.numel()), generator=g)
        total += d[idx].mean(1)
        diff += float(d.mean())
    k = len(scores_a)
    alpha = (1.0 - confidence) / 2
    total /= k
    return {"diff": diff / k, "low": float(torch.quantile(total, alpha)), "high": float(torch.quantile(total, 1 - alpha))}

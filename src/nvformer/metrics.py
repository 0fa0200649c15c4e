"""Classification metrics (torchmetrics) and paired bootstrap confidence intervals.

* :func:`classification_metrics`: accuracy, macro-F1, NLL and expected calibration error (15 bins,
  L1) of logits against labels, via ``torchmetrics.functional`` (NLL via ``cross_entropy``).
* :func:`paired_bootstrap`: the confidence interval of a metric *difference* between two systems
  scored on the same examples, resampling examples (the same indices for both systems).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["METRICS", "classification_metrics", "fit_temperature", "mutual_information", "ood_auroc", "paired_bootstrap",
           "predictive_entropy", "reliability_bins", "uncertainty_metrics"]

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


# ---------------------------------------------------------------------------------------------- predictive uncertainty


def _check_samples(probs: Tensor) -> Tensor:
    if probs.dim() != 3:
        raise ValueError(f"metrics: need predictive samples [S, N, C], got {tuple(probs.shape)}")
    return probs.double()


def predictive_entropy(probs: Tensor) -> Tensor:
    """``[N]`` entropy (nats) of the mean predictive ``p = mean_s probs[s]`` of samples ``[S, N, C]``."""
    p = _check_samples(probs).mean(0)
    return -(p * p.clamp_min(1e-300).log()).sum(-1)


def mutual_information(probs: Tensor) -> Tensor:
    """``[N]`` mutual information between prediction and parameters/attention (BALD):
    entropy of the mean predictive minus the mean entropy of the samples; 0 for one sample."""
    p = _check_samples(probs)
    mean_h = -(p * p.clamp_min(1e-300).log()).sum(-1).mean(0)
    return (predictive_entropy(probs) - mean_h).clamp_min(0.0)


def uncertainty_metrics(probs: Tensor, labels: Tensor, n_bins: int = 15) -> dict[str, float]:
    """Accuracy, NLL, Brier score and ECE of the mean predictive of samples ``[S, N, C]``.

    NLL and Brier are means over examples (Brier: ``sum_c (p_c - 1[y = c])^2``); accuracy and ECE
    (``n_bins`` equal-width confidence bins, L1) come from ``torchmetrics``.
    """
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_calibration_error

    p = _check_samples(probs).mean(0)
    C = _check(p, labels)
    labels = labels.long()
    onehot = torch.nn.functional.one_hot(labels, C).double()
    return {
        "accuracy": float(multiclass_accuracy(p.float(), labels, num_classes=C, average="micro")),
        "nll": float(-(p.gather(1, labels[:, None]).clamp_min(1e-300).log()).mean()),
        "brier": float(((p - onehot) ** 2).sum(-1).mean()),
        "ece": float(multiclass_calibration_error(p.float(), labels, num_classes=C, n_bins=n_bins, norm="l1")),
    }


def reliability_bins(probs: Tensor, labels: Tensor, n_bins: int = 10) -> dict[str, list[float]]:
    """Reliability diagram of the mean predictive: per equal-width confidence bin (non-empty
    bins only) the mean confidence, the accuracy and the count."""
    p = _check_samples(probs).mean(0)
    _check(p, labels)
    conf, pred = p.max(-1)
    correct = (pred == labels).double()
    idx = (conf * n_bins).long().clamp_max(n_bins - 1)
    out: dict[str, list[float]] = {"confidence": [], "accuracy": [], "count": []}
    for b in range(n_bins):
        m = idx == b
        if bool(m.any()):
            out["confidence"].append(float(conf[m].mean()))
            out["accuracy"].append(float(correct[m].mean()))
            out["count"].append(float(m.sum()))
    return out


def ood_auroc(score_in: Tensor, score_out: Tensor) -> float:
    """AUROC of telling out-of-domain (positive) from in-domain examples by an uncertainty
    score (higher = more uncertain), via ``torchmetrics``; 0.5 = chance."""
    from torchmetrics.functional.classification import binary_auroc

    scores = torch.cat([score_in, score_out]).double()
    target = torch.cat([torch.zeros(len(score_in)), torch.ones(len(score_out))]).long()
    return float(binary_auroc(scores, target))


def fit_temperature(logits: Tensor, labels: Tensor, grid: Tensor | None = None) -> float:
    """Temperature ``T`` minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017): a
    log-spaced grid search (0.05 to 20) refined by golden-section search on ``log T``."""
    _check(logits, labels)
    x, y = logits.double(), labels.long()

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(x / math.exp(log_t), y))

    grid = torch.linspace(math.log(0.05), math.log(20.0), 61) if grid is None else grid.log()
    vals = [nll(float(g)) for g in grid]
    k = int(torch.tensor(vals).argmin())
    lo, hi = float(grid[max(k - 1, 0)]), float(grid[min(k + 1, len(grid) - 1)])
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    for _ in range(40):
        c, d = b - g * (b - a), a + g * (b - a)
        if nll(c) < nll(d):
            b = d
        else:
            a = c
    return math.exp((a + b) / 2)

"""Metrics (thin wrappers over torchmetrics, imported on first use) and the paired bootstrap.

* :func:`classification_metrics`: accuracy, macro-F1, NLL and expected calibration error (15 bins,
  L1) of logits against labels, via ``torchmetrics.functional`` (NLL via ``cross_entropy``).
* :func:`paired_bootstrap`: the one bootstrap of the project: the confidence interval of a metric
  *difference* between two systems scored on the same examples, resampling examples (the same
  indices for both systems), for per-example scores, rows of statistics, ratios of sums, and
  means over groups (target domains).
* uncertainty metrics of predictive samples ``[S, N, C]``: NLL, Brier, ECE, reliability bins,
  predictive entropy, mutual information, temperature fitting.
* out-of-distribution detection by a score (higher = more likely OOD): :func:`ood_detection`
  (AUROC, AUPR and FPR at 95% TPR, OOD = positive class), :func:`ood_auroc`, and the scores
  :func:`max_prob_score` (``1 - max p``) and :func:`energy_score` (``-logsumexp`` of the logits).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["METRICS", "OOD_METRICS", "classification_metrics", "energy_score", "fit_temperature", "fpr_at_tpr", "max_prob_score",
           "mutual_information", "ood_auroc", "ood_detection", "paired_bootstrap", "predictive_entropy", "reliability_bins",
           "uncertainty_metrics"]

METRICS = ("accuracy", "macro_f1", "nll", "ece")
OOD_METRICS = ("auroc", "aupr", "fpr95")  # the keys of ood_detection


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
    a: Tensor | Sequence[Tensor],
    b: Tensor | Sequence[Tensor],
    statistic: Callable[[Tensor], float] | None = None,
    *,
    of_sums: bool = False,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Paired percentile bootstrap of ``statistic(b) - statistic(a)``: two systems scored on the same examples.

    Args:
        a, b: per-example statistics ``[N, ...]`` of the two systems (rows of the same examples),
            or two equal-length lists of such tensors, one per *group* (e.g. target domain): the
            statistic is then the mean over groups, and each resample redraws every group's
            examples within the group.
        statistic: rows ``[n, ...]`` -> float; default: the mean of 1-D scores. With ``of_sums``
            it takes the column sums ``[K]`` of the rows instead (ratios of sums such as perplexity
            or corpus BLEU), and resamples cost one matrix product.
        n_resamples, confidence, seed: resamples drawn with ``torch.Generator().manual_seed(seed)``,
            ``randint(0, N, (n_resamples, N))`` per group in order.

    Returns:
        ``{"a", "b", "diff", "low", "high"}``: the two statistics on all examples, their difference
        and its percentile interval.
    """
    groups_a, groups_b = ([a], [b]) if isinstance(a, Tensor) else (list(a), list(b))
    if len(groups_a) != len(groups_b) or not groups_a:
        raise ValueError(f"paired_bootstrap: need the same non-zero number of groups, got {len(groups_a)} and {len(groups_b)}")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_bootstrap: `confidence` must be in (0, 1), got {confidence}")
    g = torch.Generator().manual_seed(seed)
    total = torch.zeros(n_resamples, dtype=torch.float64)
    value_a = value_b = 0.0
    for xa, xb in zip(groups_a, groups_b):
        if xa.shape != xb.shape or xa.dim() == 0 or xa.shape[0] == 0:
            raise ValueError(f"paired_bootstrap: the two systems' statistics must have the same non-empty shape, got {tuple(xa.shape)} and {tuple(xb.shape)}")
        n = xa.shape[0]
        idx = torch.randint(0, n, (n_resamples, n), generator=g)
        if statistic is None:
            if xa.dim() != 1:
                raise ValueError(f"paired_bootstrap: the default statistic (mean) needs 1-D scores, got {tuple(xa.shape)}")
            d = xb.double() - xa.double()
            total += d[idx].mean(1)
            sa, sb = float(xa.double().mean()), float(xb.double().mean())
        elif of_sums:
            counts = torch.zeros(n_resamples, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
            ra, rb = xa.double().reshape(n, -1), xb.double().reshape(n, -1)
            sums_a, sums_b = counts @ ra, counts @ rb
            total += torch.tensor([statistic(y) - statistic(x) for x, y in zip(sums_a, sums_b)], dtype=torch.float64)
            sa, sb = float(statistic(ra.sum(0))), float(statistic(rb.sum(0)))
        else:
            total += torch.tensor([statistic(xb[i]) - statistic(xa[i]) for i in idx], dtype=torch.float64)
            sa, sb = float(statistic(xa)), float(statistic(xb))
        value_a += sa
        value_b += sb
    k = len(groups_a)
    total /= k
    alpha = (1.0 - confidence) / 2
    return {"a": value_a / k, "b": value_b / k, "diff": (value_b - value_a) / k,
            "low": float(torch.quantile(total, alpha)), "high": float(torch.quantile(total, 1 - alpha))}


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


def max_prob_score(probs: Tensor) -> Tensor:
    """``[N]`` ``1 - max_c p_c`` of the mean predictive of samples ``[S, N, C]``: the
    maximum-softmax-probability baseline (Hendrycks & Gimpel 2017) as an uncertainty score."""
    return 1.0 - _check_samples(probs).mean(0).max(-1).values


def energy_score(logits: Tensor) -> Tensor:
    """``[N]`` energy ``-logsumexp_c z_c`` of logits ``[N, C]`` (Liu et al. 2020; temperature 1):
    higher = more likely out of distribution. Unlike the softmax scores it reads the logits'
    magnitude, not only their differences."""
    if logits.dim() != 2:
        raise ValueError(f"energy_score: need logits [N, C], got {tuple(logits.shape)}")
    return -torch.logsumexp(logits.double(), -1)


def _detection_inputs(score_in: Tensor, score_out: Tensor, who: str) -> tuple[Tensor, Tensor]:
    """Scores of both groups as ranks in ``[0, 1]`` (equal scores, equal ranks) and the target (1 = OOD).

    ``torchmetrics`` reads scores outside ``[0, 1]`` as logits and squashes them with a sigmoid,
    which in floating point merges large scores (energies, logits) into ties; ranks keep exactly
    the order and the ties of the scores, and every rank-based metric is unchanged by them.
    """
    if score_in.dim() != 1 or score_out.dim() != 1 or not len(score_in) or not len(score_out):
        raise ValueError(f"{who}: need non-empty 1-D scores of both groups, got {tuple(score_in.shape)} and {tuple(score_out.shape)}")
    scores = torch.cat([score_in, score_out]).double()
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"{who}: the scores must be finite")
    _, rank = torch.unique(scores, sorted=True, return_inverse=True)
    target = torch.cat([torch.zeros(len(score_in)), torch.ones(len(score_out))]).long()
    return rank.double() / max(1, int(rank.max())), target


def fpr_at_tpr(score_in: Tensor, score_out: Tensor, tpr: float = 0.95) -> float:
    """False-positive rate at ``tpr`` true-positive rate of detecting out-of-distribution
    examples (the positive class) by ``score >= t`` (higher score = more likely OOD).

    Thresholds ``t`` run over the distinct scores (tied examples are always on the same side);
    the result is the FPR at the *largest* threshold whose TPR is at least ``tpr``, i.e. the
    smallest FPR any threshold reaches while flagging at least a fraction ``tpr`` of the OOD
    examples (at the smallest threshold every example is flagged and the FPR is 1, so that is
    not the one meant). 0 = perfect, 1 = every in-distribution example is flagged.
    """
    if not 0 < tpr <= 1:
        raise ValueError(f"fpr_at_tpr: `tpr` must be in (0, 1], got {tpr}")
    ranks, target = _detection_inputs(score_in, score_out, "fpr_at_tpr")
    order = torch.argsort(ranks, descending=True)
    r, t = ranks[order], target[order].double()
    last = torch.ones_like(r, dtype=torch.bool)
    last[:-1] = r[1:] != r[:-1]  # the last example of each group of equal scores: one threshold each
    tp, fp = t.cumsum(0)[last], (1 - t).cumsum(0)[last]
    reached = tp / tp[-1] >= tpr  # counts, divided in float64: exact at tpr = k / n_out
    return float(fp[int(torch.nonzero(reached)[0, 0])] / fp[-1])  # the TPR rises as the threshold falls: the first reaching tpr


def ood_detection(score_in: Tensor, score_out: Tensor) -> dict[str, float]:
    """How well a score (higher = more uncertain) tells out-of-distribution examples (the
    positive class) from in-distribution ones: ``{"auroc", "aupr", "fpr95"}``.

    * ``auroc``: area under the ROC curve (``torchmetrics`` ``binary_auroc``): the probability
      that a random OOD example scores higher than a random in-distribution one, ties counting
      one half; 0.5 = chance.
    * ``aupr``: area under the precision-recall curve with OOD as positive, as average precision
      (``binary_average_precision``: ``sum_n (R_n - R_{n-1}) P_n`` over the distinct thresholds);
      chance = the OOD fraction.
    * ``fpr95``: :func:`fpr_at_tpr` at 95% TPR (lower is better).

    ``torchmetrics`` computes the curves in float32, so AUROC and AUPR carry its rounding (~1e-7);
    the FPR is a ratio of counts in float64.
    """
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision

    scores, target = _detection_inputs(score_in, score_out, "ood_detection")
    return {"auroc": float(binary_auroc(scores, target)), "aupr": float(binary_average_precision(scores, target)),
            "fpr95": fpr_at_tpr(score_in, score_out, 0.95)}


def ood_auroc(score_in: Tensor, score_out: Tensor) -> float:
    """AUROC of telling out-of-domain (positive) from in-domain examples by an uncertainty
    score (higher = more uncertain), via ``torchmetrics``; 0.5 = chance (:func:`ood_detection`)."""
    from torchmetrics.functional.classification import binary_auroc

    return float(binary_auroc(*_detection_inputs(score_in, score_out, "ood_auroc")))


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

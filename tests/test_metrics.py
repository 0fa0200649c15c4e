"""Metrics against direct computations (classification, OOD detection); the paired bootstrap against direct resampling loops."""

import math

import pytest
import torch

from nvformer.metrics import classification_metrics, paired_bootstrap


def _direct(logits, labels, n_bins=15):
    p = logits.softmax(-1)
    conf, pred = p.max(-1)
    acc = (pred == labels).float().mean().item()
    f1s = []
    for c in range(logits.shape[1]):
        tp = ((pred == c) & (labels == c)).sum().item()
        fp = ((pred == c) & (labels != c)).sum().item()
        fn = ((pred != c) & (labels == c)).sum().item()
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    nll = -p[torch.arange(len(labels)), labels].log().mean().item()
    ece = 0.0
    edges = torch.linspace(0, 1, n_bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        inb = (conf > lo) & (conf <= hi)
        if inb.any():
            ece += inb.float().mean().item() * abs((pred[inb] == labels[inb]).float().mean().item() - conf[inb].mean().item())
    return {"accuracy": acc, "macro_f1": sum(f1s) / len(f1s), "nll": nll, "ece": ece}


@pytest.mark.parametrize("C", [2, 3])
def test_metrics_match_direct_computations(C):
    g = torch.Generator().manual_seed(C)
    logits = torch.randn(400, C, generator=g) * 2
    labels = torch.randint(0, C, (400,), generator=g)
    got, ref = classification_metrics(logits, labels), _direct(logits, labels)
    for k in ref:
        assert got[k] == pytest.approx(ref[k], abs=1e-5), k


def test_paired_bootstrap_of_a_row_statistic_equals_a_direct_resampling_loop():
    from nvformer.tasks import TASKS

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (500,), generator=g)
    a = torch.randn(500, 2, generator=g)
    b = a.clone()
    flip = torch.rand(500, generator=g) < 0.3  # b is right on 30% of the examples where a may err
    b[flip] = torch.nn.functional.one_hot(labels[flip], 2).float() * 5
    rows_a, rows_b = (torch.cat([x.double(), labels[:, None].double()], 1) for x in (a, b))
    accuracy = TASKS["classification"].metric("accuracy")
    same = paired_bootstrap(rows_a, rows_a, accuracy, n_resamples=200)
    assert (same["diff"], same["low"], same["high"]) == (0.0, 0.0, 0.0)
    r = paired_bootstrap(rows_a, rows_b, accuracy, n_resamples=400, seed=1)
    assert r["low"] < r["diff"] < r["high"] and r["low"] > 0
    assert r["a"] == pytest.approx(classification_metrics(a, labels)["accuracy"]) and r["diff"] == pytest.approx(r["b"] - r["a"])
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 500, (400, 500), generator=gen)
    diffs = torch.tensor([classification_metrics(b[i], labels[i])["accuracy"] - classification_metrics(a[i], labels[i])["accuracy"] for i in idx],
                         dtype=torch.float64)
    assert r["low"] == pytest.approx(torch.quantile(diffs, 0.025).item(), abs=1e-6)
    assert r["high"] == pytest.approx(torch.quantile(diffs, 0.975).item(), abs=1e-6)
    assert paired_bootstrap(rows_a, rows_b, accuracy, n_resamples=400, seed=1) == r


def test_paired_bootstrap_of_sums_equals_the_row_statistic_and_a_loop():
    """A ratio of sums (perplexity) resampled through counts equals the same statistic on resampled rows."""
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(1, 30, (80,), generator=g).double()
    a = torch.stack([tokens * (2 + torch.rand(80, generator=g, dtype=torch.float64)), tokens], 1)
    b = torch.stack([tokens * (2 + torch.rand(80, generator=g, dtype=torch.float64)), tokens], 1)

    def log_ppl(rows):
        return float(rows[:, 0].sum() / rows[:, 1].sum())

    summed = paired_bootstrap(a, b, lambda s: float(s[0] / s[1]), of_sums=True, n_resamples=300, seed=2)
    rows = paired_bootstrap(a, b, log_ppl, n_resamples=300, seed=2)
    for k in ("a", "b", "diff", "low", "high"):
        assert summed[k] == pytest.approx(rows[k], abs=1e-12), k
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 80, (300, 80), generator=gen)
    loop = torch.tensor([log_ppl(b[i]) - log_ppl(a[i]) for i in idx], dtype=torch.float64)
    assert summed["low"] == pytest.approx(torch.quantile(loop, 0.025).item(), abs=1e-12)


def test_paired_bootstrap_over_groups_is_the_mean_of_per_group_differences():
    g = torch.Generator().manual_seed(3)
    sa, sb = torch.rand(300, generator=g, dtype=torch.float64), torch.rand(300, generator=g, dtype=torch.float64) + 0.1
    s2a, s2b = torch.rand(120, generator=g, dtype=torch.float64), torch.rand(120, generator=g, dtype=torch.float64)
    one = paired_bootstrap([sa], [sb], n_resamples=300, seed=5)
    assert one == paired_bootstrap(sa, sb, n_resamples=300, seed=5)
    got = paired_bootstrap([sa, s2a], [sb, s2b], n_resamples=200, seed=1)
    gen = torch.Generator().manual_seed(1)
    i1 = torch.randint(0, 300, (200, 300), generator=gen)
    i2 = torch.randint(0, 120, (200, 120), generator=gen)
    stats = [((sb - sa)[i1[r]].mean() + (s2b - s2a)[i2[r]].mean()).item() / 2 for r in range(200)]
    assert got["diff"] == pytest.approx(((sb - sa).mean() + (s2b - s2a).mean()).item() / 2)
    assert got["low"] == pytest.approx(torch.quantile(torch.tensor(stats, dtype=torch.float64), 0.025).item())
    assert got["low"] < got["diff"] < got["high"]
    with pytest.raises(ValueError, match="same non-zero number"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="same non-empty shape"):
        paired_bootstrap(sa, s2a)
    with pytest.raises(ValueError, match="1-D"):
        paired_bootstrap(sa[:, None], sb[:, None])


# ------------------------------------------------------------------------------------------ OOD detection


def _direct_detection(s_in, s_out):
    """AUROC (pairs, ties 1/2), AUPR (average precision over distinct thresholds) and FPR at 95% TPR
    (the largest threshold t with TPR(score >= t) >= 0.95) by loops over examples and thresholds."""
    s_in, s_out = [float(x) for x in s_in], [float(x) for x in s_out]
    auroc = sum(1.0 if o > i else 0.5 if o == i else 0.0 for o in s_out for i in s_in) / (len(s_in) * len(s_out))
    ap, recall_prev, fpr95 = 0.0, 0.0, None
    for t in sorted(set(s_in + s_out), reverse=True):
        tp, fp = sum(o >= t for o in s_out), sum(i >= t for i in s_in)
        recall = tp / len(s_out)
        ap += (recall - recall_prev) * tp / (tp + fp)
        recall_prev = recall
        if fpr95 is None and recall >= 0.95:
            fpr95 = fp / len(s_in)
    return {"auroc": auroc, "aupr": ap, "fpr95": fpr95}


def test_ood_detection_on_a_hand_computed_example_with_ties():
    """In-distribution scores 0..8 with 5 twice; OOD: 19 at 5 (tied with in-distribution ones) and one at 0."""
    from nvformer.metrics import fpr_at_tpr, ood_auroc, ood_detection

    s_in = torch.tensor([0, 1, 2, 3, 4, 5, 5, 6, 7, 8], dtype=torch.float64)
    s_out = torch.tensor([5.0] * 19 + [0.0], dtype=torch.float64)
    got = ood_detection(s_in, s_out)
    # pairs: each OOD 5 beats 0..4 and ties the two 5s (5 + 2/2), the OOD 0 ties the 0 (1/2): (19 * 6 + 0.5) / 200
    assert got["auroc"] == pytest.approx(114.5 / 200) and ood_auroc(s_in, s_out) == got["auroc"]
    # thresholds 8, 7, 6: recall 0; 5: recall 0.95 at precision 19/24; ...; 0: recall 1 at precision 20/30
    assert got["aupr"] == pytest.approx(0.95 * 19 / 24 + 0.05 * 20 / 30)
    # the largest threshold reaching TPR 0.95 is 5, where 5, 5, 6, 7, 8 of the 10 in-distribution examples are flagged
    assert got["fpr95"] == 0.5
    assert fpr_at_tpr(s_in, s_out, 1.0) == 1.0  # every OOD example only at threshold 0: all in-distribution ones flagged
    assert got == pytest.approx(_direct_detection(s_in, s_out))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ood_detection_matches_torchmetrics_and_direct_loops(seed):
    from torchmetrics.functional.classification import binary_auroc, binary_average_precision, binary_roc

    from nvformer.metrics import ood_detection

    g = torch.Generator().manual_seed(seed)
    s_in = (torch.rand(60, generator=g, dtype=torch.float64) * 10).round() / 10  # 11 levels: many ties within and across groups
    s_out = ((torch.rand(45, generator=g, dtype=torch.float64) + 0.3).clamp(max=1.0) * 10).round() / 10
    got = ood_detection(s_in, s_out)
    assert got == pytest.approx(_direct_detection(s_in, s_out), abs=1e-6)  # torchmetrics' curves are float32
    assert got["fpr95"] == _direct_detection(s_in, s_out)["fpr95"]  # counts: exact
    scores, target = torch.cat([s_in, s_out]), torch.cat([torch.zeros(60), torch.ones(45)]).long()  # in [0, 1]: torchmetrics as is
    assert got["auroc"] == float(binary_auroc(scores, target))
    assert got["aupr"] == float(binary_average_precision(scores, target))
    fpr, tpr, _ = binary_roc(scores, target)
    assert got["fpr95"] == pytest.approx(float(fpr[tpr >= 0.95].min()), abs=1e-7)


def test_ood_detection_keeps_the_order_of_large_scores():
    """Scores outside [0, 1] (energies, logits): torchmetrics would squash them with a sigmoid, which
    merges 40 and 45 into ties in float64; the detection metrics read the scores' own order."""
    from torchmetrics.functional.classification import binary_auroc

    from nvformer.metrics import ood_detection

    s_in, s_out = torch.tensor([40.0, 41.0, 42.0, -3.0]), torch.tensor([43.0, 44.0, 45.0])
    got = ood_detection(s_in, s_out)
    assert got == pytest.approx({"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0})
    assert float(binary_auroc(torch.cat([s_in, s_out]).double(), torch.tensor([0, 0, 0, 0, 1, 1, 1]))) < 1.0  # what the ranks avoid
    with pytest.raises(ValueError, match="finite"):
        ood_detection(torch.tensor([0.1, float("nan")]), s_out)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        ood_detection(torch.tensor([]), s_out)


def test_max_prob_and_energy_scores():
    from nvformer.metrics import energy_score, max_prob_score

    probs = torch.tensor([[[0.9, 0.1], [0.4, 0.6]], [[0.7, 0.3], [0.6, 0.4]]], dtype=torch.float64)  # [S=2, N=2, C=2]
    torch.testing.assert_close(max_prob_score(probs), torch.tensor([1 - 0.8, 1 - 0.5], dtype=torch.float64))
    logits = torch.tensor([[2.0, -1.0], [0.0, 0.0]])
    torch.testing.assert_close(energy_score(logits), torch.tensor([-math.log(math.exp(2) + math.exp(-1)), -math.log(2)], dtype=torch.float64))

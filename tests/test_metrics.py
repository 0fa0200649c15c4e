"""Metrics against direct computations; the paired bootstrap against direct resampling loops."""

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

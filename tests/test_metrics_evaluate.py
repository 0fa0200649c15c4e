"""Metrics against direct computations; paired bootstrap; cached, length-batched evaluation."""

import math

import pytest
import torch

from nvformer.evaluate import TokenizedSet, predict_logits
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


def test_paired_bootstrap():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (500,), generator=g)
    a = torch.randn(500, 2, generator=g)
    same = paired_bootstrap(a, a, labels, n_resamples=200)
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0}
    b = a.clone()
    flip = torch.rand(500, generator=g) < 0.3  # make b correct on 30% more examples where a may err
    b[flip] = torch.nn.functional.one_hot(labels[flip], 2).float() * 5
    r = paired_bootstrap(a, b, labels, n_resamples=400, seed=1)
    assert r["low"] < r["diff"] < r["high"] and r["low"] > 0
    assert paired_bootstrap(a, b, labels, n_resamples=400, seed=1) == r
    with pytest.raises(ValueError, match="unknown metric"):
        paired_bootstrap(a, b, labels, metric="auc")


def test_tokenized_set_restores_order_and_matches_unbatched_predictions():
    from nvformer.data import read_reviews
    from nvformer.hf.checkpoints import load_minilm

    model, tok = load_minilm(head="classification")
    r = read_reviews("dvd")
    texts, labels = r.texts[995:1005], r.labels[995:1005]
    data = TokenizedSet.build(tok, texts, labels, batch_size=4, max_length=64)
    assert len(data) == 10 and data.labels.tolist() == labels
    lens = [b["input_ids"].shape[1] for b in data.batches]
    assert lens == sorted(lens)
    logits = predict_logits(model, data)
    with torch.no_grad():
        for i in (0, 3, 9):
            one = model(**tok(texts[i], truncation=True, max_length=64, return_tensors="pt")).logits[0]
            torch.testing.assert_close(logits[i], one, rtol=0, atol=1e-5)
    assert math.isfinite(classification_metrics(logits, data.labels)["nll"])


def test_paired_bootstrap_mean_matches_the_single_group_bootstrap_and_a_loop():
    from nvformer.metrics import paired_bootstrap_mean, per_example_scores

    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 2, (300,), generator=g)
    a, b = torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g) + torch.nn.functional.one_hot(labels, 2)
    sa, sb = per_example_scores(a, labels), per_example_scores(b, labels)
    ref = classification_metrics(a, labels)
    assert sa["accuracy"].mean().item() == pytest.approx(ref["accuracy"]) and sa["nll"].mean().item() == pytest.approx(ref["nll"], abs=1e-6)
    one = paired_bootstrap_mean([sa["accuracy"]], [sb["accuracy"]], n_resamples=300, seed=5)
    assert one == pytest.approx(paired_bootstrap(a, b, labels, n_resamples=300, seed=5), abs=1e-6)  # same draws (float32 there)
    # two groups: the statistic is the mean of the per-group differences; compare with an explicit loop
    l2 = torch.randint(0, 2, (120,), generator=g)
    a2, b2 = torch.randn(120, 2, generator=g), torch.randn(120, 2, generator=g)
    s2a, s2b = per_example_scores(a2, l2)["nll"], per_example_scores(b2, l2)["nll"]
    got = paired_bootstrap_mean([sa["nll"], s2a], [sb["nll"], s2b], n_resamples=200, seed=1)
    gen = torch.Generator().manual_seed(1)
    i1 = torch.randint(0, 300, (200, 300), generator=gen)
    i2 = torch.randint(0, 120, (200, 120), generator=gen)
    stats = [((sb["nll"] - sa["nll"])[i1[r]].mean() + (s2b - s2a)[i2[r]].mean()).item() / 2 for r in range(200)]
    assert got["diff"] == pytest.approx(((sb["nll"] - sa["nll"]).mean() + (s2b - s2a).mean()).item() / 2)
    assert got["low"] == pytest.approx(torch.quantile(torch.tensor(stats, dtype=torch.float64), 0.025).item())
    assert got["low"] < got["diff"] < got["high"]
    with pytest.raises(ValueError, match="same non-zero number"):
        paired_bootstrap_mean([], [])

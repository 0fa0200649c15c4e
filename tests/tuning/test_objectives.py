"""The fitting objectives against independent computations (float64 loops, torch.distributions)."""

import math

import pytest
import torch

from nvformer.tuning.objectives import entropy, information_maximisation, nll, objective_from_outputs


def _logits(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2


def test_entropy_is_the_mean_categorical_entropy():
    x = _logits((5, 4))
    want = torch.distributions.Categorical(logits=x).entropy().mean()
    assert float(entropy(x)) == pytest.approx(float(want), rel=1e-12)


def test_masked_token_entropy_counts_only_the_masked_tokens():
    x = _logits((2, 3, 6), seed=1)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rows = [x[0, 0], x[0, 1], x[1, 0]]
    want = sum(-sum(math.exp(v) * v for v in torch.log_softmax(r, -1).tolist()) for r in rows) / 3
    assert float(entropy(x, mask)) == pytest.approx(want, rel=1e-12)


def test_information_maximisation_is_mean_entropy_minus_entropy_of_the_mean():
    x = _logits((6, 3), seed=2)
    p = torch.softmax(x, -1)
    mean_h = sum(-sum(v * math.log(v) for v in row) for row in p.tolist()) / 6
    pbar = [sum(row[c] for row in p.tolist()) / 6 for c in range(3)]
    marginal = -sum(v * math.log(v) for v in pbar)
    assert float(information_maximisation(x)) == pytest.approx(mean_h - marginal, rel=1e-12)
    # collapse to one class is penalised: identical confident rows score higher than confident, diverse rows
    same = torch.tensor([[9.0, 0.0, 0.0]] * 3, dtype=torch.float64)
    diverse = torch.tensor([[9.0, 0.0, 0.0], [0.0, 9.0, 0.0], [0.0, 0.0, 9.0]], dtype=torch.float64)
    assert float(information_maximisation(same)) > float(information_maximisation(diverse))
    assert float(entropy(same)) == pytest.approx(float(entropy(diverse)), rel=1e-12)


def test_nll_is_the_mean_negative_log_probability_of_the_label():
    x, y = _logits((4, 3), seed=3), torch.tensor([0, 2, 1, 2])
    want = -sum(torch.log_softmax(x[i], -1)[y[i]].item() for i in range(4)) / 4
    assert float(nll(x, y)) == pytest.approx(want, rel=1e-12)


def test_objectives_from_model_outputs():
    class Out:
        def __init__(self, logits, loss=None):
            self.logits, self.loss = logits, loss

    x, y = _logits((4, 3), seed=4), torch.tensor([0, 1, 1, 2])
    assert float(objective_from_outputs("nll")(Out(x), {"labels": y})) == pytest.approx(float(nll(x, y)), rel=1e-12)
    assert float(objective_from_outputs("nll")(Out(x, loss=torch.tensor(7.0)), {"labels": y})) == 7.0  # the model's own loss
    assert float(objective_from_outputs("entropy")(x, {"labels": y})) == pytest.approx(float(entropy(x)), rel=1e-12)
    t = _logits((2, 3, 5), seed=5)
    am = torch.tensor([[1, 1, 1], [1, 1, 0]])
    assert float(objective_from_outputs("information_maximisation")(Out(t), {"attention_mask": am})) == pytest.approx(
        float(information_maximisation(t, am)), rel=1e-12)
    with pytest.raises(ValueError, match="no `labels`"):
        objective_from_outputs("nll")(Out(x), {})
    with pytest.raises(ValueError, match="unknown 'kl'"):
        objective_from_outputs("kl")

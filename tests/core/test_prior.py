import pytest
import torch

import nvformer as nv


def test_prior_buffers_follow_to_and_state_dict():
    p = nv.Prior(4, mean=torch.arange(4.0), var=2.0, log_alpha=1.5, log_alpha_std=0.5)
    names = dict(p.named_buffers())
    assert set(names) == {"mean", "var", "log_alpha", "log_alpha_std"}
    assert torch.equal(p.var, torch.full((4,), 2.0))
    p64 = p.to(torch.float64)
    assert p64.mean.dtype == torch.float64 and p64.log_alpha.dtype == torch.float64
    q = nv.Prior(4)
    q.load_state_dict(p.state_dict())
    assert torch.equal(q.mean, p.mean) and float(q.log_alpha) == 1.5
    pm = nv.Prior(4).to("meta")
    assert pm.mean.device.type == "meta"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"var": 0.0}, "var"),
        ({"var": torch.ones(3)}, r"\[4\]"),
        ({"log_alpha_std": -1.0}, "log_alpha_std"),
        ({"log_alpha": torch.ones(2)}, "log_alpha"),
    ],
)
def test_prior_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nv.Prior(4, **kwargs)


def test_estimator_matches_direct_computation_with_masks_and_batches():
    torch.manual_seed(3)
    P, scale = 6, 0.5
    xs, masks = [], []
    est = nv.PriorEstimator(P, scale=scale)
    for n in (7, 1, 13, 4):
        x = torch.randn(3, n, P) * torch.linspace(0.5, 3.0, P) + torch.arange(P)
        m = torch.rand(3, n) < 0.3
        est.update(x, m)
        xs.append(x[~m])
        masks.append(m)
    flat = torch.cat(xs).double()
    prior = est.prior()
    L = flat.pow(2).sum(-1) * scale / 2
    torch.testing.assert_close(prior.mean.double(), flat.mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(prior.var.double(), flat.var(0, unbiased=True), rtol=1e-6, atol=1e-6)
    assert float(prior.log_alpha) == pytest.approx(float(L.mean()), rel=1e-6)
    assert float(prior.log_alpha_std) == pytest.approx(float(L.std(unbiased=True)), rel=1e-6)
    assert est.count == flat.shape[0]


def test_estimator_errors():
    est = nv.PriorEstimator(4, scale=1.0)
    with pytest.raises(ValueError, match="at least 2"):
        est.prior()
    with pytest.raises(ValueError, match="dim 4"):
        est.update(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match="key_padding_mask"):
        est.update(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.bool))

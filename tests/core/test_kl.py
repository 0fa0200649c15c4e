"""KL terms against torch.distributions and high-precision (mpmath) computations."""

import math

import mpmath
import pytest
import torch
from helpers import make_latent

import nvformer as nv


def _torch_kl_sym(A, B, K):
    q = torch.distributions.Dirichlet(torch.full((K,), A / K, dtype=torch.float64))
    p = torch.distributions.Dirichlet(torch.full((K,), B / K, dtype=torch.float64))
    return float(torch.distributions.kl_divergence(q, p))


def _mp_kl_sym(log_A, B, K):
    """KL(Dir(A/K) || Dir(B/K)) from log A, with enough digits to survive the O(A log A) cancellation."""
    mpmath.mp.dps = int(log_A / math.log(10)) + 40
    A = mpmath.exp(mpmath.mpf(log_A))
    B, K = mpmath.mpf(B), mpmath.mpf(K)
    return (
        mpmath.loggamma(A) - mpmath.loggamma(B) + (A - B) * (mpmath.digamma(A / K) - mpmath.digamma(A))
        + K * (mpmath.loggamma(B / K) - mpmath.loggamma(A / K))
    )


@pytest.mark.parametrize("A", [1e-3, 0.3, 1.0, 7.0, 250.0, 999.0, 1001.0, 3e4, 1e6])
@pytest.mark.parametrize("B", [0.05, 1.0, 12.0])
@pytest.mark.parametrize("K", [1, 2, 9, 64])
def test_symmetric_dirichlet_kl_matches_torch_distributions(A, B, K):
    ours = float(nv.kl_symmetric_dirichlet(torch.tensor(math.log(A), dtype=torch.float64), torch.tensor(B, dtype=torch.float64), torch.tensor(float(K), dtype=torch.float64)))
    ref = _torch_kl_sym(A, B, K)
    assert ours == pytest.approx(ref, rel=1e-8, abs=1e-8)


@pytest.mark.parametrize("log_A", [20.0, 40.0, 100.0, 300.0, 800.0])
@pytest.mark.parametrize("K", [2, 33, 500])
def test_symmetric_dirichlet_kl_huge_pseudo_counts_against_mpmath(log_A, K):
    """Where the textbook float64 formula loses every digit (A > 1e16) and exp(log A) overflows."""
    B = 3.0
    ours = float(nv.kl_symmetric_dirichlet(torch.tensor(log_A, dtype=torch.float64), torch.tensor(B, dtype=torch.float64), torch.tensor(float(K), dtype=torch.float64)))
    ref = float(_mp_kl_sym(log_A, B, K))
    assert math.isfinite(ours)
    assert ours == pytest.approx(ref, rel=1e-9)


def test_kl_dirichlet_of_latent_matches_definition_with_masks_and_kappa():
    pad = torch.tensor([[False, False, False, False, False], [False, False, True, False, True]])
    lat = make_latent(B=2, C=5, pad=pad)
    lat.kappa = 3
    prior = nv.Prior(8, log_alpha=0.7).double()
    delta = 0.4
    got = nv.kl_dirichlet(lat, prior, delta=delta)
    for b in range(2):
        keep = ~pad[b]
        n = int(keep.sum())
        A = float(lat.log_alpha[b][keep].exp().sum())
        Bv = math.exp(0.7) + delta * (n - 1)
        assert float(got[b]) == pytest.approx(_torch_kl_sym(A, Bv, n * 3) / n, rel=1e-8, abs=1e-8)


def test_kl_dirichlet_all_masked_row_is_zero():
    pad = torch.tensor([[True, True, True], [False, True, False]])
    lat = make_latent(B=2, C=3, pad=pad)
    kl = nv.kl_dirichlet(lat, nv.Prior(8).double())
    assert float(kl[0]) == 0.0 and math.isfinite(float(kl[1]))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_kl_gaussian_matches_torch_normal_closed_form(reduction):
    pad = torch.tensor([[False, False, True, False], [False, False, False, False]])
    lat = make_latent(B=2, C=4, P=6, pad=pad)
    lat.kappa = 2
    prior = nv.Prior(6, mean=torch.linspace(-1, 1, 6), var=torch.linspace(0.5, 2.0, 6)).double()
    got = nv.kl_gaussian(lat, prior, reduction=reduction)
    q = torch.distributions.Normal(lat.mu, lat.logvar.exp().sqrt())
    p = torch.distributions.Normal(prior.mean, prior.var.sqrt())
    per = torch.distributions.kl_divergence(q, p)
    per = per.mean(-1) if reduction == "mean" else per.sum(-1)
    w = torch.where(pad, 0.0, lat.log_alpha.exp())
    w = w / w.sum(-1, keepdim=True)
    expected = 2 * (w * per.masked_fill(pad, 0.0)).sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_kl_gradcheck_float64():
    lat = make_latent(B=2, C=4, P=3)
    prior = nv.Prior(3, mean=0.2, var=1.5, log_alpha=0.3).double()
    mu = lat.mu.clone().requires_grad_(True)
    lv = lat.logvar.clone().requires_grad_(True)
    la = lat.log_alpha.clone().requires_grad_(True)

    def f(mu, lv, la):
        l2 = nv.NVLatent(mu, lv, la, lat.pad_mask, mu, la)
        return nv.kl_gaussian(l2, prior), nv.kl_dirichlet(l2, prior, delta=0.5)

    assert torch.autograd.gradcheck(f, (mu, lv, la))
    # and across the asymptotic switch at A = 1000
    la_big = torch.tensor([[6.2, 5.0], [30.0, 29.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: nv.kl_symmetric_dirichlet(torch.logsumexp(x, -1), torch.tensor(2.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)), (la_big,))


def test_kl_of_identity_latent_at_width_4096_is_finite():
    nvib = nv.NVIB(4096, 32).train()
    x = torch.randn(2, 7, 4096) * 2
    lat = nvib(x)
    assert float(lat.log_alpha[:, 1:].min().detach()) > 88  # exp() would overflow fp32
    kg = nv.kl_gaussian(lat, nvib.prior)
    kd = nv.kl_dirichlet(lat, nvib.prior, nvib.delta)
    assert torch.isfinite(kg).all() and torch.isfinite(kd).all()

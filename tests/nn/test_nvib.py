"""The NVIB layer: identity initialisation, sampling shapes, thresholds, prior sampling, priors."""

import math

import pytest
import torch
from torch import nn

import nvformer as nv


def test_identity_initialisation_values():
    prior = nv.Prior(6, mean=torch.arange(6.0), var=torch.linspace(0.5, 3.0, 6), log_alpha=1.0, log_alpha_std=0.5)
    nvib = nv.NVIB(6, 2, prior=prior, mu_tau=0.7, stdev_tau=0.3, alpha_tau=-2.0)
    torch.testing.assert_close(nvib.mu_proj.weight, 0.7 * torch.eye(6))
    torch.testing.assert_close(nvib.mu_proj.bias, 0.3 * prior.mean)
    assert (nvib.logvar_proj.weight == 0).all()
    torch.testing.assert_close(nvib.logvar_proj.bias, torch.log(0.09 * prior.var))
    torch.testing.assert_close(nvib.alpha_quad, torch.full((6,), 1 / (2 * math.sqrt(3))))
    assert float(nvib.alpha_bias.detach()) == pytest.approx(-1.0)
    nvib.set_knobs(stdev_tau=0.0)
    assert torch.allclose(nvib.logvar_proj.bias, torch.full((6,), math.log(1e-20)))


def test_eval_latent_values_and_prior_first():
    prior = nv.Prior(4, mean=0.5, var=2.0, log_alpha=0.3)
    nvib = nv.NVIB(4, 1, prior=prior, stdev_tau=0.5, alpha_tau=1.0).eval()
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    nvib.double()
    lat = nvib(x, key_padding_mask=torch.tensor([[False, False, True], [False, False, False]]))
    assert lat.mu.shape == (2, 4, 4) and lat.log_alpha.shape == (2, 4) and not lat.sampled
    torch.testing.assert_close(lat.mu[:, 0], torch.full((2, 4), 0.5, dtype=torch.float64))
    torch.testing.assert_close(lat.mu[:, 1:], x)
    torch.testing.assert_close(lat.logvar[:, 1:].exp(), torch.full((2, 3, 4), 0.25 * 2.0, dtype=torch.float64))
    expected_la = (x * x).sum(-1) / 4 + 1.0  # scale/2 = 1/(2 sqrt(4)), alpha_tau * s_alpha = 1
    torch.testing.assert_close(lat.log_alpha[1, 1:], expected_la[1])
    assert torch.isneginf(lat.log_alpha[0, 3]) and float(lat.log_alpha[0, 0]) == pytest.approx(0.3)
    torch.testing.assert_close(lat.log_pi.exp().sum(-1), torch.ones(2, dtype=torch.float64))


def test_training_latent_kappa_layout():
    nvib = nv.NVIB(8, 2, kappa=4, stdev_tau=1.0).train()
    lat = nvib(torch.randn(3, 5, 8))
    assert lat.sampled and lat.copies == 4 and lat.z.shape == (3, 24, 8) and lat.log_pi.shape == (3, 24)
    torch.testing.assert_close(lat.log_pi.exp().sum(-1), torch.ones(3, dtype=torch.float64))
    assert lat.sample_pad_mask.shape == (3, 24)


def test_kappa_copies_have_the_right_dirichlet_marginal():
    """Copy weights of component i sum to rho_i ~ Beta(a_i, A - a_i): check the mean and variance."""
    nvib = nv.NVIB(2, 1, kappa=3, alpha_tau=0.0).train()
    x = torch.tensor([[[0.5, 0.2], [1.0, -1.0]]]).expand(20000, -1, -1)
    lat = nvib(x)
    a = lat.log_alpha[0].exp()
    A = a.sum()
    rho = lat.log_pi.exp().view(20000, 3, 3).sum(-1)
    torch.testing.assert_close(rho.mean(0), a / A, rtol=0, atol=0.01)
    var = a * (A - a) / (A * A * (A + 1))
    torch.testing.assert_close(rho.var(0), var, rtol=0.1, atol=0)


@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_eval_threshold_drops_small_token_components_but_not_the_prior(mode):
    nvib = nv.NVIB(4, 1, alpha_threshold=0.1 if mode == "absolute" else 0.2, threshold_mode=mode, alpha_tau=0.0).eval()
    with torch.no_grad():
        nvib.alpha_quad.zero_()
        nvib.alpha_lin.copy_(torch.tensor([1.0, 0, 0, 0]))
    x = torch.tensor([[[-5.0, 0, 0, 0], [0.0, 0, 0, 0], [2.0, 0, 0, 0]]])
    lat = nvib(x)
    kept = torch.isfinite(lat.log_pi[0])
    if mode == "absolute":  # a = e^-5 <= 0.1 dropped; e^0, e^2 kept
        assert kept.tolist() == [True, False, True, True]
    else:  # weights a/A with a = [1, e^-5, 1, e^2]: 1/A ~ 0.1 <= 0.2 dropped, the prior kept anyway
        assert kept.tolist() == [True, False, False, True]
    torch.testing.assert_close(lat.log_pi.exp().sum(), torch.tensor(1.0, dtype=torch.float64))
    assert int(lat.num_kept()[0]) == int(kept.sum())


def test_sample_prior_shapes_pseudo_counts_and_determinism():
    prior = nv.Prior(6, mean=1.0, var=0.25, log_alpha=math.log(2.0))
    nvib = nv.NVIB(6, 2, prior=prior, delta=0.5)
    lengths = torch.tensor([3, 1])
    torch.manual_seed(5)
    lat = nvib.sample_prior(lengths)
    torch.manual_seed(5)
    lat2 = nvib.sample_prior(lengths)
    torch.testing.assert_close(lat.z, lat2.z)
    assert lat.z.shape == (2, 4, 6)
    assert lat.pad_mask.tolist() == [[False, False, False, False], [False, False, True, True]]
    # (alpha_p + delta (K - 1)) / K with K = n + 1
    torch.testing.assert_close(lat.log_alpha[0, 1:].exp(), torch.full((3,), (2.0 + 0.5 * 3) / 4, dtype=torch.float64))
    torch.testing.assert_close(lat.log_alpha[1, 1].exp(), torch.tensor((2.0 + 0.5) / 2, dtype=torch.float64))
    big = nvib.sample_prior(torch.full((4000,), 5))
    torch.testing.assert_close(big.z[:, 1:].mean((0, 1)), torch.full((6,), 1.0), rtol=0, atol=0.02)
    torch.testing.assert_close(big.z[:, 1:].std((0, 1)), torch.full((6,), 0.5), rtol=0.03, atol=0)
    with pytest.raises(ValueError, match="lengths"):
        nvib.sample_prior(torch.tensor([0, 2]))


def test_nvib_bad_inputs():
    nvib = nv.NVIB(8, 2)
    with pytest.raises(ValueError, match=r"`x` must have shape \[B, N, 8\]"):
        nvib(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="key_padding_mask.*bool"):
        nvib(torch.randn(2, 3, 8), key_padding_mask=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="alpha_skip"):
        nvib(torch.randn(2, 3, 8), alpha_skip=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="kappa"):
        nv.NVIB(8, 2, kappa=0)
    with pytest.raises(ValueError, match="threshold_mode"):
        nv.NVIB(8, 2, threshold_mode="percent")


def test_estimate_prior_matches_direct_statistics_of_module_inputs():
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2)
    nv.convert(enc, alpha_tau=1000.0)
    batches = [torch.randn(3, 5, 16) * 2 + 1 for _ in range(3)]
    pads = [torch.rand(3, 5) < 0.3 for _ in range(3)]
    for p in pads:
        p[:, 0] = False
    priors = nv.estimate_prior(enc, [dict(src=x, src_key_padding_mask=p) for x, p in zip(batches, pads)], show_progress=False)
    assert set(priors) == {"layers.0.self_attn", "layers.1.self_attn"}
    flat = torch.cat([x[~p] for x, p in zip(batches, pads)]).double()
    pr = priors["layers.0.self_attn"]
    torch.testing.assert_close(pr.mean.double(), flat.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pr.var.double(), flat.var(0), rtol=1e-5, atol=1e-5)
    L = flat.pow(2).sum(-1) / (2 * 2.0)  # scale/2 with d = 4
    assert float(pr.log_alpha) == pytest.approx(float(L.mean()), rel=1e-5)
    # applied: the module's prior and identity init now use it
    m = enc.layers[0].self_attn
    torch.testing.assert_close(m.nvib.prior.mean, pr.mean)
    torch.testing.assert_close(m.nvib.alpha_bias, 1000.0 * pr.log_alpha_std)
    with pytest.raises(ValueError, match="nor has nn.MultiheadAttention"):
        nv.estimate_prior(nn.Linear(2, 2), [torch.randn(2)])


def test_empty_token_set_gives_the_prior_component_alone():
    nvib = nv.NVIB(8, 2, prior=nv.Prior(8, mean=0.5))
    for mode in (True, False):
        lat = nvib.train(mode)(torch.randn(3, 0, 8))
        assert lat.mu.shape == (3, 1, 8)
        torch.testing.assert_close(lat.log_pi, torch.zeros(3, 1, dtype=torch.float64))


def test_log_w_is_the_unnormalised_log_pi():
    nvib = nv.NVIB(8, 2, stdev_tau=0.3, alpha_tau=0.5)
    pad = torch.tensor([[False, True, False], [False, False, False]])
    for mode in (True, False):
        lat = nvib.train(mode)(torch.randn(2, 3, 8), key_padding_mask=pad)
        torch.testing.assert_close(lat.log_pi, lat.log_w - torch.logsumexp(lat.log_w, -1, keepdim=True))

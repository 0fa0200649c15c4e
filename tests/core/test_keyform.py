"""Pure maths of nvformer.core.keyform: the key terms of an NVIB as functions of its input, against the latent's
(float64), and the bound that decides the prior column's weight is exactly 0, against the softmax."""

from __future__ import annotations

import math

import pytest
import torch

from nvformer.core.keyform import input_key_terms, max_norm, prior_weight_underflows, shared_key_terms


def _reach(k0e):
    return float(k0e[..., -1].max()), float(k0e[..., :-1].norm(dim=-1).amax())


def test_input_key_terms_equal_the_latents_key_terms():
    """Keys and per-key terms from x (c f, f b_mu, A, L, const) equal those of the latent mu = c x + b_mu with the
    shared variance (shared_key_terms), float64, away from the identity and at it (where A, L and const vanish)."""
    g = torch.Generator().manual_seed(0)
    P, scale = 6, 0.4
    sigma2 = 1.0 / scale
    x = torch.randn(2, 5, P, generator=g, dtype=torch.float64)
    for c, bmu, logvar, lin, quad in (
        (0.8, torch.randn(P, generator=g, dtype=torch.float64), torch.randn(P, generator=g, dtype=torch.float64) - 1.0,
         0.1 * torch.randn(P, generator=g, dtype=torch.float64), scale / 2 + 0.05 * torch.randn(P, generator=g, dtype=torch.float64)),
        (1.0, torch.zeros(P, dtype=torch.float64), torch.full((P,), math.log(1e-20), dtype=torch.float64),
         torch.zeros(P, dtype=torch.float64), torch.full((P,), scale / 2, dtype=torch.float64)),
    ):
        mu = c * x + bmu
        log_a = (x * lin).sum(-1) + (x * x * quad).sum(-1) + 3.0  # the NVIB's log pseudo-counts, bias 3 (the shift)
        lat_mu = torch.cat([torch.zeros(2, 1, P, dtype=torch.float64), mu], 1)
        log_w = torch.cat([torch.zeros(2, 1, dtype=torch.float64), log_a], 1)
        m, _, b = shared_key_terms(lat_mu, log_w, logvar, torch.zeros(P, dtype=torch.float64), scale, shift=3.0)
        scaling, mean_shift, A, L, const = input_key_terms(c, bmu, logvar, lin, quad, sigma2, 1e-20, torch.float64)
        torch.testing.assert_close(x * scaling + mean_shift, m[:, 1:], rtol=0, atol=1e-12)
        torch.testing.assert_close((x * x * A).sum(-1) + (x * L).sum(-1) + const, b[:, 1:], rtol=0, atol=1e-10)
        if c == 1.0:
            assert not A.any() and not L.any() and const == 0.0


def test_prior_weight_underflow_bound_against_the_softmax():
    """The bound says 0 only where the prior's softmax weight is exactly 0, on random queries and keys over a
    range of prior offsets (float32 and float64)."""
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        q, keys = torch.randn(2, 3, 5, 8, generator=g, dtype=dtype), torch.randn(2, 3, 6, 8, generator=g, dtype=dtype)
        k0 = torch.randn(1, 3, 1, 8, generator=g, dtype=dtype)
        for offset in (-20.0, -100.0, -150.0, -700.0, -800.0, -1e4):
            k0e = torch.cat([k0, torch.full((1, 3, 1, 1), offset, dtype=dtype)], -1)
            logits = torch.cat([0.3 * q @ k0.transpose(-1, -2) + offset, 0.3 * q @ keys.transpose(-1, -2)], -1)
            w0 = torch.softmax(logits, -1)[..., 0]
            says = prior_weight_underflows(q, keys, _reach(k0e), 0.0, 0.3)
            if says:
                assert bool((w0 == 0).all())
            # the largest key norm in place of the keys (what a decoding step keeps with its cache) says the same
            assert prior_weight_underflows(q, float(keys.norm(dim=-1).max()), _reach(k0e), 0.0, 0.3) == says
        assert prior_weight_underflows(q, keys, _reach(torch.cat([k0, torch.full((1, 3, 1, 1), -1e4, dtype=dtype)], -1)), 0.0, 0.3)
        assert not prior_weight_underflows(q, keys, _reach(torch.cat([k0, torch.full((1, 3, 1, 1), -20.0, dtype=dtype)], -1)), 0.0, 0.3)


def test_max_norm_is_the_largest_row_norm():
    """Against a float64 loop over rows; 0 for an empty tensor (a cache with no keys yet)."""
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert max_norm(x) == pytest.approx(max(float(r.pow(2).sum().sqrt()) for r in x.reshape(-1, 5)), rel=1e-14)
    assert max_norm(x[:, :, :0]) == 0.0
    ref = max_norm(x)
    for view in (x.transpose(1, 2), x.permute(2, 0, 1, 3), x[:, 1:], x.transpose(1, 2)[:, ::2]):  # read in memory order or by strides
        assert max_norm(view) == pytest.approx(max(float(r.pow(2).sum().sqrt()) for r in view.reshape(-1, 5)), rel=1e-14)
    assert max_norm(x.transpose(1, 2)) == pytest.approx(ref, rel=1e-14)

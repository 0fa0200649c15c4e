"""Reference denoising attention against independent float64 computations (docs/MATH.md section 3)."""

import math

import pytest
import torch
from helpers import make_latent

import nvformer as nv

B, H, Nt, d = 2, 2, 3, 4
P = 8  # latent width; H * d = 8 too


def _weights(seed=0, P=P):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64) * 0.5  # noqa: E731
    return mk(H * d, P), mk(H * d), mk(H * d, P), mk(H * d)


def _query(seed=2):
    return torch.randn(B, H, Nt, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _u(q, Wk):
    """u = W_k,h^T q_h per head: [B, H, Nt, P]."""
    return torch.einsum("bhtd,hdp->bhtp", q, Wk.view(H, d, -1))


def test_training_logits_are_gaussian_log_density_plus_log_pi():
    lat = make_latent(B, 5, P)
    g = torch.Generator().manual_seed(5)
    z = torch.randn(B, 5, P, generator=g, dtype=torch.float64)
    lat.z, lat.sampled = z, True
    Wk, bk, Wv, bv = _weights()
    q = _query()
    out, w = nv.denoising_attention(q, lat, Wk, bk, Wv, bv)
    u = _u(q, Wk)
    sd = math.sqrt(d) ** 0.5  # N(u; z_i, sqrt(d) I) has std d^(1/4)
    logdens = torch.distributions.Normal(z[:, None, None], sd).log_prob(u[:, :, :, None, :]).sum(-1)  # [B,H,Nt,C]
    expected = torch.softmax(logdens + lat.log_pi[:, None, None, :], -1)
    torch.testing.assert_close(w, expected, rtol=1e-10, atol=1e-12)
    v = torch.einsum("bcp,hdp->bhcd", z, Wv.view(H, d, P)) + bv.view(1, H, 1, d)
    torch.testing.assert_close(out, expected @ v, rtol=1e-10, atol=1e-12)


def _brute_posterior(q, lat, Wk, Wv, bv):
    """Exact Gaussian posterior: p(i|u) oc pi_i N(u; mu_i, S_i); E[z|u,i] = (var u + sqrt(d) mu)/S."""
    u = _u(q, Wk)
    var = lat.logvar.exp()
    S = var + math.sqrt(d)
    lp = torch.distributions.Normal(lat.mu[:, None, None], S[:, None, None].sqrt()).log_prob(u[:, :, :, None, :]).sum(-1)
    w = torch.softmax(lp + lat.log_pi[:, None, None, :], -1)
    post = (var[:, None, None] * u[:, :, :, None, :] + math.sqrt(d) * lat.mu[:, None, None]) / S[:, None, None]
    zbar = (w[..., None] * post).sum(-2)
    out = torch.einsum("bhtp,hdp->bhtd", zbar, Wv.view(H, d, -1)) + bv.view(1, H, 1, d)
    return w, out


def test_exact_evaluation_form_equals_brute_force_gaussian_posterior():
    lat = make_latent(B, 5, P, pad=torch.tensor([[False] * 5, [False, False, True, False, True]]))
    Wk, bk, Wv, bv = _weights()
    q = _query()
    out, w = nv.denoising_attention(q, lat, Wk, bk, Wv, bv, formula="exact")
    w_ref, out_ref = _brute_posterior(q, lat, Wk, Wv, bv)
    torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)


def test_paper_formula_differs_from_exact_only_through_the_u_squared_term():
    Wk, bk, Wv, bv = _weights()
    q = _query()
    # one shared variance for every component (prior included): the dropped term is constant over i
    lat = make_latent(B, 5, P, same_var=True)
    a = nv.denoising_attention(q, lat, Wk, bk, Wv, bv, formula="paper")
    b = nv.denoising_attention(q, lat, Wk, bk, Wv, bv, formula="exact")
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # per-component variances: they differ, by exactly the logit term -1/2 sum_p u_p^2 / S_ip
    lat = make_latent(B, 5, P)
    (_, wp), (_, we) = (nv.denoising_attention(q, lat, Wk, bk, Wv, bv, formula=f) for f in ("paper", "exact"))
    assert (wp - we).abs().max() > 1e-3
    S = lat.logvar.exp() + math.sqrt(d)
    term = -0.5 * torch.einsum("bhtp,bcp->bhtc", _u(q, Wk) ** 2, 1 / S)
    torch.testing.assert_close(torch.softmax(wp.log() + term, -1), we, rtol=1e-10, atol=1e-12)


def test_evaluation_form_is_the_expectation_of_the_training_form_monte_carlo():
    """Self-normalised MC over Gaussian samples of z (training form) converges to the exact form.

    M = 20,000 samples per component; with these sizes the MC standard error of each weight is
    below 0.005, and we allow 0.03 absolute.
    """
    lat = make_latent(1, 4, P, var_low=0.1, var_high=0.6)
    Wk, bk, Wv, bv = _weights()
    q = _query()[:1]
    M = 20_000
    g = torch.Generator().manual_seed(11)
    C = lat.mu.shape[1]
    z = lat.mu.repeat_interleave(M, 1) + lat.logvar.exp().sqrt().repeat_interleave(M, 1) * torch.randn(1, C * M, P, generator=g, dtype=torch.float64)
    mc = nv.NVLatent(lat.mu, lat.logvar, lat.log_alpha, lat.pad_mask, z, lat.log_pi.repeat_interleave(M, 1) - math.log(M), copies=M, sampled=True)
    out_mc, w_mc = nv.denoising_attention(q, mc, Wk, bk, Wv, bv)
    out_ex, w_ex = nv.denoising_attention(q, lat, Wk, bk, Wv, bv, formula="exact")
    w_mc_comp = w_mc.view(1, H, Nt, C, M).sum(-1)
    torch.testing.assert_close(w_mc_comp, w_ex, rtol=0, atol=0.03)
    torch.testing.assert_close(out_mc, out_ex, rtol=0, atol=0.03)


def test_zero_variance_evaluation_equals_training_form_at_z_equals_mu():
    lat = make_latent(B, 5, P)
    lat.logvar = torch.full_like(lat.logvar, -200.0)
    Wk, bk, Wv, bv = _weights()
    q = _query()
    ev = nv.denoising_attention(q, lat, Wk, bk, Wv, bv, form="eval", formula="exact")
    tr = nv.denoising_attention(q, lat, Wk, bk, Wv, bv, form="train")
    for a, b in zip(ev, tr):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("form,formula", [("train", "paper"), ("eval", "paper"), ("eval", "exact")])
def test_gradcheck_float64(form, formula):
    lat = make_latent(1, 3, P, pad=torch.tensor([[False, False, True]]))
    Wk, bk, Wv, bv = (t.requires_grad_(True) for t in _weights())
    q = _query()[:1].requires_grad_(True)
    mu = lat.mu.clone().requires_grad_(True)
    lv = lat.logvar.clone().requires_grad_(True)
    lp = lat.log_pi.clone().requires_grad_(True)

    def f(q, mu, lv, lp, Wk, bk, Wv, bv):
        latent = nv.NVLatent(mu, lv, lat.log_alpha, lat.pad_mask, mu, lp, sampled=(form == "train"))
        return nv.denoising_attention(q, latent, Wk, bk, Wv, bv, formula=formula)

    assert torch.autograd.gradcheck(f, (q, mu, lv, lp, Wk, bk, Wv, bv))


def test_bool_and_float_masks_agree_and_masked_columns_get_zero_weight():
    lat = make_latent(B, 5, P)
    Wk, bk, Wv, bv = _weights()
    q = _query()
    bmask = torch.zeros(Nt, 5, dtype=torch.bool)
    bmask[0, 2:] = True
    bmask[2, 1] = True
    fmask = torch.zeros(Nt, 5, dtype=torch.float64).masked_fill(bmask, -math.inf)
    ob, wb = nv.denoising_attention(q, lat, Wk, bk, Wv, bv, attn_mask=bmask)
    of, wf = nv.denoising_attention(q, lat, Wk, bk, Wv, bv, attn_mask=fmask)
    torch.testing.assert_close(ob, of)
    torch.testing.assert_close(wb, wf)
    assert (wb[:, :, bmask] == 0).all()


def test_fully_masked_rows_give_zero_output_not_nan():
    lat = make_latent(B, 3, P, pad=torch.tensor([[True, True, True], [False, True, False]]))
    Wk, bk, Wv, bv = _weights()
    for form in ("train", "eval"):
        out, w = nv.denoising_attention(_query(), lat, Wk, bk, Wv, bv, form=form)
        assert torch.isfinite(out).all() and (out[0] == 0).all() and (w[0] == 0).all()


def test_dropout_zeroes_weights_in_training():
    lat = make_latent(B, 5, P)
    Wk, bk, Wv, bv = _weights()
    torch.manual_seed(0)
    out, w = nv.denoising_attention(_query(), lat, Wk, bk, Wv, bv, dropout_p=0.5)
    out0, _ = nv.denoising_attention(_query(), lat, Wk, bk, Wv, bv, dropout_p=0.0)
    assert not torch.allclose(out, out0)


def test_bad_arguments_raise_clear_errors():
    lat = make_latent(B, 5, P)
    Wk, bk, Wv, bv = _weights()
    with pytest.raises(ValueError, match="formula"):
        nv.denoising_attention(_query(), lat, Wk, bk, Wv, bv, formula="approx")
    with pytest.raises(ValueError, match="query"):
        nv.denoising_attention(_query()[0], lat, Wk, bk, Wv, bv)
    with pytest.raises(ValueError, match="k_weight"):
        nv.denoising_attention(_query(), lat, Wk[:, :3], bk, Wv, bv)


def test_functional_is_causal_keeps_the_prior_column_and_equals_an_explicit_mask():
    lat = make_latent(B, Nt + 1, P)
    Wk, bk, Wv, bv = _weights()
    out, w = nv.denoising_attention(_query(), lat, Wk, bk, Wv, bv, is_causal=True)
    explicit = torch.zeros(Nt, Nt + 1, dtype=torch.bool)
    explicit[:, 1:] = torch.ones(Nt, Nt, dtype=torch.bool).triu(1)
    out2, w2 = nv.denoising_attention(_query(), lat, Wk, bk, Wv, bv, attn_mask=explicit)
    torch.testing.assert_close(out, out2)
    assert (w[..., 0] > 0).all() and (w[:, :, explicit] == 0).all()
    with pytest.raises(ValueError, match="is_causal"):
        nv.denoising_attention(_query(), make_latent(B, 7, P), Wk, bk, Wv, bv, is_causal=True)

"""The fast path (nvformer.nn.sdpa) against the reference path: property tests and gradcheck."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nvformer as nv
from nvformer.core.masks import additive_mask, latent_columns_mask
from nvformer.nn.sdpa import fast_applicable


def _weights(H, d, P, dtype, g):
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype) * 0.4  # noqa: E731
    return mk(H * d, P), mk(H * d), mk(H * d, P), mk(H * d)


@st.composite
def cases(draw):
    return dict(
        H=draw(st.integers(1, 3)), d=draw(st.sampled_from([2, 4, 8])), B=draw(st.integers(1, 3)),
        N=draw(st.integers(1, 7)), cross=draw(st.booleans()), causal=draw(st.booleans()),
        pad=draw(st.lists(st.booleans(), min_size=21, max_size=21)), use_mask=draw(st.booleans()),
        train=draw(st.booleans()), formula=draw(st.sampled_from(["paper", "exact"])),
        mu_tau=draw(st.floats(0.0, 1.5)), stdev_tau=draw(st.floats(0.0, 1.2)), alpha_tau=draw(st.floats(-5.0, 15.0)),
        kappa=draw(st.integers(1, 3)), per_token_var=draw(st.booleans()), seed=draw(st.integers(0, 10_000)),
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_fast_equals_reference_on_random_inputs_masks_and_knobs(c):
    g = torch.Generator().manual_seed(c["seed"])
    H, d, B, N = c["H"], c["d"], c["B"], c["N"]
    P = H * d
    nvib = nv.NVIB(P, H, prior=nv.Prior(P, mean=0.3, var=1.7, log_alpha=1.0, log_alpha_std=0.7), kappa=c["kappa"],
                   mu_tau=c["mu_tau"], stdev_tau=c["stdev_tau"], alpha_tau=c["alpha_tau"])
    if c["per_token_var"]:
        with torch.no_grad():
            nvib.logvar_proj.weight.normal_(0.0, 0.2, generator=g)
    nvib.train(c["train"])
    S = 1 + (c["N"] + 2) % 5 if c["cross"] else N
    x = torch.randn(B, S, P, generator=g) * 1.5
    pad = torch.tensor(c["pad"][: B * S]).view(B, S) if B * S <= 21 else None
    torch.manual_seed(c["seed"])
    with torch.no_grad():
        lat = nvib(x, key_padding_mask=pad)
    q = torch.randn(B, H, N, d, generator=g)
    Wk, bk, Wv, bv = _weights(H, d, P, torch.float32, g)
    causal = c["causal"] and not c["cross"]
    mask = None
    if c["use_mask"]:
        m = torch.rand(N, S, generator=g) < 0.3
        mask = latent_columns_mask(additive_mask(m, torch.float32), lat.copies)
    kw = dict(attn_mask=mask, is_causal=causal, formula=c["formula"], scale=1 / math.sqrt(d))
    form = "train" if lat.sampled else "eval"
    assert fast_applicable(lat, mask, False, form)
    ref, _ = nv.denoising_attention(q, lat, Wk, bk, Wv, bv, impl="reference", **kw)
    fast, none = nv.denoising_attention(q, lat, Wk, bk, Wv, bv, impl="fast", need_weights=False, **kw)
    assert none is None
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("form", ["train", "eval"])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("formula", ["paper", "exact"])
def test_fast_gradcheck_float64(form, shared, formula):
    g = torch.Generator().manual_seed(1)
    H, d, P, B, N = 2, 2, 4, 1, 3
    mu = torch.randn(B, N + 1, P, generator=g, dtype=torch.float64, requires_grad=True)
    lv = (torch.randn(B, N + 1, P, generator=g, dtype=torch.float64) * 0.3 - 0.5).requires_grad_(True)
    lp = torch.log_softmax(torch.randn(B, N + 1, generator=g, dtype=torch.float64), -1).requires_grad_(True)
    Wk, bk, Wv, bv = (t.requires_grad_(True) for t in _weights(H, d, P, torch.float64, g))
    q = torch.randn(B, H, N, d, generator=g, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(B, N + 1, dtype=torch.bool)

    def f(q, mu, lv, lp, Wk, bk, Wv, bv):
        if shared:  # every token shares the log-variance of token 1
            tok = lv[:, 1:2].expand(B, N, P)
            lv_all = torch.cat([lv[:, :1], tok], 1)
            shared_lv = lv[0, 1]
        else:
            lv_all, shared_lv = lv, None
        lat = nv.NVLatent(mu, lv_all, lp, pad, mu, lp, log_w=lp, shared_logvar=shared_lv if form == "eval" else None, sampled=form == "train")
        return nv.denoising_attention(q, lat, Wk, bk, Wv, bv, formula=formula, is_causal=True, impl="fast", need_weights=False)[0]

    assert torch.autograd.gradcheck(f, (q, mu, lv, lp, Wk, bk, Wv, bv))


def test_fast_path_is_used_by_nv_multihead_attention_when_weights_are_not_needed(monkeypatch):
    calls = []
    import nvformer.nn.functional as functional

    orig = functional.fast_denoising_attention
    monkeypatch.setattr(functional, "fast_denoising_attention", lambda *a, **k: calls.append(1) or orig(*a, **k))
    m = nv.NVMultiheadAttention(16, 4, stdev_tau=0.3).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        a, w = m(x, x, x, need_weights=False, is_causal=True)
        b, w2 = m(x, x, x, need_weights=True, is_causal=True)
    assert calls == [1] and w is None and w2 is not None
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_impl_fast_refuses_what_it_cannot_do():
    lat = nv.NVIB(8, 2, prior_component=False).eval()(torch.randn(1, 3, 8))
    q = torch.randn(1, 2, 3, 4)
    W = torch.randn(8, 8)
    with pytest.raises(ValueError, match="does not apply"):
        nv.denoising_attention(q, lat, W, None, W, None, impl="fast", need_weights=False)

"""Gamma / Dirichlet sampling: moments and reparameterisation gradients against closed forms.

Monte Carlo tolerances are ~5 standard errors of the estimate for the stated sample size.
"""

import math

import pytest
import torch

import nvformer as nv
from nvformer.core.masks import masked_log_softmax, safe_softmax


def test_masked_log_softmax_and_fully_masked_rows():
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], requires_grad=True)
    pad = torch.tensor([[False, True, False], [True, True, True]])
    out = masked_log_softmax(x, pad)
    ref = torch.log_softmax(torch.tensor([1.0, 3.0]), -1)
    torch.testing.assert_close(out[0, [0, 2]], ref)
    assert torch.isneginf(out[0, 1]) and torch.isneginf(out[1]).all()
    out.masked_fill(torch.isneginf(out), 0.0).sum().backward()
    assert torch.isfinite(x.grad).all()
    w = safe_softmax(torch.full((2, 3), -math.inf))
    assert torch.equal(w, torch.zeros(2, 3))


@pytest.mark.parametrize("a", [0.05, 0.7, 3.0, 40.0])
def test_log_gamma_moments(a):
    n = 200_000
    la = torch.full((n,), math.log(a), dtype=torch.float64)
    g = nv.sample_log_gamma(la).exp()
    se_mean = math.sqrt(a / n)
    assert abs(float(g.mean()) - a) < 5 * se_mean
    # Var(g) = a; the sample variance has SE ~ sqrt((m4 - var^2)/n) with m4 = 3a^2 + 6a
    se_var = math.sqrt((3 * a * a + 6 * a - a * a) / n)
    assert abs(float(g.var()) - a) < 5 * se_var


@pytest.mark.parametrize("a", [0.3, 2.0, 15.0])
def test_log_gamma_reparameterisation_gradients(a):
    """d/da E[g] = 1 and d/da E[log g] = trigamma(a), estimated from pathwise/implicit gradients."""
    n = 200_000
    la = torch.full((n,), math.log(a), dtype=torch.float64, requires_grad=True)
    log_g = nv.sample_log_gamma(la)
    (g_grad,) = torch.autograd.grad(log_g.exp().sum(), la)  # d g / d log a = a dg/da
    dg_da = g_grad / a
    assert abs(float(dg_da.mean()) - 1.0) < 5 * float(dg_da.std()) / math.sqrt(n)
    (lg_grad,) = torch.autograd.grad(nv.sample_log_gamma(la).sum(), la)
    dlg_da = lg_grad / a
    trigamma = float(torch.polygamma(1, torch.tensor(a, dtype=torch.float64)))
    assert abs(float(dlg_da.mean()) - trigamma) < 5 * float(dlg_da.std()) / math.sqrt(n)


def test_log_gamma_extreme_concentrations_are_finite_and_right():
    la = torch.tensor([-600.0, -50.0, 0.0, 25.0, 200.0, 5000.0], dtype=torch.float64, requires_grad=True)
    out = nv.sample_log_gamma(la.expand(1000, -1))
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(la.grad).all()
    # huge a: log g = log a to within a few / sqrt(a)
    torch.testing.assert_close(out[:, 4:].mean(0), la[4:].detach(), rtol=0, atol=1e-6)
    # tiny a: E[log g] = digamma(a) ~ -1/a
    small = out[:, 1].detach()
    expected = float(torch.digamma(torch.tensor(math.exp(-50.0), dtype=torch.float64)))
    assert abs(float(small.mean()) / expected - 1.0) < 0.15
    # masked entries stay -inf
    assert torch.isneginf(nv.sample_log_gamma(torch.tensor([-math.inf, 0.0]))[0])


def test_log_gamma_float32_in_float32_out():
    out = nv.sample_log_gamma(torch.zeros(3))
    assert out.dtype == torch.float32
    assert nv.sample_log_gamma(torch.zeros(3, dtype=torch.bfloat16)).dtype == torch.float32


def test_dirichlet_mean_and_variance_match_torch_distributions():
    a = torch.tensor([0.2, 1.0, 3.0, 7.5], dtype=torch.float64)
    n = 100_000
    pi = nv.sample_log_dirichlet(a.log().expand(n, -1)).exp()
    ref = torch.distributions.Dirichlet(a)
    se = (ref.variance / n).sqrt()
    assert ((pi.mean(0) - ref.mean).abs() < 5 * se).all()
    torch.testing.assert_close(pi.var(0), ref.variance, rtol=0.05, atol=0)
    torch.testing.assert_close(pi.sum(-1), torch.ones(n, dtype=torch.float64))


def test_dirichlet_gradient_of_mean():
    """d/da_j E[pi_0] = (delta_0j A - a_0) / A^2 from the reparameterised samples."""
    a = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    n = 200_000
    la = a.log().clone().requires_grad_(True)
    pi0 = nv.sample_log_dirichlet(la.expand(n, -1))[:, 0].exp()
    (grad,) = torch.autograd.grad(pi0.mean(), la)
    A = a.sum()
    expected = (torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64) * A - a[0]) / A**2 * a  # d/dlog a
    torch.testing.assert_close(grad, expected, rtol=0.05, atol=2e-3)


def test_dirichlet_masked_components_get_zero_weight():
    la = torch.zeros(4, 5)
    pad = torch.tensor([[False, True, False, False, True]]).expand(4, -1)
    lp = nv.sample_log_dirichlet(la, pad)
    assert torch.isneginf(lp[pad]).all() and torch.isfinite(lp[~pad]).all()
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(4))


def test_unmasked_shortcuts_give_the_general_paths_numbers():
    """Without any excluded entry the masked passes are skipped: same numbers as with an all-False
    mask given explicitly (whose general path runs), bit for bit; meta tensors take the general path."""
    from nvformer.core.masks import nothing_set

    x = torch.randn(3, 5, dtype=torch.float64)
    general = (x - torch.logsumexp(x, -1, keepdim=True)).masked_fill(torch.zeros(3, 5, dtype=torch.bool), -math.inf)
    assert torch.equal(masked_log_softmax(x, None), general)
    torch.testing.assert_close(masked_log_softmax(x, None), torch.log_softmax(x, -1), rtol=0, atol=1e-14)
    assert nothing_set(torch.zeros(4, dtype=torch.bool)) and not nothing_set(torch.tensor([False, True]))
    assert not nothing_set(torch.zeros(4, dtype=torch.bool, device="meta"))
    assert masked_log_softmax(torch.empty(2, 3, device="meta"), None).shape == (2, 3)


def test_log_gamma_mixes_its_regimes_per_entry():
    """Entries above the log-normal limit and masked entries in one call: each follows its own
    regime (log-normal draws only where log a > 20, -inf where masked, boosted Gamma elsewhere)."""
    torch.manual_seed(0)
    n = 20_000
    lc = torch.tensor([0.0, 30.0, -math.inf], dtype=torch.float64).expand(n, 3)
    draws = nv.sample_log_gamma(lc)
    assert torch.isneginf(draws[:, 2]).all()
    g0 = draws[:, 0].exp()  # Gamma(1): mean 1, variance 1
    assert abs(g0.mean().item() - 1.0) < 5 / math.sqrt(n)
    z = (draws[:, 1] - 30.0) * math.exp(15.0)  # log g ~ N(log a, 1/a): standardised
    assert abs(z.mean().item()) < 5 / math.sqrt(n) and abs(z.std().item() - 1.0) < 0.05


def _ks_statistic(x: torch.Tensor, shape: float) -> float:
    """sqrt(n) times the Kolmogorov-Smirnov distance of the draws ``x`` to Gamma(shape, 1), whose CDF
    is the regularised lower incomplete gamma function (float64)."""
    n = x.numel()
    xs, _ = x.double().sort()
    cdf = torch.special.gammainc(torch.tensor(shape, dtype=torch.float64), xs)
    hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    return max(float((hi - cdf).max()), float((cdf - (hi - 1.0 / n)).max())) * math.sqrt(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [1.0, 1.05, 2.0, 30.0, 1e6, 4e8])
def test_standard_gamma_is_gamma_distributed(shape, dtype):
    """Kolmogorov-Smirnov against the exact CDF: sqrt(n) D stays below 1.95 (the 0.1% critical value)."""
    torch.manual_seed(0)
    x = nv.standard_gamma(torch.full((200_000,), shape, dtype=dtype))
    assert x.dtype == dtype and bool((x > 0).all())
    assert _ks_statistic(x, shape) < 1.95


def test_standard_gamma_redraws_the_rejected_entries(monkeypatch):
    """The vectorised round rejects a few entries (about 5% at shape 1); while they are many they are
    drawn again by another vectorised round, the last few by torch's own exact sampler; the
    mixture passes the KS test either way (and with every redraw left to torch's sampler)."""
    from nvformer.core import sampling

    rounds, redrawn = [], []
    original_round, original = sampling._marsaglia_tsang, torch._standard_gamma

    def counting_round(shape, *args, **kwargs):
        rounds.append(shape.numel())
        return original_round(shape, *args, **kwargs)

    monkeypatch.setattr(sampling, "_marsaglia_tsang", counting_round)
    monkeypatch.setattr(torch, "_standard_gamma", lambda shape: redrawn.append(shape.numel()) or original(shape))
    torch.manual_seed(1)
    x = nv.standard_gamma(torch.ones(200_000, dtype=torch.float64))
    assert rounds[0] == x.numel() and len(rounds) >= 2
    assert 0.01 < rounds[1] / x.numel() < 0.1  # the first round's rejects, drawn again by a second round
    assert all(b < a for a, b in zip(rounds, rounds[1:])) and rounds[-1] >= sampling._REDRAW_VECTORISED
    assert 0 < sum(redrawn) < sampling._REDRAW_VECTORISED  # the last few: torch's sampler
    assert _ks_statistic(x, 1.0) < 1.95
    monkeypatch.setattr(sampling, "_REDRAW_VECTORISED", 10**9)  # every reject to torch's sampler
    rounds.clear(), redrawn.clear()
    x = nv.standard_gamma(torch.ones(200_000, dtype=torch.float64))
    assert len(rounds) == 1 and 0.01 < sum(redrawn) / x.numel() < 0.1
    assert _ks_statistic(x, 1.0) < 1.95


@pytest.mark.parametrize("shape", [1.0, 1.3, 4.0, 50.0])
def test_standard_gamma_implicit_gradient_against_the_cdf(shape):
    """dx/ds = -(dF(x; s)/ds) / f(x; s), with dF/ds by central differences of the float64 CDF
    (``torch._standard_gamma_grad`` fits this with rational functions: agreement to ~1e-3 relative)."""
    torch.manual_seed(2)
    s = torch.full((64,), shape, dtype=torch.float64, requires_grad=True)
    x = nv.standard_gamma(s)
    (grad,) = torch.autograd.grad(x.sum(), s)
    x = x.detach()
    h = 1e-5 * shape
    dF = (torch.special.gammainc(torch.tensor(shape + h, dtype=torch.float64), x)
          - torch.special.gammainc(torch.tensor(shape - h, dtype=torch.float64), x)) / (2 * h)
    pdf = torch.distributions.Gamma(torch.tensor(shape, dtype=torch.float64), 1.0).log_prob(x).exp()
    torch.testing.assert_close(grad, -dF / pdf, rtol=1e-3, atol=1e-6)  # torch's gradient: a fitted approximation, ~2e-4 relative


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [0.02, 0.3, 1.0, 7.0])
def test_log_gamma_boost_is_gamma_distributed(shape, dtype):
    """``exp(sample_log_gamma(log a))`` against the exact Gamma(a) CDF (KS, sqrt(n) D below 1.95, the
    0.1% critical value). The boost's uniform is mostly the Gamma(a + 1) sampler's recycled
    acceptance uniform: a dependence on the Gamma draw would show here (and in the correlation of
    the boost factor with that draw, checked too)."""
    torch.manual_seed(3)
    lc = torch.full((200_000,), math.log(shape), dtype=dtype)
    log_g = nv.sample_log_gamma(lc, dtype)
    assert log_g.dtype == dtype and bool(torch.isfinite(log_g).all())
    n = log_g.numel()
    xs, _ = log_g.double().sort()
    cdf = torch.special.gammainc(torch.tensor(shape, dtype=torch.float64), xs.exp())
    hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert max(float((hi - cdf).max()), float((cdf - (hi - 1.0 / n)).max())) * math.sqrt(n) < 1.95
    from nvformer.core.sampling import _marsaglia_tsang

    x, log_w = _marsaglia_tsang(torch.full((200_000,), shape + 1.0, dtype=dtype), spare=True)
    assert bool((log_w <= 0).all()) and bool(torch.isfinite(log_w).all())
    w = log_w.double().exp()
    assert abs(w.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)  # Uniform(0, 1]
    assert abs(torch.corrcoef(torch.stack([w, x.double()]))[0, 1].item()) < 5 / math.sqrt(n)  # independent of the draw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_dirichlet_is_the_exp_of_sample_log_dirichlet(dtype):
    """Same random stream, same draws: the weights of one softmax equal the exponentiated log weights
    (to rounding), masked entries and a fully masked row give 0, and so do the gradients."""
    lc = torch.randn(3, 4, 6, dtype=dtype) * 3
    lc[0, 1, 2] = lc[2, 0, :] = -math.inf
    for masked in (False, True):
        x = (lc if masked else lc.nan_to_num(neginf=0.0)).clone().requires_grad_()
        torch.manual_seed(5)
        w = nv.sample_dirichlet(x, dtype)
        (gw,) = torch.autograd.grad((w * torch.arange(6, dtype=dtype)).sum(), x)
        torch.manual_seed(5)
        ref = nv.sample_log_dirichlet(x, dtype=dtype).exp()
        (gr,) = torch.autograd.grad((ref * torch.arange(6, dtype=dtype)).sum(), x)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(w, ref, **tol)
        torch.testing.assert_close(gw, gr, **tol)
        assert w.dtype == dtype and bool(torch.isfinite(gw).all())
        if masked:
            assert float(w.detach()[0, 1, 2]) == 0.0 and float(w.detach()[2, 0].abs().sum()) == 0.0


def test_gamma_grad_split_over_threads_is_the_unsplit_kernel(monkeypatch):
    """The implicit gradient computed in parts on worker threads equals torch's one-call result bit
    for bit (uneven parts, a non-flat shape), and small inputs are not split."""
    from nvformer.core import sampling

    torch.manual_seed(4)
    shape = torch.rand(3, 7, 5003, dtype=torch.float32) * 30 + 1.0
    x = torch._standard_gamma(shape)
    monkeypatch.setattr(sampling, "_SPLIT_MIN", 1000)
    calls = []
    real = torch._standard_gamma_grad
    monkeypatch.setattr(torch, "_standard_gamma_grad", lambda s, v: calls.append(s.numel()) or real(s, v))
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        out = sampling._gamma_grad(shape, x)
    finally:
        torch.set_num_threads(previous)
    assert len(calls) == 3 and sum(calls) == shape.numel()
    assert out.shape == shape.shape and torch.equal(out, real(shape, x))
    calls.clear()
    assert torch.equal(sampling._gamma_grad(shape[:1, :1, :10], x[:1, :1, :10]), real(shape[:1, :1, :10], x[:1, :1, :10]))
    assert calls == [10]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_dirichlet_from_the_concentration_alone_is_the_same_draw(dtype):
    """``log_concentration=None`` with ``concentration`` given: the same draws and gradients as with
    both, also where a regime needs ``log a`` (a masked entry, a = 0; a concentration beyond the
    log-normal limit); neither given is a one-line error."""
    torch.manual_seed(6)
    base = (torch.rand(3, 5, 40, dtype=dtype) * 20 + 1e-3)
    for case in ("plain", "masked", "huge"):
        c = base.clone()
        if case == "masked":
            c[0, 1, :7] = 0.0
        if case == "huge":
            c[1, 2, 3] = 1e12
        c.requires_grad_()
        torch.manual_seed(7)
        w = nv.sample_dirichlet(None, dtype, c)
        (g,) = torch.autograd.grad((w * torch.arange(40, dtype=dtype)).sum(), c)
        torch.manual_seed(7)
        ref = nv.sample_dirichlet(c.log(), dtype, c)
        (gr,) = torch.autograd.grad((ref * torch.arange(40, dtype=dtype)).sum(), c)
        assert torch.equal(w, ref), case
        torch.testing.assert_close(g, gr, rtol=0, atol=0, equal_nan=True)  # d log(0) / d0: NaN on both paths, as for any log of 0
        if case == "masked":
            assert float(w.detach()[0, 1, :7].abs().sum()) == 0.0
    with pytest.raises(ValueError, match="give `log_concentration`"):
        nv.sample_dirichlet(None, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scratch_temporaries_give_the_same_draws_and_never_escape(dtype):
    """The sampler's temporaries in reused per-thread buffers: the same draws as fresh temporaries under one seed
    (bit for bit), and what a call returns is not overwritten by the next call."""
    from nvformer.core import sampling

    a = torch.rand(70_000, generator=torch.Generator().manual_seed(0), dtype=dtype) * 5 + 1.0
    draws = []
    for reuse in (True, False):
        torch.manual_seed(3)
        draws.append(sampling._marsaglia_tsang(a, spare=True, plus_one=True, reuse=reuse))
    for got, want in zip(draws[0], draws[1]):
        assert torch.equal(got, want)
    kept = [t.clone() for t in draws[0]]
    sampling._marsaglia_tsang(a * 2, spare=True, plus_one=True)
    for got, want in zip(draws[0], kept):
        assert torch.equal(got, want)



def test_transient_draws_of_sample_dirichlet_are_the_same_and_kept(monkeypatch):
    """Without a graph, sample_dirichlet's Gamma draws live in scratch buffers (it returns a fresh softmax of them):
    the same weights as with fresh tensors under one seed, not overwritten by the next draw; with a gradient
    the autograd path runs and gives the same draw too."""
    from nvformer.core import scratch

    c = torch.rand(4, 3, 40, 600, generator=torch.Generator().manual_seed(0)) * 4 + 0.05
    out = {}
    for name, cap in (("scratch", scratch.MAX_BYTES), ("fresh", 0)):
        monkeypatch.setattr(scratch, "MAX_BYTES", cap)
        torch.manual_seed(5)
        with torch.no_grad():
            out[name] = nv.sample_dirichlet(None, torch.float32, c)
    assert torch.equal(out["scratch"], out["fresh"])
    kept = out["scratch"].clone()
    with torch.no_grad():
        nv.sample_dirichlet(None, torch.float32, c * 2)
    assert torch.equal(out["scratch"], kept)
    torch.manual_seed(5)
    graph = nv.sample_dirichlet(None, torch.float32, c.clone().requires_grad_())
    assert graph.requires_grad and torch.equal(graph.detach(), kept)


@pytest.mark.parametrize("dtype, k", [(torch.float32, 24), (torch.float64, 53)])
def test_uniforms_from_random_bits_are_uniform_on_torchs_grid(dtype, k):
    """The sampler's uniforms from integer random bits: in [0, 1), on the grid of k-bit multiples torch's own
    uniform_ uses, and Uniform(0, 1) by a Kolmogorov-Smirnov distance below its 1e-3 critical value
    (1.95 / sqrt(n)); reproducible under one seed."""
    from nvformer.core import sampling

    n = 200_000
    torch.manual_seed(0)
    u = sampling._uniform(torch.empty(n, dtype=dtype))
    assert u.dtype == dtype and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert torch.equal(u * 2.0**k, (u * 2.0**k).floor())  # k-bit multiples
    ks = float(((torch.arange(1, n + 1, dtype=torch.float64) / n) - u.double().sort().values).abs().max())
    assert ks < 1.95 / math.sqrt(n)
    torch.manual_seed(0)
    assert torch.equal(sampling._uniform(torch.empty(n, dtype=dtype), torch.empty(n, dtype=sampling._UNIFORM_BITS[dtype][0])), u)


def test_sample_dirichlet_from_the_concentration_scans_it_once(monkeypatch):
    """Where a regime needs ``log a`` (a masked entry, a concentration under the floor or beyond the log-normal
    limit), the bounds of ``log a`` come from the one scan of ``a``: no second scan of ``log a``."""
    scans, real = [], torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda *a, **k: scans.append(1) or real(*a, **k))
    for value in (0.0, 1e-40, 1e12, None):
        c = torch.rand(2, 30, dtype=torch.float64) + 0.5
        if value is not None:
            c[0, :3] = value
        scans.clear()
        w = nv.sample_dirichlet(None, torch.float64, c)
        assert scans == [1], value
        assert torch.isfinite(w).all() and torch.allclose(w.sum(-1), torch.ones(2, dtype=torch.float64))

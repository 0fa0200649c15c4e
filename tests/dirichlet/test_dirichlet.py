"""Dirichlet attention (Cinquin et al. 2021) and the uncertainty metrics, against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

import nvformer as nv
from nvformer import metrics
from nvformer.dirichlet import functional as dfun
from nvformer.dirichlet import module as dmod
from nvformer.dirichlet.functional import DirichletSpec, dirichlet_attention, dirichlet_kl, log_concentrations
from nvformer.dirichlet.module import DirichletAttention


def test_dirichlet_kl_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    cq = torch.rand(5, 7, generator=g, dtype=torch.float64) * 5 + 0.05
    cp = torch.rand(5, 7, generator=g, dtype=torch.float64) * 3 + 0.1
    ref = torch.distributions.kl_divergence(torch.distributions.Dirichlet(cq), torch.distributions.Dirichlet(cp))
    torch.testing.assert_close(dirichlet_kl(cq.log(), cp.log()), ref, rtol=1e-10, atol=1e-10)
    # padded entries are not part of the distribution: equal to the KL over the visible ones
    pad = torch.zeros(5, 7, dtype=torch.bool)
    pad[:, 4:] = True
    ref_vis = torch.distributions.kl_divergence(torch.distributions.Dirichlet(cq[:, :4]), torch.distributions.Dirichlet(cp[:, :4]))
    torch.testing.assert_close(dirichlet_kl(cq.log().masked_fill(pad, float("-inf")), cp.log(), pad), ref_vis, rtol=1e-10, atol=1e-10)
    assert float(dirichlet_kl(cq.log(), cq.log()).abs().max()) < 1e-10
    assert float(dirichlet_kl(cq.log(), cp.log(), torch.ones_like(pad)).abs().max()) == 0.0


def _textbook_dirichlet_kl(log_cq, log_cp, pad):
    """The formula dirichlet_kl used before it was regrouped (exact enough at ordinary concentrations)."""
    keep = ~pad
    cq, cp = log_cq.exp().masked_fill(pad, 1.0), log_cp.exp().masked_fill(pad, 1.0)
    Cq, Cp = (cq * keep).sum(-1), (cp * keep).sum(-1)
    terms = (-torch.lgamma(cq) + torch.lgamma(cp) + (cq - cp) * (torch.digamma(cq) - torch.digamma(Cq)[..., None])) * keep
    return torch.lgamma(Cq) - torch.lgamma(Cp) + terms.sum(-1)


@pytest.mark.parametrize("spec", [DirichletSpec(), DirichletSpec(prior_tau=1.0)], ids=["centred", "broad-prior"])
@pytest.mark.parametrize("tau", [3.0, 10.0, 30.0])
def test_dirichlet_kl_equals_the_textbook_formula_at_the_bayes_study_concentrations(spec, tau):
    """The Bayes study (docs/RESULTS.md) ran at c = tau n softmax + eps with n <= 128 keys and tau ~ 10: there the
    regrouped formula equals the textbook one to 1e-12 relative (1e-11 absolute where the KL is near 0)."""
    g = torch.Generator().manual_seed(int(tau))
    for n in (2, 17, 128):
        logits = torch.randn(64, n, generator=g, dtype=torch.float64) * 3
        pad = torch.rand(64, n, generator=g) < 0.2
        pad[:, 0] = False
        log_c, log_c0, pad = log_concentrations(logits.masked_fill(pad, float("-inf")), spec, tau)
        torch.testing.assert_close(dirichlet_kl(log_c, log_c0, pad), _textbook_dirichlet_kl(log_c, log_c0, pad), rtol=1e-12, atol=1e-11)


def test_concentrations_follow_the_documented_forms():
    logits = torch.tensor([[1.0, 2.0, -0.5, float("-inf")]], dtype=torch.float64)
    p = torch.softmax(logits, -1)
    spec = DirichletSpec(tau=3.0, eps=1e-4, prior="centred", prior_tau=2.0)
    log_c, log_c0, pad = log_concentrations(logits, spec, 3.0)
    assert pad.tolist() == [[False, False, False, True]]
    torch.testing.assert_close(log_c.exp()[0, :3], 3.0 * 3 * p[0, :3] + 1e-4)
    torch.testing.assert_close(log_c0.exp()[0, :3], 2.0 * 3 * p[0, :3] + 1e-4)
    assert torch.isneginf(log_c[0, 3]) and torch.isneginf(log_c0[0, 3])
    spec = DirichletSpec(concentration="exp", prior="symmetric", prior_alpha=0.5, tau=2.0)
    log_c, log_c0, _ = log_concentrations(logits, spec, 2.0)
    torch.testing.assert_close(log_c.exp()[0, :3], 2.0 * logits[0, :3].exp() + 1e-4)
    torch.testing.assert_close(log_c0.exp()[0, :3], torch.full((3,), 0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="concentration"):
        DirichletSpec(concentration="relu")


def test_sampled_weights_have_dirichlet_moments():
    """Monte Carlo: 20000 samples; mean within 0.01 and variance within 10% of the Dirichlet's."""
    torch.manual_seed(0)
    q = torch.randn(1, 1, 1, 4, dtype=torch.float64)
    k = torch.randn(1, 1, 5, 4, dtype=torch.float64)
    v = torch.eye(5, dtype=torch.float64)[None, None]  # out = weights
    spec = DirichletSpec(tau=2.0)
    outs = dirichlet_attention(q.expand(1, 1, 20000, 4), k, v, None, spec, 2.0, sample=True)[0][0, 0]  # 20000 independent rows
    log_c, _, _ = log_concentrations((q @ k.transpose(-1, -2))[0, 0, 0] * 0.5, spec, 2.0)
    ref = torch.distributions.Dirichlet(log_c.exp())
    torch.testing.assert_close(outs.mean(0), ref.mean, atol=0.01, rtol=0)
    torch.testing.assert_close(outs.var(0), ref.variance, rtol=0.1, atol=1e-4)
    mean_out = dirichlet_attention(q, k, v, None, spec, 2.0, sample=False)[0][0, 0, 0]
    torch.testing.assert_close(mean_out, ref.mean)


def test_gradients_reach_scores_and_tau():
    """Implicit reparameterisation: d E[f(a)] / d theta from samples agrees with the closed form
    for f = a_0 (mean) within Monte Carlo error, and the KL passes gradcheck."""
    torch.manual_seed(1)
    logits = torch.randn(3, dtype=torch.float64, requires_grad=True)
    spec = DirichletSpec(tau=4.0)
    tau = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)

    def kl_fn(lg, t):
        a, b, pad = log_concentrations(lg, DirichletSpec(tau=4.0, prior="symmetric"), t)
        return dirichlet_kl(a, b, pad)

    assert torch.autograd.gradcheck(kl_fn, (logits, tau))
    from nvformer.core.sampling import sample_log_dirichlet

    log_c, _, pad = log_concentrations(logits, spec, tau)
    n = 40000
    a0 = sample_log_dirichlet(log_c.expand(n, 3), pad.expand(n, 3))[:, 0].exp().mean()
    (g_mc,) = torch.autograd.grad(a0, logits)
    exact = torch.softmax(logits, -1)[0]  # E[a_0] = c_0 / sum c, ~ softmax(logits)_0 up to eps
    (g_exact,) = torch.autograd.grad(exact, logits)
    torch.testing.assert_close(g_mc, g_exact, atol=0.02, rtol=0)


def test_module_matches_mha_in_mean_limit_and_masks():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    dl = DirichletAttention.from_mha(mha, DirichletSpec(eps=1e-12)).eval()
    x = torch.randn(2, 5, 8)
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    ref, ref_w = mha(x, x, x, key_padding_mask=kpm)
    out, w = dl(x, x, x, key_padding_mask=kpm)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)  # mean of Dir(tau n softmax + ~0) = softmax
    torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
    assert float(w.detach()[1, :, 3:].abs().max()) == 0.0
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    torch.testing.assert_close(dl(x, x, x, attn_mask=causal)[0], mha(x, x, x, attn_mask=causal)[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dl(x, x, x, is_causal=True)[0], mha(x, x, x, attn_mask=causal)[0], rtol=1e-5, atol=1e-6)
    assert dl.last_kl is None  # evaluation forwards skip the KL unless asked
    dmod.set_eval_kl(dl)
    dl(x, x, x, key_padding_mask=kpm)
    assert dl.last_kl.shape == (2,)
    # sampling: training and prediction="sample" differ between calls, the mean prediction does not
    dl.train()
    assert not torch.equal(dl(x, x, x)[0], dl(x, x, x)[0])
    nv.set_prediction(dl, "sample")
    dl.eval()
    assert not torch.equal(dl(x, x, x)[0], dl(x, x, x)[0])
    with pytest.raises(ValueError, match="no NV or Dirichlet"):
        nv.set_prediction(torch.nn.Linear(2, 2), "mean")


def test_tiny_training_run_lowers_the_elbo():
    """A one-layer Dirichlet-attention classifier on a toy task: the negative ELBO (NLL + KL / N) falls."""
    torch.manual_seed(0)
    N, L, E = 256, 6, 16
    tokens = torch.randint(0, 20, (N, L))
    y = (tokens == 3).any(-1).long()  # is token 3 present?
    emb = torch.nn.Embedding(20, E)
    att = DirichletAttention(E, 2, spec=DirichletSpec(tau=5.0))
    head = torch.nn.Linear(E, 2)
    params = [*emb.parameters(), *att.parameters(), *head.parameters()]
    opt = torch.optim.Adam(params, 1e-2)

    def neg_elbo():
        x = emb(tokens)
        h, _ = att(x, x, x)
        nll = torch.nn.functional.cross_entropy(head(h.mean(1)), y)
        return nll + att.last_kl.mean() / N

    att.train()
    first = float(neg_elbo().detach())
    for _ in range(150):
        loss = neg_elbo()
        opt.zero_grad()
        loss.backward()
        opt.step()
    losses = [float(neg_elbo().detach()) for _ in range(10)]
    assert sum(losses) / 10 < 0.5 * first
    assert att.dirichlet.log_tau.grad is not None


def test_hf_model_conversion(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                 attn_implementation="eager")).eval()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    ref = model(ids, attention_mask=mask).last_hidden_state
    nv.convert_dirichlet(model, DirichletSpec(eps=1e-12))
    out = model(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1, :5], ref[1, :5], rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="set_eval_kl"):
        dmod.dirichlet_kl_total(model)
    dmod.set_eval_kl(model)
    torch.testing.assert_close(model(ids, attention_mask=mask).last_hidden_state, out)  # the float64 path: same output
    assert dmod.dirichlet_kl_total(model).shape == (2,)
    model.train()
    model(ids, attention_mask=mask).last_hidden_state.sum().backward()
    assert model.encoder.layer[0].attention.self.dirichlet.log_tau.grad is not None


# ------------------------------------------------------------------------------------------ metrics


def test_uncertainty_metrics_against_direct_formulas():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, 50, 3, generator=g, dtype=torch.float64) * 2, -1)
    labels = torch.randint(0, 3, (50,), generator=g)
    m = metrics.uncertainty_metrics(probs, labels, n_bins=5)
    p = probs.mean(0)
    assert m["accuracy"] == pytest.approx(float((p.argmax(-1) == labels).double().mean()))
    assert m["nll"] == pytest.approx(-sum(math.log(float(p[i, labels[i]])) for i in range(50)) / 50)
    assert m["brier"] == pytest.approx(sum(float(((p[i] - torch.eye(3, dtype=torch.float64)[labels[i]]) ** 2).sum()) for i in range(50)) / 50)
    conf, pred = p.max(-1)
    ece = 0.0
    for b in range(5):
        sel = (conf > b / 5) & (conf <= (b + 1) / 5)
        if sel.any():
            ece += float(sel.double().mean() * (conf[sel].mean() - (pred[sel] == labels[sel]).double().mean()).abs())
    assert m["ece"] == pytest.approx(ece, abs=1e-5)
    bins = metrics.reliability_bins(probs, labels, n_bins=5)
    assert sum(bins["count"]) == 50


def test_entropy_mutual_information_and_auroc():
    same = torch.tensor([[[0.2, 0.8]], [[0.2, 0.8]]], dtype=torch.float64)
    assert float(metrics.mutual_information(same)) == pytest.approx(0.0, abs=1e-12)
    split = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]], dtype=torch.float64)
    assert float(metrics.mutual_information(split)) == pytest.approx(math.log(2))
    assert float(metrics.predictive_entropy(same)) == pytest.approx(-(0.2 * math.log(0.2) + 0.8 * math.log(0.8)))
    s_in, s_out = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.25, 0.4])
    # pairs (out > in): 0.25 beats 0.1, 0.2 (2 of 3); 0.4 beats all 3 -> 5/6
    assert metrics.ood_auroc(s_in, s_out) == pytest.approx(5 / 6)


def test_fit_temperature_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    true_logits = torch.randn(4000, 3, generator=g, dtype=torch.float64) * 2
    labels = torch.multinomial(torch.softmax(true_logits, -1), 1, generator=g)[:, 0]
    t = metrics.fit_temperature(true_logits * 3.0, labels)  # over-confident by 3x
    assert t == pytest.approx(3.0, rel=0.1)


def test_mean_path_without_kl_matches_the_float64_path_and_eval_kl_matches_the_formula():
    """The posterior-mean weights computed in float32 (no KL, the prediction path) equal the float64
    path's; with set_eval_kl the evaluation KL equals dirichlet_kl of the documented concentrations."""
    torch.manual_seed(0)
    spec = DirichletSpec(eps=1e-3)
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    bias = torch.zeros(2, 1, 5, 7).masked_fill(torch.tensor([False] * 5 + [True] * 2), float("-inf"))
    out32, w32, kl32 = dfun.dirichlet_attention(q, k, v, bias, spec, 10.0, sample=False, kl=False)
    out64, w64, kl64 = dfun.dirichlet_attention(q, k, v, bias, spec, 10.0, sample=False, kl=True)
    assert kl32 is None and w32.dtype == torch.float32
    torch.testing.assert_close(w32, w64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out32, out64, rtol=1e-5, atol=1e-6)
    # the closed forms against the Dirichlet mean c / sum(c) of torch.distributions, both concentrations
    logits = (((q @ k.transpose(-1, -2)) * 0.5) + bias).double()
    for conc in ("softmax", "exp"):
        sp = DirichletSpec(concentration=conc, eps=1e-3)
        lc, _, pd = dfun.log_concentrations(logits, sp, 10.0)
        ref = torch.distributions.Dirichlet(lc[..., :5].exp()).mean  # the 5 visible keys
        got = dfun.mean_weights(logits, sp, 10.0)
        torch.testing.assert_close(got[..., :5], ref, rtol=1e-10, atol=1e-12)
        assert float(got[..., 5:].abs().max()) == 0.0
        # without a mask, the unmasked shortcut (masked=False) against Dirichlet(c).mean, with tau's gradient
        tau = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
        plain = logits[..., :5]
        fast = dfun.mean_weights(plain, sp, tau, masked=False)
        slow = dfun.mean_weights(plain, sp, tau)
        torch.testing.assert_close(fast, torch.distributions.Dirichlet(dfun.log_concentrations(plain, sp, 10.0)[0].exp()).mean,
                                   rtol=1e-10, atol=1e-12)
        g_fast, g_slow = (torch.autograd.grad((w * torch.arange(5.0, dtype=torch.float64)).sum(), tau)[0] for w in (fast, slow))
        torch.testing.assert_close(g_fast, g_slow, rtol=1e-10, atol=1e-12)
    log_c, log_c0, pad = dfun.log_concentrations(((q @ k.transpose(-1, -2)) * 0.5).double() + bias.double(), spec, 10.0)
    torch.testing.assert_close(kl64, dfun.dirichlet_kl(log_c, log_c0, pad))
    mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    dl = DirichletAttention.from_mha(mha, spec).eval()
    dl(torch.randn(1, 3, 8), torch.randn(1, 3, 8), torch.randn(1, 3, 8))
    with pytest.raises(RuntimeError, match="set_eval_kl"):
        dmod.dirichlet_kl_total(dl)
    with pytest.raises(ValueError, match="no Dirichlet"):
        dmod.set_eval_kl(torch.nn.Linear(2, 2))


def test_unconvert_removes_dirichlet_attention():
    from hf_models import build, inputs, output

    model = build("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw, _ = inputs("bert", "right")
    with torch.no_grad():
        ref = output(model, kw)
    nv.convert_dirichlet(model, DirichletSpec(tau=2.0))
    assert model.config._attn_implementation != "sdpa"
    nv.unconvert(model)
    assert model.config._attn_implementation == "sdpa" and not any(hasattr(m, "dirichlet") for m in model.modules())
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        torch.testing.assert_close(output(model, kw), ref, rtol=0, atol=0)


def test_hf_kl_leaves_out_padded_queries_like_the_module():
    """The KL of a padded sequence equals that of the same sequence alone (its padded queries add nothing)."""
    from hf_models import build

    model = nv.convert_dirichlet(build("bert"))
    dmod.set_eval_kl(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, 5:] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        padded = dmod.dirichlet_kl_total(model)[0]
        model(input_ids=ids[:1, :5], attention_mask=mask[:1, :5])
        alone = dmod.dirichlet_kl_total(model)[0]
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("tau,scale", [(12.0, 3.0), (30.0, 6.0), (3.0, 1.0)])
def test_float32_kl_and_its_gradients_match_the_float64_path(tau, scale):
    """Float32 models keep the KL's per-entry terms in float32 and its per-row terms in float64: at
    attention-like concentrations (prior_tau 10, n up to 128 keys, 20% padding, some concentrations
    above 1000) the KL is within 2e-3 of the float64 path's and its gradients with respect to the scores
    and tau within 1e-4 of the float64 gradients' largest magnitude (float32 rounding of lgamma over n keys)."""
    g = torch.Generator().manual_seed(int(tau))
    for n in (17, 128):
        logits = torch.randn(128, n, generator=g, dtype=torch.float64) * scale
        pad = torch.rand(128, n, generator=g) < 0.2
        pad[:, 0] = False
        lg = logits.masked_fill(pad, float("-inf"))
        out = {}
        for dt in (torch.float64, torch.float32):
            x = lg.to(dt).requires_grad_(True)
            t = torch.tensor(tau, dtype=dt, requires_grad=True)
            log_c, log_c0, pd = log_concentrations(x, DirichletSpec(prior_tau=10.0), t)
            assert log_c.dtype == dt
            kl = dirichlet_kl(log_c, log_c0, pd)
            assert kl.dtype == torch.float64
            out[dt] = (kl.detach(), *(v.double().nan_to_num() for v in torch.autograd.grad(kl.sum(), (x, t))))
        (k64, gx64, gt64), (k32, gx32, gt32) = out[torch.float64], out[torch.float32]
        torch.testing.assert_close(k32, k64, rtol=1e-4, atol=2e-3)
        assert float((gx32 - gx64).abs().max()) <= 1e-4 * float(gx64.abs().max())
        torch.testing.assert_close(gt32, gt64, rtol=1e-5, atol=0)
    # the same scores give the same concentrations bit for bit: the KL of a posterior at its prior is exactly 0
    lc, lc0, pd = log_concentrations(torch.randn(4, 9), DirichletSpec(), 10.0)
    assert float(dirichlet_kl(lc, lc0, pd).abs().max()) == 0.0


def test_kl_of_concentrations_above_1000_matches_torch_distributions():
    """Entries whose concentrations reach 1000 take the O(log c) form, summed into their own rows:
    against torch.distributions in float64 (rows with none, some and all such entries, padding),
    the float32 path against the float64 KL of its rounded inputs, and gradcheck through that branch."""
    g = torch.Generator().manual_seed(5)
    log_cq = torch.randn(6, 5, generator=g, dtype=torch.float64) * 2
    log_cp = torch.randn(6, 5, generator=g, dtype=torch.float64) * 2
    log_cq[1, 2], log_cp[3, 0], log_cq[4] = 8.0, 7.5, torch.tensor([7.0, 9.0, 8.0, 7.2, 10.0], dtype=torch.float64)
    log_cp[4] = log_cq[4] - 0.3
    pad = torch.zeros(6, 5, dtype=torch.bool)
    pad[3, 4] = pad[5, 1:] = True
    got = dirichlet_kl(log_cq.masked_fill(pad, float("-inf")), log_cp, pad)
    for r in range(6):
        keep = ~pad[r]
        ref = torch.distributions.kl_divergence(torch.distributions.Dirichlet(log_cq[r, keep].exp()),
                                                torch.distributions.Dirichlet(log_cp[r, keep].exp()))
        assert float(got[r]) == pytest.approx(float(ref), rel=1e-9, abs=1e-9)
    # float32 inputs: against the float64 KL of the same (rounded) log concentrations
    q32, p32 = log_cq.float().masked_fill(pad, float("-inf")), log_cp.float()
    # float32 rounds log C to an ulp (5e-7 at C ~ 1e3): the KL to about ulp(log C) C (C: up to 3.6e4 here)
    C = torch.stack([q32.double().exp().sum(-1), p32.double().exp().masked_fill(pad, 0.0).sum(-1)]).amax(0)
    err = (dirichlet_kl(q32, p32, pad) - dirichlet_kl(q32.double(), p32.double(), pad)).abs()
    assert bool((err <= 2e-6 * C + 1e-4).all()), (err, C)
    x = log_cq.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: dirichlet_kl(a.masked_fill(pad, float("-inf")), log_cp, pad), (x,))


def test_float32_sampling_has_dirichlet_moments_and_pathwise_gradients():
    """Float32 log-space draws (the path of float32 models): Monte Carlo moments of 20000 rows
    within 0.01 (mean) and 10% (variance) of the Dirichlet's; the implicit-reparameterisation gradient
    of E[a_0] within Monte Carlo error of the closed form and of torch.distributions' own rsample
    gradient; the float32 and float64 paths agree within the same error."""
    from nvformer.core.sampling import sample_log_dirichlet

    torch.manual_seed(3)
    logits = torch.tensor([0.3, -1.0, 1.2, 0.0], requires_grad=True)
    spec = DirichletSpec(tau=2.0)
    log_c, _, pad = log_concentrations(logits, spec, 2.0)
    n = 20000
    draws = sample_log_dirichlet(log_c.expand(n, 4), pad.expand(n, 4), dtype=torch.float32)
    assert draws.dtype == torch.float32
    ref = torch.distributions.Dirichlet(log_c.detach().double().exp())
    torch.testing.assert_close(draws.detach().exp().double().mean(0), ref.mean, atol=0.01, rtol=0)
    torch.testing.assert_close(draws.detach().exp().double().var(0), ref.variance, rtol=0.1, atol=1e-4)
    grads = {}
    for name, sample in (("f32", lambda lc: sample_log_dirichlet(lc, pad.expand(n, 4), dtype=torch.float32).exp()),
                         ("f64", lambda lc: sample_log_dirichlet(lc.double(), pad.expand(n, 4), dtype=torch.float64).exp()),
                         ("torch", lambda lc: torch.distributions.Dirichlet(lc.double().exp()).rsample())):
        lc, _, _ = log_concentrations(logits, spec, 2.0)
        (grads[name],) = torch.autograd.grad(sample(lc.expand(n, 4))[:, 0].mean(), logits)
    (exact,) = torch.autograd.grad(torch.softmax(logits, -1)[0], logits)  # E[a_0] = c_0 / sum c ~ softmax_0 (up to eps)
    for name in grads:
        torch.testing.assert_close(grads[name].double(), exact.double(), atol=0.02, rtol=0)
    torch.testing.assert_close(grads["f32"].double(), grads["torch"].double(), atol=0.03, rtol=0)
    torch.testing.assert_close(grads["f32"].double(), grads["f64"].double(), atol=0.03, rtol=0)
    with pytest.raises(ValueError, match="dtype"):
        sample_log_dirichlet(log_c, dtype=torch.float16)


def test_float32_training_forward_works_in_float32_with_a_float64_kl():
    """A float32 training forward: float32 weights and output, a float64 KL equal to the float32
    concentrations' KL, finite gradients for the projections and tau."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    layer = DirichletAttention.from_mha(mha).train()
    x = torch.randn(2, 11, 16)
    kpm = torch.zeros(2, 11, dtype=torch.bool)
    kpm[1, 8:] = True
    out, w = layer(x, x, x, key_padding_mask=kpm, average_attn_weights=False)
    assert out.dtype == w.dtype == torch.float32 and layer.last_kl.dtype == torch.float64
    assert torch.isfinite(layer.last_kl).all() and float(w[1, :, :, 8:].abs().max()) == 0.0
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 11))
    (out.sum() + layer.last_kl.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    assert layer.dirichlet.log_tau.grad is not None and float(layer.dirichlet.log_tau.grad.abs()) > 0


def test_log_concentrations_without_the_prior_give_the_same_posterior():
    """A sample without its KL skips the prior: ``log c`` unchanged, ``log c0`` None; padded keys
    stay -inf either way."""
    logits = torch.randn(2, 3, 4, 6)
    logits[0, ..., 4:] = float("-inf")
    for spec in (DirichletSpec(), DirichletSpec(concentration="exp", prior="symmetric")):
        lc, lc0, pad = log_concentrations(logits, spec, 10.0)
        lc_only, none, pad2 = log_concentrations(logits, spec, 10.0, prior=False)
        assert none is None and torch.equal(lc, lc_only) and torch.equal(pad, pad2)
        assert torch.isneginf(lc[0, ..., 4:]).all() and torch.isneginf(lc0[0, ..., 4:]).all() and torch.isfinite(lc[1]).all()


def test_dirichlet_kl_padding_shortcut_and_padded_rows_agree():
    """No pad, an all-False pad and a padded copy of the same rows give one KL (float64, against
    ``torch.distributions``); a fully padded row gives 0."""
    g = torch.Generator().manual_seed(3)
    lq, lp = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(torch.distributions.Dirichlet(lq.exp()), torch.distributions.Dirichlet(lp.exp()))
    torch.testing.assert_close(dirichlet_kl(lq, lp), ref, rtol=1e-10, atol=1e-12)
    assert torch.equal(dirichlet_kl(lq, lp), dirichlet_kl(lq, lp, torch.zeros(4, 5, dtype=torch.bool)))
    pad = torch.zeros(5, 7, dtype=torch.bool)
    pad[:4, 5:] = True
    pad[4] = True
    wide = lambda x: torch.cat([torch.cat([x, torch.full((4, 2), -math.inf, dtype=x.dtype)], 1), torch.zeros(1, 7, dtype=x.dtype)])  # noqa: E731
    kl = dirichlet_kl(wide(lq), wide(lp), pad)
    torch.testing.assert_close(kl[:4], ref, rtol=1e-10, atol=1e-12)
    assert kl[4] == 0


@pytest.mark.parametrize("prior_grad", [False, True])
def test_kl_entry_terms_and_their_written_out_gradients(prior_grad):
    """dirichlet_kl's per-entry terms: values and first derivatives (written out by hand) against autograd
    of the textbook expression, and gradcheck, in float64, with and without a gradient for the prior."""
    torch.manual_seed(0)
    cq = torch.randn(4, 9, dtype=torch.float64).mul(2).exp().requires_grad_()
    cp = torch.randn(4, 9, dtype=torch.float64).exp().requires_grad_(prior_grad)
    out = dfun._EntryTerms.apply(cq, cp)
    ref = torch.lgamma(cp) - torch.lgamma(cq) + (cp - cq) * (1.0 - torch.digamma(cq))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    w = torch.randn(4, 9, dtype=torch.float64)
    inputs = (cq, cp) if prior_grad else (cq,)
    for g, r in zip(torch.autograd.grad((out * w).sum(), inputs), torch.autograd.grad((ref * w).sum(), inputs)):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(dfun._EntryTerms.apply, (cq, cp))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_linear_space_concentrations_match_the_log_space_form(dtype, monkeypatch):
    """"softmax" concentrations formed as ``tau n softmax + eps`` then logged equal the ``logaddexp``
    form (forced by a zero threshold) to rounding, with and without hidden keys, values and
    gradients; the sampler fed ``c`` draws what it draws from ``log c`` on the same stream."""
    torch.manual_seed(0)
    logits = (torch.randn(2, 3, 5, 9, dtype=dtype) * 4).requires_grad_()
    hide = torch.zeros(2, 3, 5, 9, dtype=torch.bool)
    hide[0, :, :, 6:] = True
    tol = dict(rtol=0, atol=2e-5) if dtype == torch.float32 else dict(rtol=0, atol=1e-12)
    spec = DirichletSpec(eps=1e-3)
    for lg in (logits, logits.masked_fill(hide, float("-inf"))):
        lin = dfun._concentrations(lg, spec, 7.0, prior=True, masked=True)
        g_lin = torch.autograd.grad(lin[0].masked_fill(torch.isinf(lin[0]), 0.0).sum(), logits, retain_graph=True)[0]
        with monkeypatch.context() as m:
            m.setattr(dfun, "_LINEAR_BELOW", 0.0)
            ref = dfun._concentrations(lg, spec, 7.0, prior=True, masked=True)
        g_ref = torch.autograd.grad(ref[0].masked_fill(torch.isinf(ref[0]), 0.0).sum(), logits)[0]
        assert lin[3] is not None and ref[3] is None
        for a, b in ((lin[0], ref[0]), (lin[1], ref[1]), (g_lin, g_ref)):
            torch.testing.assert_close(a, b, **tol)
        torch.testing.assert_close(lin[3], lin[0].exp(), **tol)
        torch.manual_seed(1)
        w = nv.sample_dirichlet(lin[0], dtype, lin[3])
        torch.manual_seed(1)
        torch.testing.assert_close(w, nv.sample_dirichlet(lin[0], dtype), rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-6)

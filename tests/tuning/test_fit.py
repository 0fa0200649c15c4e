"""nvformer.fit_knobs and knob_gradients: gradients against finite differences (float64), the
identity corner's vanishing gradients, planted knobs recovered from the identity, early stopping,
frozen weights, adapters, and bad arguments refused before any work."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hf_models import build, inputs
from torch import nn

import nvformer as nv
from nvformer.api import knob_groups
from nvformer.tuning.fit import knob_gradients


def _converted(family="bert", attn="sdpa", B=3, N=7):
    m = build(family, attn).double()
    kw, _ = inputs(family, "right", B=B, N=N)
    nv.convert(m, prior=nv.estimate_prior(m, [kw], show_progress=False))
    return m, kw


def _away(m, u=1.0, stdev=0.3, mu=0.9):
    """Every NVIB at alpha_tau s_alpha = u nats, stdev_tau, mu_tau: a point where every knob matters."""
    for _, _, nvib in knob_groups(m):
        nvib.set_knobs(alpha_tau=u / float(nvib.prior.log_alpha_std), stdev_tau=stdev, mu_tau=mu)


def _token_nll(out, batch):
    """Next-token NLL in float64 from the logits (HF causal LMs upcast their own loss to float32)."""
    lg = out.logits.double()
    if "decoder_input_ids" in batch:
        y = batch["decoder_input_ids"]
    else:
        lg, y = lg[:, :-1], batch["input_ids"][:, 1:]
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1))


def _central(m, f, nvib, knob, h):
    v = getattr(nvib, knob)
    nvib.set_knobs(**{knob: v + h})
    fp = f()
    nvib.set_knobs(**{knob: v - h})
    fm = f()
    nvib.set_knobs(**{knob: v})
    return (fp - fm) / (2 * h)


@pytest.mark.parametrize("family,attn", [("bert", "sdpa"), ("bert", "eager"), ("gpt2", "sdpa"), ("bart", "sdpa"), ("bart", "eager")])
def test_knob_gradients_match_finite_differences(family, attn):
    """Every knob of every NVIB (encoder, causal decoder, the shared cross-attention NVIB), float64:
    central differences with h = 1e-6 (truncation ~1e-12) against the chain rule fit_knobs uses."""
    m, kw = _converted(family, attn)
    batch = dict(kw, labels=torch.tensor([0, 1, 1])) if family == "bert" else kw
    objective = "nll" if family == "bert" else _token_nll
    _away(m)
    got = knob_gradients(m, batch, objective)
    loss = (lambda: float(m(**batch).loss)) if family == "bert" else (lambda: float(_token_nll(m(**batch), batch)))
    with torch.no_grad():
        for key, _, nvib in knob_groups(m):
            for knob in nv.Knobs().as_dict():
                fd = _central(m, loss, nvib, knob, 1e-6)
                assert got[key][knob] == pytest.approx(fd, rel=2e-4, abs=1e-10), (key, knob)


def test_knob_gradients_match_finite_differences_with_rope_and_gqa(monkeypatch):
    """Llama (RoPE, grouped-query attention, the rotary value interpolation at stdev_tau > 0).
    Its RMSNorm rounds to float32 even in a float64 model, which makes differences noisy; for
    this test it normalises in the input's dtype."""
    import transformers.models.llama.modeling_llama as llama

    def rms_norm(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    monkeypatch.setattr(llama.LlamaRMSNorm, "forward", rms_norm)
    m, kw = _converted("llama", "sdpa")
    _away(m)
    got = knob_gradients(m, kw, _token_nll)
    with torch.no_grad():
        for key, _, nvib in knob_groups(m):
            for knob in nv.Knobs().as_dict():
                fd = _central(m, lambda: float(_token_nll(m(**kw), kw)), nvib, knob, 1e-6)
                assert got[key][knob] == pytest.approx(fd, rel=2e-4, abs=1e-9), (key, knob)


def test_knob_gradients_of_a_converted_pytorch_transformer():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double().eval()
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    nv.convert(enc, prior=nv.estimate_prior(enc, [x], show_progress=False))
    _away(enc)
    w = torch.randn(3, 6, 16, dtype=torch.float64)
    objective = lambda out, batch: (out * w).sum()  # noqa: E731
    got = knob_gradients(enc, x, objective)
    with torch.no_grad():
        for key, _, nvib in knob_groups(enc):
            for knob in nv.Knobs().as_dict():
                fd = _central(enc, lambda: float((enc(x) * w).sum()), nvib, knob, 1e-6)
                # the sum is ~20: float64 rounding over 2h = 2e-6 leaves ~1e-9 of noise in the difference
                assert got[key][knob] == pytest.approx(fd, rel=2e-4, abs=2e-8), (key, knob)


def test_gradients_vanish_at_the_identity_corner_and_not_at_the_start():
    """At alpha_tau = 1e4 the prior's weight exp(c - 1e4 s_alpha) is 0 in floating point, and the
    variance (stdev_tau sigma_p)^2 has zero derivative at stdev_tau = 0: both gradients are 0
    (docs/MATH.md section 4). mu_tau's is not. At fit_knobs' start (5 nats, stdev_tau 0.05) none is."""
    m, kw = _converted()
    batch = dict(kw, labels=torch.tensor([0, 1, 1]))
    at_identity = knob_gradients(m, batch)
    for g in at_identity.values():
        assert abs(g["alpha_tau"]) < 1e-15 and g["stdev_tau"] == 0.0
    assert any(abs(g["mu_tau"]) > 1e-5 for g in at_identity.values())
    _away(m, u=5.0, stdev=0.05, mu=1.0)
    for g in knob_gradients(m, batch).values():
        assert abs(g["alpha_tau"]) > 1e-8 and abs(g["stdev_tau"]) > 1e-8


def _planted(groups="layer"):
    """A teacher: the model at known knobs per layer; the student starts at the identity."""
    m, kw = _converted(B=16, N=9)
    star = {"encoder.0": (1.0, 0.4), "encoder.1": (2.0, 0.6)}
    for key, _, nvib in knob_groups(m):
        u, sd = star[key] if groups == "layer" else (1.5, 0.5)
        nvib.set_knobs(alpha_tau=u / float(nvib.prior.log_alpha_std), stdev_tau=sd)
    with torch.no_grad():
        target = m(**kw).logits
    nv.set_knobs(m, nv.IDENTITY)
    return m, kw, star, (lambda out, batch: ((out.logits - target) ** 2).mean())


def _nats(nvib):
    return nvib.alpha_tau * float(nvib.prior.log_alpha_std)


def test_planted_knobs_per_layer_are_recovered_from_the_identity():
    m, kw, star, objective = _planted()
    res = nv.fit_knobs(m, [kw], objective, steps=300, lr=0.05, show_progress=False)
    assert res.history[-1]["train"] < 1e-10
    for key, _, nvib in knob_groups(m):
        assert _nats(nvib) == pytest.approx(star[key][0], abs=1e-3)
        assert nvib.stdev_tau == pytest.approx(star[key][1], abs=1e-3)
        assert nvib.in_identity_form()
    assert res.knobs == nv.get_knobs(m) and res.steps == 300 and res.forward_equivalents == 900


def test_site_groups_share_one_setting_in_nats():
    m, kw, _, objective = _planted(groups="site")
    res = nv.fit_knobs(m, [kw], objective, groups="site", steps=300, lr=0.05, show_progress=False)
    nvibs = [nvib for _, _, nvib in knob_groups(m)]
    assert [_nats(n) for n in nvibs] == pytest.approx([1.5, 1.5], abs=1e-3)
    assert nvibs[0].stdev_tau == nvibs[1].stdev_tau == pytest.approx(0.5, abs=1e-3)
    assert res.history[-1]["train"] < 1e-10


def test_the_pull_to_identity_keeps_knobs_nearer_the_corner():
    m, kw, _, objective = _planted()
    free = nv.fit_knobs(m, [kw], objective, steps=100, lr=0.05, show_progress=False).knobs
    nv.set_knobs(m, nv.IDENTITY)
    pulled = nv.fit_knobs(m, [kw], objective, steps=100, lr=0.05, to_identity=10.0, show_progress=False).knobs
    for key in free:
        assert pulled[key].stdev_tau < free[key].stdev_tau


def test_weights_stay_frozen_and_the_model_is_left_as_it_was_apart_from_the_knobs(tmp_path):
    m, kw = _converted()
    m.train()
    batch = dict(kw, labels=torch.tensor([0, 1, 1]))
    before = copy.deepcopy(m.state_dict())
    flags = {n: p.requires_grad for n, p in m.named_parameters()}
    res = nv.fit_knobs(m, [batch], "nll", steps=5, show_progress=False)
    nvib_names = {n for n, _ in m.named_parameters() if ".nvib." in n or n.startswith("nvib.")}
    assert nvib_names
    for n, v in m.state_dict().items():
        if n not in nvib_names:
            assert torch.equal(v, before[n]), n
    assert {n: p.requires_grad for n, p in m.named_parameters()} == flags
    assert all(p.grad is None for p in m.parameters())
    assert m.training
    assert all(nvib.in_identity_form() for _, _, nvib in knob_groups(m))
    # the fitted knobs are an adapter: kilobytes, and the same outputs after loading
    nv.save_adapter(m, tmp_path / "fit")
    m.eval()
    with torch.no_grad():
        want = m(**kw).logits
    fresh = build("bert", "sdpa").double()
    nv.load_adapter(fresh, tmp_path / "fit")
    with torch.no_grad():
        torch.testing.assert_close(fresh(**kw).logits, want, rtol=0, atol=1e-12)
    assert nv.get_knobs(fresh) == res.knobs


def test_validation_keeps_the_best_point_and_stops_early():
    """A validation objective that fitting can only make worse: the knobs before fitting are kept,
    exactly, and fitting stops after `patience` measurements."""
    m, kw, _, objective = _planted()
    before = copy.deepcopy(m.state_dict())
    adverse = lambda out, batch: -objective(out, batch)  # noqa: E731
    res = nv.fit_knobs(m, [kw], lambda out, batch: objective(out, batch) if torch.is_grad_enabled() else adverse(out, batch),
                       steps=50, lr=0.05, validation=[kw], eval_every=2, patience=3, show_progress=False)
    assert res.best_step == 0 and res.steps == 6 and len(res.history) == 3
    assert res.best_value == res.initial_value
    for n, v in m.state_dict().items():
        assert torch.equal(v, before[n]), n
    # with the objective itself on validation, the last improving point is kept
    res = nv.fit_knobs(m, [kw], objective, steps=20, lr=0.05, validation=[kw], eval_every=5, show_progress=False)
    assert res.best_step == 20 and res.best_value < res.initial_value
    assert [r["step"] for r in res.history] == [5, 10, 15, 20]


@pytest.mark.parametrize("kwargs,match", [
    (dict(objective="kl"), "`objective` must be one of"),
    (dict(groups="heads"), "`groups` must be one of"),
    (dict(knobs=()), "non-empty subset"),
    (dict(knobs=("alpha_tau", "beta")), "non-empty subset"),
    (dict(steps=0), "`steps` must be an int >= 1"),
    (dict(lr=-1.0), "`lr`"),
    (dict(to_identity=float("nan")), "`to_identity`"),
    (dict(batches=[]), "`batches` is empty"),
    (dict(validation=[]), "`validation` is empty"),
])
def test_bad_arguments_are_refused_before_any_work(kwargs, match):
    m, kw = _converted()
    before = copy.deepcopy(m.state_dict())
    args = {"batches": [kw], "objective": "entropy"} | kwargs
    with pytest.raises(ValueError, match=match):
        nv.fit_knobs(m, args.pop("batches"), args.pop("objective"), show_progress=False, **args)
    for n, v in m.state_dict().items():
        assert torch.equal(v, before[n])


def test_unconverted_or_trained_models_are_refused():
    m = build("bert", "sdpa")
    kw, _ = inputs("bert", None)
    with pytest.raises(ValueError, match="no NV attention module"):
        nv.fit_knobs(m, [kw], "entropy", show_progress=False)
    nv.convert(m)
    with torch.no_grad():
        knob_groups(m)[0][2].mu_proj.weight[0, 1] = 0.5
    with pytest.raises(ValueError, match="trained away from its identity form"):
        nv.fit_knobs(m, [kw], "entropy", show_progress=False)


def test_per_head_knob_gradients_match_finite_differences():
    m, kw = _converted(B=8, N=9)
    batch = dict(kw, labels=torch.randint(0, 2, (8,), generator=torch.Generator().manual_seed(0)))
    for _, _, nvib in knob_groups(m):
        s = float(nvib.prior.log_alpha_std)
        nvib.set_head_knobs([0.5 / s, 1.0 / s, 2.0 / s, -0.5 / s], [0.1, 0.2, 0.3, 0.4])
    got = knob_gradients(m, batch, heads=True)
    assert nv.get_head_knobs(m)  # left as they were
    with torch.no_grad():
        for key, _, nvib in knob_groups(m):
            for knob in ("alpha_tau", "stdev_tau"):
                for i in range(nvib.kv_heads):
                    hk = nvib.head_knobs()
                    v = list(hk[knob])
                    v[i] += 1e-6
                    nvib.set_head_knobs(**{**hk, knob: v})
                    fp = float(m(**batch).loss)
                    v[i] -= 2e-6
                    nvib.set_head_knobs(**{**hk, knob: v})
                    fm = float(m(**batch).loss)
                    nvib.set_head_knobs(**hk)
                    assert got[key][knob][i] == pytest.approx((fp - fm) / 2e-6, rel=2e-4, abs=1e-10), (key, knob, i)


def test_planted_per_head_knobs_are_recovered_from_the_identity():
    """A teacher with different knobs per head; the student matches its hidden states (enough to
    tell the heads apart) starting from the identity, with groups='head'."""
    m, kw = _converted(B=16, N=9)
    star = ([0.5, 1.0, 2.0, 1.5], [0.2, 0.3, 0.4, 0.5])
    for _, _, nvib in knob_groups(m):
        s = float(nvib.prior.log_alpha_std)
        nvib.set_head_knobs([u / s for u in star[0]], star[1])
    batch = dict(kw, output_hidden_states=True)
    with torch.no_grad():
        target = m(**batch).hidden_states
    for _, _, nvib in knob_groups(m):
        nvib.set_head_knobs()
    nv.set_knobs(m, nv.IDENTITY)
    objective = lambda out, b: sum(((a - t) ** 2).mean() for a, t in zip(out.hidden_states, target))  # noqa: E731
    res = nv.fit_knobs(m, [batch], objective, groups="head", steps=300, lr=0.05, show_progress=False)
    assert res.history[-1]["train"] < 1e-8
    for key, _, nvib in knob_groups(m):
        s = float(nvib.prior.log_alpha_std)
        assert [a * s for a in res.head_knobs[key]["alpha_tau"]] == pytest.approx(star[0], abs=0.05)
        assert res.head_knobs[key]["stdev_tau"] == pytest.approx(star[1], abs=0.02)
    assert res.head_knobs == nv.get_head_knobs(m)


def test_per_head_fitting_needs_a_hugging_face_model():
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    nv.convert(enc)
    with pytest.raises(ValueError, match="groups='head' needs a converted Hugging Face model"):
        nv.fit_knobs(enc, [torch.randn(2, 3, 16)], lambda out, b: out.sum(), groups="head", show_progress=False)

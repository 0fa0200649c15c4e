"""The fused self-attention path of converted models (nvformer.hf.forward._fused_forward) against the
general path, which builds the latent and its per-key terms (docs/MATH.md section 3), and the latent
it builds only when it is read."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import SEQ2SEQ, build, inputs, output

import nvformer as nv
import nvformer.hf.forward as fwd
from nvformer.api import nv_modules

AWAY = dict(mu_tau=0.8, stdev_tau=0.4, alpha_tau=0.5)
ROPE = ("llama", "qwen2")  # with token variances, rotary models take the general path (their value channels): stdev_tau = 0


def _away(family):
    return dict(AWAY, stdev_tau=0.0) if family in ROPE else AWAY


def _trained_like(nvm, family, seed=3):
    """Perturb the NVIBs as training would, keeping the structure the fused path reads (mean projection
    c I, shared token variance): pseudo-count weights, mean bias, variance bias (not for rotary models)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in nv_modules(nvm):
            n = m.nvib
            for p in (n.alpha_lin, n.alpha_quad, n.mu_proj.bias) + (() if family in ROPE else (n.logvar_proj.bias,)):
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return nvm


def _compare(a, b, valid, atol):
    if valid is not None and a.dim() == 3:
        a, b = a[valid], b[valid]
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


def _general_only(monkeypatch):
    monkeypatch.setattr(fwd, "_fused_applicable", lambda *a, **k: False)


def _fused_calls(monkeypatch) -> list[int]:
    calls, real = [], fwd._fused_forward
    monkeypatch.setattr(fwd, "_fused_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2", "bart"])
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_path_equals_general_path(family, padding, dtype, monkeypatch):
    """Away from the identity, with an estimated prior (non-zero mean bias) and NVIB weights moved as by
    training: the fused path (keys from x, per-key terms as one weighted sum) equals the general path."""
    model = build(family).to(dtype)
    kw, valid = inputs(family, padding)
    priors = nv.estimate_prior(model, [kw], show_progress=False)
    nvm = _trained_like(nv.convert(copy.deepcopy(model), prior=priors, **_away(family)), family)
    calls = _fused_calls(monkeypatch)
    with torch.no_grad():
        fused = output(nvm, kw | {"use_cache": False} if family in ("llama", "gpt2") else kw)
    assert calls, "the fused path was not taken"
    _general_only(monkeypatch)
    with torch.no_grad():
        general = output(nvm, kw | {"use_cache": False} if family in ("llama", "gpt2") else kw)
    _compare(fused, general, valid, 1e-12 if dtype == torch.float64 else 2e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_fused_path_with_a_kv_cache_equals_the_general_path(family, monkeypatch):
    """Prompt and one-token steps with a KV cache through the fused path (keys and terms from x) give the
    general path's logits (latent, per-key terms, then the cache), and generate() the same tokens."""
    model = build(family)
    kw, valid = inputs(family, "left")
    nvm = _trained_like(nv.convert(copy.deepcopy(model), prior=nv.estimate_prior(model, [kw], show_progress=False), **_away(family)), family)
    ids, am = kw["input_ids"], kw["attention_mask"]
    gk = dict(max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=0)

    def run():
        with torch.no_grad():
            out = nvm(input_ids=ids[:, :3], attention_mask=am[:, :3], use_cache=True)
            steps = [out.logits]
            for t in range(3, ids.shape[1]):
                out = nvm(input_ids=ids[:, t : t + 1], attention_mask=am[:, : t + 1], past_key_values=out.past_key_values, use_cache=True)
                steps.append(out.logits)
            return torch.cat(steps, 1), nvm.generate(**kw, **gk)

    calls = _fused_calls(monkeypatch)
    fused, fused_tokens = run()
    assert calls
    _general_only(monkeypatch)
    general, general_tokens = run()
    _compare(fused, general, valid, 2e-5)
    assert torch.equal(fused_tokens, general_tokens)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_fused_path_at_the_identity_equals_the_original(family, monkeypatch):
    model = build(family)
    kw, valid = inputs(family, "left")
    nvm = nv.convert(copy.deepcopy(model), prior=nv.estimate_prior(model, [kw], show_progress=False), **nv.IDENTITY.as_dict())
    calls = _fused_calls(monkeypatch)
    with torch.no_grad():
        a, b = output(nvm, kw), output(model, kw)
    assert calls
    _compare(a, b, valid, 1e-5)


def test_fused_path_is_left_when_the_nvib_needs_gradients(monkeypatch):
    """Fitting the knobs differentiates the NVIB's parameters: the general path (through the latent) serves it."""
    model = build("bert")
    nvm = nv.convert(copy.deepcopy(model), **AWAY)
    kw, _ = inputs("bert", "right")
    calls = _fused_calls(monkeypatch)
    output(nvm, kw).sum().backward()  # NVIB parameters require grad by default
    assert not calls
    assert all(m.nvib.alpha_bias.grad is not None for _, m in nv_modules(nvm))
    for p in nvm.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        output(nvm, kw)
    assert calls


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_deferred_latent_equals_the_general_paths_latent_and_feeds_the_kl(family, monkeypatch):
    model = build(family)
    kw, _ = inputs(family, "right")
    nvm = _trained_like(nv.convert(copy.deepcopy(model), prior=nv.estimate_prior(model, [kw], show_progress=False), **_away(family)), family)
    with torch.no_grad():
        output(nvm, kw)
        fused = [m.last_latent for _, m in nv_modules(nvm)]
        kl_fused = nv.kl_terms(nvm)
    _general_only(monkeypatch)
    with torch.no_grad():
        output(nvm, kw)
        general = [m.last_latent for _, m in nv_modules(nvm)]
        kl_general = nv.kl_terms(nvm)
    for i, (a, b) in enumerate(zip(fused, general)):  # the first layer's input is the same; later ones differ by rounding
        for name in ("mu", "logvar", "log_alpha", "log_pi"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0 if i == 0 else 1e-5)
    torch.testing.assert_close(kl_fused.gaussian, kl_general.gaussian)
    torch.testing.assert_close(kl_fused.dirichlet, kl_general.dirichlet)


def _bert_after_a_forward():
    """A tiny converted BERT (knobs AWAY) after one forward, and its inputs."""
    nvm = nv.convert(build("bert"), **AWAY)
    kw, _ = inputs("bert", None)
    with torch.no_grad():
        output(nvm, kw)
    return nvm, kw


def test_deferred_latent_read_after_the_nvib_changed_is_an_error():
    nvm, kw = _bert_after_a_forward()
    first = nv_modules(nvm)[0][1]
    first.nvib.set_knobs(alpha_tau=2.0)
    with pytest.raises(RuntimeError, match="NVIB changed"):
        first.last_latent
    with torch.no_grad():
        output(nvm, kw)
    assert first.last_latent.mu.shape[1] == kw["input_ids"].shape[1] + 1


def test_unconvert_removes_the_latent_property():
    nvm, _ = _bert_after_a_forward()
    nv.unconvert(nvm)
    assert not any(hasattr(m, "last_latent") or "_nv_latent" in m.__dict__ for m in nvm.modules())


@pytest.mark.parametrize("family", SEQ2SEQ[:2])
def test_seq2seq_encoders_take_the_fused_path_and_match(family, monkeypatch):
    model = build(family)
    kw, _ = inputs(family, "right")
    nvm = _trained_like(nv.convert(copy.deepcopy(model), **AWAY), family)
    calls = _fused_calls(monkeypatch)
    with torch.no_grad():
        fused = output(nvm, kw)
    assert calls
    _general_only(monkeypatch)
    with torch.no_grad():
        general = output(nvm, kw)
    torch.testing.assert_close(fused, general, rtol=0, atol=2e-5)


def test_mask_terms_follow_a_mask_changed_in_place(monkeypatch):
    """The mask's terms are computed once per mask object and version: a mask edited in place between
    forwards (same object) is read again."""
    model = build("bert")
    nvm = nv.convert(copy.deepcopy(model), **AWAY)
    kw, _ = inputs("bert", None)
    am = torch.ones_like(kw["input_ids"])
    mask = am[:, None, None, :].expand(-1, 1, am.shape[1], -1).bool().clone()
    enc, emb = nvm.bert.encoder, nvm.bert.embeddings(input_ids=kw["input_ids"])
    with torch.no_grad():
        first = enc(emb, attention_mask=mask).last_hidden_state
        mask[1, :, :, -3:] = False  # the same object, now hiding three keys of row 1
        second = enc(emb, attention_mask=mask).last_hidden_state
        _general_only(monkeypatch)
        expected = enc(emb, attention_mask=mask.clone()).last_hidden_state
    assert not torch.allclose(first[1], second[1])
    torch.testing.assert_close(second, expected, rtol=0, atol=2e-5)


def test_compiled_attention_core_equals_the_eager_core():
    """nvformer.compile_attention: cached decoding and generate() through the torch.compile'd core give the
    eager core's logits and tokens; enable=False and unconvert remove it; an unconverted model is refused."""
    model = build("llama")
    kw, valid = inputs("llama", "left")
    nvm = _trained_like(nv.convert(copy.deepcopy(model), **_away("llama")), "llama")
    gk = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager_logits = nvm(**kw).logits
        eager_tokens = nvm.generate(**kw, **gk)
        nv.compile_attention(nvm)
        assert all("_nv_compiled" in m.__dict__ for _, m in nv_modules(nvm))
        compiled_logits = nvm(**kw).logits
        compiled_tokens = nvm.generate(**kw, **gk)
    _compare(compiled_logits, eager_logits, valid, 1e-5)
    assert torch.equal(compiled_tokens, eager_tokens)
    nv.compile_attention(nvm, enable=False)
    assert not any("_nv_compiled" in m.__dict__ for _, m in nv_modules(nvm))
    nv.compile_attention(nvm)
    nv.unconvert(nvm)
    assert not any("_nv_compiled" in m.__dict__ for m in nvm.modules())
    with pytest.raises(ValueError, match="not a Hugging Face model converted"):
        nv.compile_attention(model)
    with pytest.raises(ValueError, match="`enable` must be True or False"):
        nv.compile_attention(nvm, enable="yes")


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_prior_component_switched_off_with_and_without_a_cache(family):
    """prior_component=False: the prior column is excluded on every path (the general one, the fused one, the
    cached prior column of decoding), so at mu_tau 1 and stdev_tau 0 the model is the original whatever
    alpha_tau, and cached decoding equals the forward without a cache."""
    model = build(family)
    kw, valid = inputs(family, "left")
    nvm = nv.convert(copy.deepcopy(model), prior_component=False, mu_tau=1.0, stdev_tau=0.0, alpha_tau=0.0)
    ids, am = kw["input_ids"], kw["attention_mask"]
    with torch.no_grad():
        _compare(output(nvm, kw | {"use_cache": False}), output(model, kw | {"use_cache": False}), valid, 1e-5)
        out = nvm(input_ids=ids[:, :3], attention_mask=am[:, :3], use_cache=True)
        steps = [out.logits]
        for t in range(3, ids.shape[1]):
            out = nvm(input_ids=ids[:, t : t + 1], attention_mask=am[:, : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
        _compare(torch.cat(steps, 1), output(model, kw | {"use_cache": False}), valid, 1e-5)


def _underflow_calls(monkeypatch, force: bool | None = None) -> list[bool]:
    seen, real = [], fwd.prior_weight_underflows
    monkeypatch.setattr(fwd, "prior_weight_underflows", lambda *a: seen.append(real(*a) if force is None else force) or seen[-1])
    return seen


@pytest.mark.parametrize("family, padding", [("bert", "right"), ("bert", None), ("llama", None), ("llama", "right"), ("gpt2", "right")])
def test_identity_shortcut_equals_the_extended_attention(family, padding, monkeypatch):
    """At the identity (alpha_tau = 1e4, empirical prior) the prior's weight underflows to exactly 0: the fused
    path then runs the original attention over the tokens; it equals the attention with the prior column
    (float64, 1e-12) and the original model."""
    model = build(family).double()
    kw, valid = inputs(family, padding)
    kw = kw | ({"use_cache": False} if family in ("llama", "gpt2") else {})
    nvm = nv.convert(copy.deepcopy(model), prior=nv.estimate_prior(model, [kw], show_progress=False), **nv.IDENTITY.as_dict())
    seen = _underflow_calls(monkeypatch)
    with torch.no_grad():
        short = output(nvm, kw)
    assert seen and all(seen), "the shortcut was not taken"
    _underflow_calls(monkeypatch, force=False)
    with torch.no_grad():
        full = output(nvm, kw)
        original = output(model, kw)
    _compare(short, full, valid, 1e-12)
    _compare(short, original, valid, 1e-12)


def test_identity_shortcut_is_not_taken_when_the_prior_can_be_seen(monkeypatch):
    """alpha_tau = 60 with the default prior: the prior's logit is only ~60 below the tokens', its weight is
    ~e^-60, not 0: the attention keeps the prior column. Left padding with a causal mask leaves query rows that see
    no token (they attend to the prior alone): no shortcut either."""
    seen = _underflow_calls(monkeypatch)
    model = build("bert")
    kw, _ = inputs("bert", "right")
    with torch.no_grad():
        output(nv.convert(copy.deepcopy(model), mu_tau=1.0, stdev_tau=0.0, alpha_tau=60.0), kw)
    assert seen and not any(seen)
    seen.clear()
    model = build("llama")
    kw, _ = inputs("llama", "left")
    with torch.no_grad():
        output(nv.convert(copy.deepcopy(model), **nv.IDENTITY.as_dict()), kw | {"use_cache": False})
    assert not seen  # rows without a visible token: decided before the bound


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("padding", [None, "left"])
def test_identity_shortcut_with_a_kv_cache_equals_the_extended_attention(family, padding, monkeypatch):
    """Decoding steps at the identity: the cached keys' terms are all one constant (or padding the mask hides),
    so the steps attend over the tokens alone; logits equal the extended attention's (float64) and generate()
    gives the same tokens. After a knob change the cached terms differ and the shortcut is left."""
    model = build(family).double()
    kw, valid = inputs(family, padding)
    nvm = nv.convert(copy.deepcopy(model), prior=nv.estimate_prior(model, [kw], show_progress=False), **nv.IDENTITY.as_dict())
    ids, am = kw["input_ids"], kw["attention_mask"]
    gk = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)

    def run(change_knobs=False):
        with torch.no_grad():
            out = nvm(input_ids=ids[:, :3], attention_mask=am[:, :3], use_cache=True)
            steps = [out.logits]
            for t in range(3, ids.shape[1]):
                if change_knobs and t == 4:
                    nv.set_knobs(nvm, alpha_tau=5.0)
                out = nvm(input_ids=ids[:, t : t + 1], attention_mask=am[:, : t + 1], past_key_values=out.past_key_values, use_cache=True)
                steps.append(out.logits)
            return torch.cat(steps, 1), nvm.generate(**kw, **gk)

    seen = _underflow_calls(monkeypatch)
    short, short_tokens = run()
    assert seen and all(seen)
    _underflow_calls(monkeypatch, force=False)
    full, full_tokens = run()
    _compare(short, full, valid, 1e-12)
    assert torch.equal(short_tokens, full_tokens)
    nv.set_knobs(nvm, **nv.IDENTITY.as_dict())
    seen = _underflow_calls(monkeypatch)
    changed, _ = run(change_knobs=True)
    _underflow_calls(monkeypatch, force=False)
    nv.set_knobs(nvm, **nv.IDENTITY.as_dict())
    reference, _ = run(change_knobs=True)
    _compare(changed, reference, valid, 1e-12)


def _decode(nvm, kw, steps=3, prompt=3, mask=None):
    """A prompt of ``prompt`` tokens, then ``steps`` single-token steps through the KV cache; ``mask(t)``
    replaces the attention mask of step ``t``. Returns the logits of every step and the cache."""
    ids, am = kw["input_ids"], kw["attention_mask"]
    with torch.no_grad():
        out = nvm(input_ids=ids[:, :prompt], attention_mask=am[:, :prompt], use_cache=True)
        logits = [out.logits]
        for t in range(prompt, prompt + steps):
            m = am[:, : t + 1] if mask is None else mask(t)
            out = nvm(input_ids=ids[:, t : t + 1], attention_mask=m, past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, 1), out.past_key_values


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("padding", [None, "left"])
def test_decoding_keeps_a_key_bound_that_describes_the_cache(family, padding, monkeypatch):
    """Each decoding step looks at its new keys only: the bound it keeps names the cache's keys tensor, holds
    their largest norm (recomputed here over the whole cache) and the padded entries (those whose cached term is
    EXCLUDED), and after the first step every step starts from it."""
    model = build(family).double()
    kw, _ = inputs(family, padding)
    nvm = nv.convert(copy.deepcopy(model), prior=nv.estimate_prior(model, [kw], show_progress=False), **nv.IDENTITY.as_dict())
    starts, real = [], fwd._key_bound_before
    monkeypatch.setattr(fwd, "_key_bound_before", lambda *a: starts.append(real(*a)) or starts[-1])
    _, cache = _decode(nvm, kw, steps=4)
    layers = nv_modules(nvm)
    # steps whose queries see no token (left padding) take no shortcut; the last two do: the first recomputes, the second starts from it
    assert len(starts) >= 2 * len(layers) and all(s is not None for s in starts[-len(layers) :])
    for _, m in layers:
        kept = m.__dict__["_nv_key_bound"]
        keys = cache.layers[m.layer_idx].keys
        d = keys.shape[-1] - 1
        assert kept.keys() is keys and kept.version == keys._version
        assert kept.norm == pytest.approx(float(keys[..., :d].norm(dim=-1).amax()), rel=1e-12)
        marked = torch.zeros(keys.shape[:-1], dtype=torch.bool)
        for off, excl in kept.excluded:
            marked[..., off : off + excl.shape[-1]] |= excl
        assert torch.equal(marked, keys[..., d] == fwd.EXCLUDED)
        assert bool(marked.any()) == (padding is not None)


def test_the_key_bound_is_dropped_when_the_cache_or_the_knobs_change():
    """A reordered (beam search) or cropped cache holds new tensors, keys written in place have a new version,
    a knob change gives another per-key term: each time the next step recomputes over the whole cache."""
    model = build("llama").double()
    kw, _ = inputs("llama", None)
    nvm = nv.convert(copy.deepcopy(model), prior=nv.estimate_prior(model, [kw], show_progress=False), **nv.IDENTITY.as_dict())
    m = nv_modules(nvm)[0][1]
    _, cache = _decode(nvm, kw)
    const = m.__dict__["_nv_key_bound"].const
    past = cache.get_seq_length(m.layer_idx)
    assert fwd._key_bound_before(m, cache, past, const) is not None
    assert fwd._key_bound_before(m, cache, past, const + 1.0) is None
    cache.layers[m.layer_idx].keys.add_(0.0)
    assert fwd._key_bound_before(m, cache, past, const) is None
    for change in (lambda c: c.reorder_cache(torch.tensor([2, 0, 1])), lambda c: c.crop(-1)):
        _, cache = _decode(nvm, kw)
        assert fwd._key_bound_before(m, cache, past, const) is not None
        change(cache)
        assert fwd._key_bound_before(m, cache, cache.get_seq_length(m.layer_idx), const) is None


def test_padding_the_mask_shows_again_leaves_the_shortcut(monkeypatch):
    """Left padding is kept in the bound as entries the mask hid; a step whose mask shows them again (all ones)
    must attend with their cached EXCLUDED terms: the logits equal the extended attention's (float64)."""
    model = build("llama").double()
    kw, _ = inputs("llama", "left", N=10)  # row 2: 8 padded tokens, seen by no query until step 8
    nvm = nv.convert(copy.deepcopy(model), prior=nv.estimate_prior(model, [kw], show_progress=False), **nv.IDENTITY.as_dict())
    am = kw["attention_mask"]
    mask = lambda t: am[:, : t + 1] if t < 9 else torch.ones_like(am[:, : t + 1])  # noqa: E731
    starts, real = [], fwd._key_bound_before
    monkeypatch.setattr(fwd, "_key_bound_before", lambda *a: starts.append(real(*a)) or starts[-1])
    seen = _underflow_calls(monkeypatch)
    kept, _ = _decode(nvm, kw, steps=7, mask=mask)
    layers = len(nv_modules(nvm))
    assert len(seen) == layers and all(seen)  # step 8 only: the shortcut is left at step 9, whose mask shows the padding
    assert all(s is not None and s[1] for s in starts[-layers:])  # step 9 started from a bound that marks the padding
    _underflow_calls(monkeypatch, force=False)
    full, _ = _decode(nvm, kw, steps=7, mask=mask)
    torch.testing.assert_close(kept, full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_extended_sdpa_in_scratch_buffers_is_the_same_and_its_output_is_kept(causal):
    """The extended buffers in the thread's scratch memory (calls without a graph) give the fresh buffers'
    numbers bit for bit, and a later call does not change an earlier call's output."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, N, d = 2, 4, 2, 6, 8

    def args(seed):
        g.manual_seed(seed)
        r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        return (r(B, Hq, N, d), r(1, Hkv, 1, d + 1), r(1, Hkv, 1, d + 1), r(B, Hkv, N, d), r(B, Hkv, N, d), r(B, N).double())

    kw = dict(bias=None, causal=causal, scale=d**-0.5, groups=Hq // Hkv)
    with torch.no_grad():
        fresh = fwd.extended_sdpa(*args(1), **kw)
        reused = fwd.extended_sdpa(*args(1), **kw, reuse=True)
        assert torch.equal(fresh, reused)
        kept = reused.clone()
        fwd.extended_sdpa(*args(2), **kw, reuse=True)
    assert torch.equal(reused, kept)


def test_fused_caches_follow_knob_prior_and_weight_changes():
    """What the fused path keeps per module (projections, per-key coefficients, the prior column and its reach)
    is recomputed after set_knobs, a new prior, or an in-place change of the attention weights: the model then
    equals a model converted anew with the same knobs, prior and weights."""
    model = build("bert")
    kw, valid = inputs("bert", "right")
    priors = nv.estimate_prior(model, [kw], show_progress=False)
    nvm = nv.convert(copy.deepcopy(model), prior=priors, **nv.IDENTITY.as_dict())
    with torch.no_grad():
        output(nvm, kw)  # fills the caches at the identity
        nv.set_knobs(nvm, **AWAY)
        _compare(output(nvm, kw), output(nv.convert(copy.deepcopy(model), prior=priors, **AWAY), kw), valid, 1e-6)
        other = {name: nv.Prior(p.mean.numel(), mean=0.1, var=2.0) for name, p in priors.items()}
        for name, m in nv_modules(nvm):
            m.nvib.set_prior(other[name])
        _compare(output(nvm, kw), output(nv.convert(copy.deepcopy(model), prior=other, **AWAY), kw), valid, 1e-6)
        for mods in (nv_modules(nvm), [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("SelfAttention")]):
            for _, m in mods:
                m.key.weight.add_(0.01)
                m.value.bias.add_(0.02)
        _compare(output(nvm, kw), output(nv.convert(copy.deepcopy(model), prior=other, **AWAY), kw), valid, 1e-6)


def test_mask_memo_is_dropped_with_its_mask():
    """The mask's terms are kept only while the mask object lives."""
    import gc

    model = build("bert")
    nvm = nv.convert(copy.deepcopy(model), **AWAY)
    kw, _ = inputs("bert", "right")
    with torch.no_grad():
        output(nvm, kw)
    gc.collect()
    assert fwd._MASK_MEMO[0] is None


def _split_args(g, B, H, N, d, dtype):
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return r(B, H, N, d), r(1, H, 1, d + 1), r(1, H, 1, d + 1), r(B, H, N, d), r(B, H, N, d), r(B, N).double()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mask_kind", ["none", "rows", "full", "causal"])
def test_split_prior_sdpa_equals_the_extended_attention(dtype, mask_kind):
    """The tokens-only SDPA call with the prior column in closed form (w_0 = sigmoid(s_0 - L)) gives the extended
    attention's context and prior weight: per-key terms as a [B, N] row or inside an additive mask over the
    queries, padded keys hidden, causal queries; float64 to 1e-12, float32 to 1e-5."""
    g = torch.Generator().manual_seed(4)
    B, H, N, d = 2, 3, 7, 8
    q, k0e, v0e, keys, values, b = _split_args(g, B, H, N, d, dtype)
    v0e[..., d] = 1.0
    const = float(b.mean())
    scale = d**-0.5
    pad = torch.zeros(B, N, dtype=torch.bool)
    pad[1, :2] = True
    causal = mask_kind == "causal"
    tok_bias = None
    if mask_kind == "full":  # hides the padding and, for one query, one more key
        tok_bias = torch.zeros(B, 1, N, N, dtype=dtype).masked_fill(pad[:, None, None, :], float("-inf"))
        tok_bias[0, 0, 3, 5] = float("-inf")
    b_ext = b.masked_fill(pad, fwd.EXCLUDED) if mask_kind in ("rows", "full") else b
    bias = None if tok_bias is None else torch.cat([tok_bias.new_zeros(B, 1, N, 1), tok_bias], -1)
    with torch.no_grad():
        ref = fwd.extended_sdpa(q, k0e, v0e, keys, values, b_ext, bias=bias, causal=causal, scale=scale, groups=1)
        rel = (b - const).to(dtype)
        mask = rel.masked_fill(pad, fwd.EXCLUDED) if mask_kind == "rows" else tok_bias + rel[:, None, None, :] if tok_bias is not None else rel
        ctx, w0 = fwd.split_prior_sdpa(q, k0e, v0e, keys, values, mask, causal=causal, scale=scale, b0_rel=k0e[0, :, 0, d].double() - const)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ctx, ref[..., :d], rtol=0, atol=tol)
    torch.testing.assert_close(w0, ref[..., d : d + 1], rtol=0, atol=tol)
    assert float(w0.min()) > 1e-3  # the prior column carries weight here: the closed form is exercised


@pytest.mark.parametrize("which", ["A", "L", "both"])
def test_input_terms_without_a_graph_equal_the_float64_sum(which):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 5, 16, generator=g)
    A = torch.randn(16, generator=g) if which in ("A", "both") else None
    L = torch.randn(16, generator=g) if which in ("L", "both") else None
    xd = x.double()
    ref = ((xd * xd * A.double()).sum(-1) if A is not None else 0.0) + ((xd * L.double()).sum(-1) if L is not None else 0.0)
    with torch.no_grad():
        fast = fwd.input_terms(x, A, L, torch.float32)
        again = fwd.input_terms(x + 1.0, A, L, torch.float32)  # the scratch temporary is reused: the first result is kept
    graph = fwd.input_terms(x.requires_grad_(), A, L, torch.float32)
    assert graph.requires_grad
    torch.testing.assert_close(fast.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(graph.detach(), fast, rtol=1e-6, atol=1e-5)
    assert not torch.equal(again, fast)
    assert fwd.input_terms(x, None, None, torch.float32) is None


def test_interpolation_without_a_graph_equals_the_two_products():
    """ctx + (1 - w0) M_tok q + w0 M_0 q, with q the projection's transposed output, written in the output
    projection's [B, Nt, H, d] memory (its reshape is a view)."""
    g = torch.Generator().manual_seed(6)
    B, N, H, d = 2, 5, 3, 4
    q = torch.randn(B, N, H * d, generator=g, dtype=torch.float64).view(B, N, H, d).transpose(1, 2)
    both = torch.randn(H, 2 * d, d, generator=g, dtype=torch.float64)
    ctx, w0 = torch.randn(B, H, N, d, generator=g, dtype=torch.float64), torch.rand(B, H, N, 1, generator=g, dtype=torch.float64)
    ref = ctx + (1 - w0) * torch.einsum("hij,bhtj->bhti", both[:, :d], q) + w0 * torch.einsum("hij,bhtj->bhti", both[:, d:], q)
    with torch.no_grad():
        out = fwd._interpolate_no_graph(both, q, ctx, w0)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    assert out.transpose(1, 2).is_contiguous()


def _split_calls(monkeypatch) -> list[bool]:
    calls, real = [], fwd.split_prior_applicable
    monkeypatch.setattr(fwd, "split_prior_applicable", lambda *a: calls.append(real(*a)) or calls[-1])
    return calls


@pytest.mark.parametrize("family", ["bert", "gpt2", "bart"])
def test_fused_path_splits_the_prior_column_away_from_the_identity(family, monkeypatch):
    """Without a graph or a cache, a fused call away from the identity attends over the tokens alone with the
    prior in closed form; with gradients it takes the extended attention (the kernel's log-normaliser has no
    gradient); both equal the general path (test_fused_path_equals_general_path)."""
    model = build(family)
    kw, valid = inputs(family, "right")
    nvm = _trained_like(nv.convert(copy.deepcopy(model), prior=nv.estimate_prior(model, [kw], show_progress=False), **AWAY), family)
    kw = kw if family == "bert" else kw | {"use_cache": False}  # with a KV cache, the extended attention serves
    calls = _split_calls(monkeypatch)
    with torch.no_grad():
        split = output(nvm, kw)
    assert calls and all(calls)
    calls.clear()
    for _, m in nv_modules(nvm):
        m.nvib.requires_grad_(False)  # the fused path serves; the original weights need gradients
    graph = output(nvm, kw)
    assert graph.requires_grad and calls and not any(calls)
    _compare(split, graph.detach(), valid, 2e-6)
    _general_only(monkeypatch)
    with torch.no_grad():
        general = output(nvm, kw)
    _compare(split, general, valid, 2e-5)

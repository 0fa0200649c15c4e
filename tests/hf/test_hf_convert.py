"""Conversion of Hugging Face models: identity, caches, generation, knobs, priors, save/load, errors.

All models are tiny, built from configs, with every weight and bias perturbed.
"""

import copy

import pytest
import torch
import transformers as tf
from hf_models import ALL, CAUSAL, V, build, inputs, output

import nvformer as nv
from nvformer.adapter import load_pretrained, save_pretrained
from nvformer.api import nv_modules
from nvformer.hf.convert import attention_modules

IDENTITY = dict(mu_tau=1.0, stdev_tau=0.0, alpha_tau=60.0)  # default prior: s_alpha = 1, prior weight ~ e^-60
AWAY = dict(mu_tau=0.8, stdev_tau=0.4, alpha_tau=0.5)
GEN_FAMILIES = ("gpt2", "llama", "bart", "marian", "t5")


def _compare(a, b, valid, atol):
    if valid is not None and a.dim() == 3 and a.shape[:2] == valid.shape:
        a, b = a[valid], b[valid]
    torch.testing.assert_close(a, b, rtol=0, atol=atol)


@pytest.mark.parametrize("family", ALL)
@pytest.mark.parametrize("padding", ["right", "left"])
def test_identity_all_families(family, padding):
    model = build(family)
    nvm = nv.convert(copy.deepcopy(model), **IDENTITY)
    kw, valid = inputs(family, padding)
    with torch.no_grad():
        _compare(output(nvm, kw), output(model, kw), valid, 1e-5)
    sites = {s for *_, s in attention_modules(nvm)}
    expected = {"encoder"} if family in ("bert", "roberta", "distilbert", "vit") else {"decoder"} if family in CAUSAL else {"encoder", "decoder", "cross"}
    assert sites == expected


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "bart", "t5"])
def test_identity_with_eager_masks(family):
    model = build(family, attn="eager")
    nvm = nv.convert(copy.deepcopy(model), **IDENTITY)
    kw, valid = inputs(family, "right")
    with torch.no_grad():
        _compare(output(nvm, kw), output(model, kw), valid, 1e-5)


def test_cross_attention_nvib_is_shared_and_computed_once_per_forward():
    nvm = nv.convert(build("bart"), **IDENTITY)
    cross = [m for _, m, _, s in attention_modules(nvm) if s == "cross"]
    assert len(cross) == 2 and cross[0].nvib is cross[1].nvib
    calls = []
    cross[0].nvib.register_forward_hook(lambda *a: calls.append(1))
    kw, _ = inputs("bart", "right")
    with torch.no_grad():
        nvm(**kw)
    assert len(calls) == 1
    assert cross[0].last_latent is cross[1].last_latent


@pytest.mark.parametrize("family", GEN_FAMILIES)
def test_generate_identical_tokens_at_identity(family):
    model = build(family)
    nvm = nv.convert(copy.deepcopy(model), **IDENTITY)
    kw, _ = inputs(family, "left" if family in CAUSAL else "right")
    kw.pop("decoder_input_ids", None)
    pad = model.generation_config.pad_token_id
    gk = dict(max_new_tokens=8, pad_token_id=0 if pad is None else pad)
    for extra in (dict(do_sample=False), dict(do_sample=False, num_beams=3)):
        assert torch.equal(model.generate(**kw, **gk, **extra), nvm.generate(**kw, **gk, **extra)), extra
    torch.manual_seed(3)
    a = model.generate(**kw, **gk, do_sample=True, top_k=0)
    torch.manual_seed(3)
    b = nvm.generate(**kw, **gk, do_sample=True, top_k=0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("family, formula", [("gpt2", "paper"), ("gpt2", "exact"), ("llama", "paper"), ("qwen2", "paper")])
def test_cached_incremental_decoding_equals_full_forward_away_from_identity(family, formula):
    # ("llama", "exact") is rejected: see test_exact_formula_is_rejected_for_rotary_models
    nvm = nv.convert(build(family), formula=formula, **AWAY)
    kw, _ = inputs(family, "left")
    _assert_cached_decoding_equals_no_cache(nvm, kw["input_ids"], kw["attention_mask"])


def _assert_cached_decoding_equals_no_cache(nvm, ids, am):
    """Decoding ``ids`` with a KV cache (3 prompt tokens, then one per step) gives the logits of the forward
    without a cache (the general path) at every non-padded position; returns those logits."""
    with torch.no_grad():
        full = nvm(input_ids=ids, attention_mask=am, use_cache=False).logits  # no cache: the general path
        out = nvm(input_ids=ids[:, :3], attention_mask=am[:, :3], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(3, ids.shape[1]):
            out = nvm(input_ids=ids[:, t : t + 1], attention_mask=am[:, : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    valid = am.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[valid], full[valid], rtol=0, atol=1e-5)
    return full


@pytest.mark.parametrize("family", ("gpt2", "llama"))
def test_cached_decoding_follows_knob_and_prior_changes(family):
    """The decoding fast path caches the prior column per module: after set_knobs (and after a new
    prior) the next cached decoding equals the full forward at the new settings, not the old ones
    (stdev_tau 0, so that the rotary model takes the fast path too)."""
    nvm = nv.convert(build(family), **{**AWAY, "stdev_tau": 0.0})
    kw, _ = inputs(family, "left")
    ids, am = kw["input_ids"], kw["attention_mask"]
    first = _assert_cached_decoding_equals_no_cache(nvm, ids, am)
    nv.set_knobs(nvm, alpha_tau=-5.0)
    second = _assert_cached_decoding_equals_no_cache(nvm, ids, am)
    assert float((first - second).abs().max()) > 1e-3  # the knobs changed the model
    priors = nv.estimate_prior(nv.unconvert(copy.deepcopy(nvm)), [dict(input_ids=ids, attention_mask=am)], show_progress=False)
    for name, m in nv_modules(nvm):
        m.nvib.set_prior(priors[name])
    third = _assert_cached_decoding_equals_no_cache(nvm, ids, am)
    assert float((third - second).abs().max()) > 1e-4


@pytest.mark.parametrize("family", ("bart", "marian", "t5", "encdec"))
def test_cached_decoder_steps_equal_full_decoder_forward_away_from_identity(family):
    nvm = nv.convert(build(family), **AWAY)
    kw, _ = inputs(family, "right")
    dec = kw.pop("decoder_input_ids")
    with torch.no_grad():
        full = nvm(**kw, decoder_input_ids=dec).logits
        enc = nvm.get_encoder()(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"])
        out = nvm(encoder_outputs=enc, attention_mask=kw["attention_mask"], decoder_input_ids=dec[:, :2], use_cache=True)
        steps, cache = [out.logits], out.past_key_values
        for t in range(2, dec.shape[1]):
            out = nvm(encoder_outputs=enc, attention_mask=kw["attention_mask"], decoder_input_ids=dec[:, t : t + 1], past_key_values=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", GEN_FAMILIES)
def test_generate_away_from_identity_cache_equals_no_cache(family):
    nvm = nv.convert(build(family), **AWAY)
    kw, _ = inputs(family, "left" if family in CAUSAL else "right")
    kw.pop("decoder_input_ids", None)
    pad = nvm.generation_config.pad_token_id
    gk = dict(max_new_tokens=6, pad_token_id=0 if pad is None else pad, do_sample=False)
    with_cache = nvm.generate(**kw, **gk, use_cache=True)
    without = nvm.generate(**kw, **gk, use_cache=False)
    assert torch.equal(with_cache, without)
    beams = nvm.generate(**kw, **gk, num_beams=3)
    assert beams.shape[0] == kw["input_ids"].shape[0]
    torch.manual_seed(0)
    sampled = nvm.generate(**kw, max_new_tokens=6, pad_token_id=gk["pad_token_id"], do_sample=True)
    assert sampled.shape[1] > kw["input_ids"].shape[1] - (0 if family in CAUSAL else kw["input_ids"].shape[1])


@pytest.mark.parametrize("family", ("bert", "bart", "gpt2", "t5"))
def test_paper_and_exact_differ_only_when_variances_differ(family):
    """MATH.md 3: the dropped term is constant over columns iff all components share one variance.

    float64, so that "equal" can be tested at 1e-10 and "different" well above rounding.
    """
    kw, valid = inputs(family, "right")
    outs = {}
    for formula in ("paper", "exact"):
        m = nv.convert(build(family).double(), formula=formula, alpha_tau=-3.0, stdev_tau=1.0)  # token var = prior var
        with torch.no_grad():
            outs[formula, "same"] = output(m, kw)
            nv.set_knobs(m, stdev_tau=0.3)
            outs[formula, "diff"] = output(m, kw)
    _compare(outs["paper", "same"], outs["exact", "same"], valid, 1e-10)
    assert (outs["paper", "diff"] - outs["exact", "diff"]).abs().max() > 1e-6


def _reference_context(module, x, pad, formula):
    """A converted BERT/Bart-like module's context from the core reference path (nvformer.denoising_attention)."""
    ad = module._nv.adapter
    (q_w, q_b), (k_w, k_b), (v_w, v_b) = ad.qkv(module)
    d = ad.head_size(module)
    B, N, _ = x.shape
    q = torch.nn.functional.linear(x, q_w, q_b).view(B, N, -1, d).transpose(1, 2)
    lat = module.nvib(x, key_padding_mask=pad)
    out, _ = nv.denoising_attention(q, lat, k_w, k_b, v_w, v_b, formula=formula, scale=module.scaling)
    return out.transpose(1, 2).reshape(B, N, -1)


@pytest.mark.parametrize("formula", ["paper", "exact"])
@pytest.mark.parametrize("train", [False, True])
def test_hf_forward_equals_the_core_reference_path(formula, train):
    """The cache-form NV forward vs nvformer.denoising_attention (float64), away from identity."""
    model = nv.convert(build("bert").double(), formula=formula, **AWAY)
    module = model.bert.encoder.layer[0].attention.self
    module.train(train)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    mask = torch.zeros(2, 1, 6, 6, dtype=torch.float64).masked_fill(pad[:, None, None, :], torch.finfo(torch.float64).min)
    torch.manual_seed(5)
    got = module(x, attention_mask=mask)[0]
    torch.manual_seed(5)
    ref = _reference_context(module, x, pad, formula)
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_rope_value_interpolation_against_brute_force_per_key_projection():
    """Llama (GQA + RoPE), stdev_tau > 0: key i projects with R_i W_k, so u_i = W_k^T R_i^T q~ per key."""
    model = nv.convert(build("llama").double(), **AWAY)
    attn = model.model.layers[0].self_attn
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    pos = torch.arange(5)[None].expand(2, -1)
    cos, sin = model.model.rotary_emb(x, pos)
    got = attn(x, position_embeddings=(cos, sin), attention_mask=None)[0]

    (q_w, _), (k_w, _), (v_w, _) = attn._nv.adapter.qkv(attn)
    d, H, Hkv = 8, 4, 2
    nvib = attn.nvib
    lat = nvib(x)
    S = lat.logvar.exp() + 1 / attn.scaling  # [B, C, P]
    q = (x @ q_w.T).view(2, 5, H, d).transpose(1, 2)
    rot = lambda t, c, s: t * c + torch.cat([-t[..., d // 2:], t[..., : d // 2]], -1) * s  # noqa: E731
    qt = rot(q, cos[:, None], sin[:, None])  # [B, H, N, d]
    ctx = torch.zeros(2, H, 5, d, dtype=torch.float64)
    for h in range(H):
        wk, wv = k_w.view(Hkv, d, -1)[h // 2], v_w.view(Hkv, d, -1)[h // 2]
        for t in range(5):
            logits, post = [], []
            for i in range(6):  # component 0 = prior (unrotated), 1..5 = tokens at positions 0..4
                if i == 0:
                    u = wk.T @ qt[:, h, t].unsqueeze(-1)
                else:
                    if i - 1 > t:
                        continue
                    c, s = cos[:, i - 1], sin[:, i - 1]
                    # R_i^T y = y cos - rotate_half(y) sin
                    ry = qt[:, h, t] * c - torch.cat([-qt[:, h, t, d // 2:], qt[:, h, t, : d // 2]], -1) * s
                    u = wk.T @ ry.unsqueeze(-1)
                u = u.squeeze(-1)  # [B, P]
                mu, Si, var = lat.mu[:, i], S[:, i], lat.logvar[:, i].exp()
                logits.append((u * mu / Si).sum(-1) + lat.log_pi[:, i] - 0.5 * (mu * mu / Si).sum(-1) - 0.5 * Si.log().sum(-1))
                post.append((var * u + (1 / attn.scaling) * mu) / Si)
            w = torch.softmax(torch.stack(logits, -1), -1)  # [B, k]
            zbar = (w.unsqueeze(-1) * torch.stack(post, 1)).sum(1)
            ctx[:, h, t] = zbar @ wv.T
    ref = attn.o_proj(ctx.transpose(1, 2).reshape(2, 5, H * d))
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_exact_formula_is_rejected_for_rotary_models():
    model = nv.convert(build("llama"), formula="exact", **AWAY)
    kw, _ = inputs("llama", None)
    with pytest.raises(ValueError, match="rotary"):
        model(**kw)


def test_knobs_move_outputs_smoothly_and_set_knobs_filters_sites_and_layers():
    model = build("bart")
    nvm = nv.convert(copy.deepcopy(model), **IDENTITY)
    kw, _ = inputs("bart", "right")
    with torch.no_grad():
        ref = output(model, kw)
        diffs = []
        for a in (60.0, 5.0, 2.0, 0.0, -2.0):
            nv.set_knobs(nvm, alpha_tau=a)
            diffs.append(float((output(nvm, kw) - ref).abs().mean()))
    assert diffs[0] < 1e-6 and all(x <= y + 1e-7 for x, y in zip(diffs, diffs[1:])) and diffs[-1] > 1e-4
    nv.set_knobs(nvm, stdev_tau=0.2, site="cross")
    nv.set_knobs(nvm, alpha_tau=-1.0, site="decoder", layers=[1])
    knobs = nv.get_knobs(nvm)
    assert set(knobs) == {"encoder.0", "encoder.1", "decoder.0", "decoder.1", "cross"}
    assert knobs["cross"].stdev_tau == 0.2
    assert {k.stdev_tau for g, k in knobs.items() if g != "cross"} == {0.0}
    assert {g: k.alpha_tau for g, k in knobs.items() if g.startswith("decoder")} == {"decoder.0": -2.0, "decoder.1": -1.0}
    with pytest.raises(ValueError, match="stdev_tau"):
        nv.set_knobs(nvm, stdev_tau=-0.1)
    with pytest.raises(ValueError, match="site"):
        nv.set_knobs(nvm, alpha_tau=1.0, site="encoder_self")
    with pytest.raises(ValueError, match="shared"):
        nv.set_knobs(nvm, alpha_tau=1.0, site="cross", layers=[0])
    with pytest.raises(ValueError, match="no NV module"):
        nv.set_knobs(nvm, alpha_tau=1.0, layers=[7])


def test_estimate_prior_streams_the_module_inputs_and_converts_to_identity():
    model = build("bart")
    kw1, _ = inputs("bart", "right", seed=1)
    kw2, _ = inputs("bart", "left", seed=2)
    captured = {}

    def keep(name):
        def hook(mod, args, kwargs):
            captured.setdefault(name, []).append((args[0] if args else kwargs["hidden_states"], kwargs.get("key_value_states")))

        return hook

    handles = [model.model.encoder.layers[1].self_attn.register_forward_pre_hook(keep("enc1"), with_kwargs=True)]
    priors = nv.estimate_prior(model, [kw1, kw2], show_progress=False)
    for h in handles:
        h.remove()
    names = [n for n, *_ in attention_modules(model)]
    cross_names = [n for n in names if n.endswith("encoder_attn")]
    assert set(priors) == set(names) - set(cross_names[1:])  # the cross site once
    xs = torch.cat([x[am.bool()] for (x, _), am in zip(captured["enc1"], (kw1["attention_mask"], kw2["attention_mask"]))]).double()
    p = priors["model.encoder.layers.1.self_attn"]
    torch.testing.assert_close(p.mean.double(), xs.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.var.double(), xs.var(0), rtol=1e-5, atol=1e-6)
    nvm = nv.convert(copy.deepcopy(model), prior=priors, alpha_tau=1000.0)
    with torch.no_grad():
        torch.testing.assert_close(output(nvm, kw1), output(model, kw1), rtol=0, atol=1e-5)
    # estimating on the converted model gives the same priors and applies them
    again = nv.estimate_prior(nvm, [kw1, kw2], show_progress=False)
    torch.testing.assert_close(again["model.encoder.layers.1.self_attn"].var, p.var, rtol=1e-5, atol=1e-6)


def test_priors_of_another_model_or_width_are_rejected():
    priors = nv.estimate_prior(build("bart"), [inputs("bart", "right")[0]], show_progress=False)
    with pytest.raises(ValueError, match="no entry"):
        nv.convert(build("gpt2"), prior=priors)
    with pytest.raises(ValueError, match="width"):
        nv.convert(build("gpt2"), prior=nv.Prior(16))


def test_save_and_load_round_trip(tmp_path):
    model = build("bart")
    priors = nv.estimate_prior(model, [inputs("bart", "right")[0]], show_progress=False)
    nvm = nv.convert(model, prior=priors, formula="exact", **AWAY)
    nv.set_knobs(nvm, alpha_tau=-1.5, site="cross")
    save_pretrained(nvm, tmp_path / "m")
    back = load_pretrained(tmp_path / "m")
    assert type(back).__name__ == "BartForConditionalGeneration"
    assert nv.get_knobs(back) == nv.get_knobs(nvm)
    kw, _ = inputs("bart", "right")
    with torch.no_grad():
        torch.testing.assert_close(output(back, kw), output(nvm, kw), rtol=0, atol=0)
    cross = [m for _, m, _, s in attention_modules(back) if s == "cross"]
    assert cross[0].nvib is cross[1].nvib
    # the folder still loads as a plain transformers model
    plain = tf.BartForConditionalGeneration.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(output(plain, kw), output(build("bart"), kw), rtol=0, atol=0)


def test_training_mode_kl_terms_and_gradients():
    nvm = nv.convert(build("t5"), stdev_tau=0.5, alpha_tau=1.0)
    nvm.train()
    kw, _ = inputs("t5", "right")
    out = nvm(**kw, labels=kw["decoder_input_ids"])
    kl = nv.kl_terms(nvm)
    assert kl.modules == 2 + 2 + 1  # encoder, decoder layers, one shared cross latent
    loss = out.loss + 1e-2 * kl.total().mean()
    loss.backward()
    nvib = nvm.encoder.block[0].layer[0].SelfAttention.nvib
    assert nvib.alpha_bias.grad is not None and torch.isfinite(nvib.mu_proj.weight.grad).all()


def test_errors_for_unsupported_models_dtypes_and_double_conversion():
    cfg = tf.GPTNeoConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, attention_types=[[["global"], 2]], max_position_embeddings=64)
    with pytest.raises(ValueError, match="GPTNeoSelfAttention.*supported classes"):
        nv.convert(tf.GPTNeoForCausalLM(cfg))
    nvm = nv.convert(build("gpt2"))
    with pytest.raises(ValueError, match="already converted"):
        nv.convert(nvm)
    kw, _ = inputs("gpt2", None)
    with pytest.raises(ValueError, match="dtype"):
        nvm.transformer.h[0].attn(torch.randn(2, 3, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="kappa"):
        nv.convert(build("gpt2"), kappa=2)
    with pytest.raises(ValueError, match="set_knobs|convert it first"):
        nv.set_knobs(build("gpt2"), alpha_tau=1.0)



@pytest.mark.parametrize("family", ["bart", "llama", "t5", "gpt2"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_sdpa_fast_path_equals_eager_reference_path_away_from_identity(family, padding):
    """With attn_implementation='sdpa' the NV forward uses one SDPA call; 'eager' uses the reference."""
    kw, valid = inputs(family, padding)
    outs = []
    for attn in ("sdpa", "eager"):
        m = nv.convert(build(family, attn=attn), **AWAY)
        with torch.no_grad():
            outs.append(output(m, kw))
    _compare(outs[0], outs[1], valid, 1e-5)


def test_custom_4d_masks_are_applied_not_mistaken_for_padding():
    """A 4D mask that hides query-specific keys must reach the attention (the fast path drops a
    mask only when it encodes key padding alone, which the per-key channel already carries)."""
    model = build("bert")
    nvm = nv.convert(copy.deepcopy(model), **IDENTITY)
    kw, _ = inputs("bert", None)
    ids = kw["input_ids"]
    B, N = ids.shape
    allowed = torch.ones(B, 1, N, N, dtype=torch.bool)
    allowed[:, :, 0, 3:] = False  # query 0 sees keys 0..2 only
    allowed[1, :, :, -2:] = False  # and a padding-like pattern in row 1
    enc = model.bert.encoder
    emb = model.bert.embeddings(input_ids=ids)
    with torch.no_grad():
        ref = enc(emb, attention_mask=allowed).last_hidden_state
        out = nvm.bert.encoder(emb, attention_mask=allowed).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_cache_argument_is_read_from_the_signature_under_any_released_name():
    """transformers renamed the attention modules' cache argument (``past_key_value`` in 4.x,
    ``past_key_values`` in early 5.x, ``cache`` from 5.24); the adapter resolves it from the
    signature, and a signature with none of the names is an error, never an ignored cache."""
    from dataclasses import replace

    from nvformer.hf.adapters import ADAPTERS, CACHE_ARGUMENTS

    llama = replace(next(a for a in ADAPTERS if a.family == "llama"), _params={})
    for name in CACHE_ARGUMENTS:
        cls = type(f"Att_{name}", (), {"forward": eval(f"lambda self, hidden_states, {name}=None, **kw: None")})
        module = cls()
        assert llama.cache(module, {name: "the cache", "other": 1}) == "the cache"
        assert llama.cache(module, {"other": 1}) is None
    legacy = type("Legacy", (), {"forward": lambda self, hidden_states, layer_past=None: None})
    with pytest.raises(ValueError, match="none of the KV-cache arguments"):
        llama.cache(legacy(), {})
    uncached = replace(next(a for a in ADAPTERS if a.family == "vit"), _params={})
    assert uncached.cache(legacy(), {"cache": 1}) is None  # a family without a KV cache never reads one

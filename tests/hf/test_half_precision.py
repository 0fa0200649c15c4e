"""Converted Hugging Face models in bfloat16 and float16 (docs/DESIGN.md, "Hugging Face").

A half-precision model's own arithmetic is only as exact as its dtype, so every tolerance here is
measured, not guessed:

* **Identity** (NV vs the original, same dtype): the yardstick is the original's own
  eager-vs-sdpa difference on the same inputs, ``noise``, floored at the dtype's unit roundoff
  at the output's largest magnitude (``floor``: one rounding; with right padding bfloat16 BERT's
  eager and sdpa logits agree exactly, and a zero yardstick would demand bit-equality).
  Required: ``diff <= K * max(noise, floor)``, ``K = 3``. Measured (max over sdpa and eager):
  ``diff / noise`` at most 2.0 (bfloat16 BERT 9.8e-4 vs 4.9e-4, RoBERTa 1.6e-2 vs 7.8e-3),
  ``diff / max(noise, floor)`` at most 1.25 (float16 T5 4.9e-3 vs 3.9e-3); absolute
  differences up to 3.1e-2 in bfloat16 (T5 logits) and 4.9e-3 in float16.
* **Away from the identity** (a half-precision NV model vs the float32 NV model): the yardstick
  is what the dtype costs the original, ``|original(dtype) - original(float32)|`` (same floor);
  required: ``K`` times that. Measured ratios at most 1.75 (T5 bfloat16: 5.5e-2 vs 3.15e-2).
* **MiniLM** (a real checkpoint, empirical prior): the identity rule, both dtypes.

The NV attention runs in float32 for a 16-bit model (its per-key terms need it), so its
difference from the original is of the size of the original's eager-vs-sdpa difference, not zero.
"""

import copy

import pytest
import torch
from hf_models import ALL, CAUSAL, SEQ2SEQ, build, inputs, output

import nvformer as nv
from nvformer.core.masks import hf_mask_bias, key_padding_from_bias
from nvformer.dirichlet.module import set_eval_kl
from nvformer.hf.convert import attention_modules

HALF = (torch.bfloat16, torch.float16)
K = 3.0  # the multiple of the measured yardstick that a difference may reach (module docstring)
IDENTITY = dict(alpha_tau=60.0)  # default prior: s_alpha = 1, so the prior's weight is ~e^-60
AWAY = dict(alpha_tau=0.0, stdev_tau=0.2)
GENERATE = CAUSAL + SEQ2SEQ


def _max_diff(a, b, valid=None) -> float:
    """Largest absolute difference, over the positions marked valid when ``valid`` is given."""
    if valid is not None and a.dim() == 3 and a.shape[:2] == valid.shape:
        a, b = a[valid], b[valid]
    return float((a.float() - b.float()).abs().max())


def _floor(ref, dtype) -> float:
    """The unit roundoff of ``dtype`` (half its ``eps``) at the largest magnitude of ``ref``: the
    error of a single rounding there, the least any yardstick is taken to be."""
    return 0.5 * torch.finfo(dtype).eps * float(ref.float().abs().max())


def _half_inputs(family, dtype, padding="left"):
    kw, valid = inputs(family, padding)
    if family == "vit":
        kw = {"pixel_values": kw["pixel_values"].to(dtype)}
    return kw, valid


def _nvibs(model):
    return [m.nvib for _, m, _, _ in attention_modules(model) if hasattr(m, "nvib")]


def _gen_kwargs(model, family, tokens=8):
    pad = model.generation_config.pad_token_id
    gk = dict(max_new_tokens=tokens, pad_token_id=0 if pad is None else pad)
    if family == "encdec":
        gk["decoder_start_token_id"] = model.config.decoder_start_token_id
    return gk


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("family", ALL)
def test_identity_against_the_original_in_the_same_dtype(family, dtype):
    """sdpa converted after ``.to(dtype)``, eager converted before it: both orders, both paths."""
    kw, valid = _half_inputs(family, dtype)
    outs = {}
    with torch.no_grad():
        for attn in ("sdpa", "eager"):
            model = build(family, attn)
            nvm = nv.convert(copy.deepcopy(model).to(dtype), **IDENTITY) if attn == "sdpa" else nv.convert(copy.deepcopy(model), **IDENTITY).to(dtype)
            outs[attn], outs["nv", attn] = output(model.to(dtype), kw), output(nvm, kw)
    assert outs["nv", "sdpa"].dtype == dtype and outs["nv", "eager"].dtype == dtype
    noise = _max_diff(outs["sdpa"], outs["eager"], valid)
    tol = K * max(noise, _floor(outs["sdpa"], dtype))
    for attn in ("sdpa", "eager"):
        assert _max_diff(outs["nv", attn], outs[attn], valid) <= tol, (attn, noise)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("family", ("bart", "llama"))
def test_both_orders_give_the_same_model_and_the_nvib_follows_to_in_at_least_float32(family, dtype):
    model = build(family)
    before = nv.convert(copy.deepcopy(model).to(dtype), **AWAY)
    after = nv.convert(copy.deepcopy(model), **AWAY).to(dtype)
    sd_b, sd_a = before.state_dict(), after.state_dict()
    assert list(sd_b) == list(sd_a) and all(torch.equal(sd_b[k], sd_a[k]) and sd_b[k].dtype == sd_a[k].dtype for k in sd_b)
    for nvib in _nvibs(after):
        tensors = [*nvib.parameters(), *nvib.buffers()]
        assert {t.dtype for t in tensors} == {torch.float32}  # the prior buffers too
    assert all(p.dtype == dtype for n, p in after.named_parameters() if ".nvib." not in n)
    kw, _ = _half_inputs(family, dtype)
    with torch.no_grad():
        assert torch.equal(output(before, kw), output(after, kw))
    wide = copy.deepcopy(after).to(torch.float64)
    assert all(t.dtype == torch.float64 for nvib in _nvibs(wide) for t in (*nvib.parameters(), *nvib.buffers()))
    meta = copy.deepcopy(after).to("meta")
    assert all(t.device.type == "meta" for t in (*meta.parameters(), *meta.buffers()))


# (family, decoding) where the original's own bfloat16 tokens depend on its attention arithmetic: its
# eager and sdpa implementations disagree (Qwen2 greedy: two logits tie exactly at one step; the
# BERT encoder-decoder's beam search: two beams' scores differ by less than the noise at the first step)
ORIGINAL_TIES = {("qwen2", "greedy"), ("encdec", "beam")}
DECODING = {"greedy": dict(do_sample=False), "beam": dict(num_beams=3), "sample": dict(do_sample=True, top_k=0)}


@pytest.mark.parametrize("family", GENERATE)
def test_bfloat16_generate_at_identity_gives_the_original_tokens(family):
    """Greedy, beam and seeded sampling give exactly the original's bfloat16 tokens, except where
    no exact match can exist: where the original's own eager and sdpa implementations produce
    different tokens (:data:`ORIGINAL_TIES`, checked to be exactly those cases), the NV tokens must
    be one of the two: the original's output under one of its own attention arithmetics."""
    originals = {attn: build(family, attn).to(torch.bfloat16) for attn in ("sdpa", "eager")}
    nvm = nv.convert(copy.deepcopy(originals["sdpa"]), **IDENTITY)
    kw, _ = inputs(family, "left" if family in CAUSAL else "right")
    kw.pop("decoder_input_ids", None)
    gk = _gen_kwargs(nvm, family)
    for decoding, extra in DECODING.items():
        runs = {}
        for name, model in (*originals.items(), ("nv", nvm)):
            torch.manual_seed(3)
            runs[name] = model.generate(**kw, **gk, **extra)
        tie = not torch.equal(runs["sdpa"], runs["eager"])
        assert tie == ((family, decoding) in ORIGINAL_TIES), decoding
        assert torch.equal(runs["nv"], runs["sdpa"]) or (tie and torch.equal(runs["nv"], runs["eager"])), decoding


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("family", ALL)
def test_away_from_identity_half_precision_is_as_close_to_float32_as_the_original(family, dtype):
    kw32, valid = inputs(family, "left")
    kw, _ = _half_inputs(family, dtype)
    with torch.no_grad():
        for attn in ("sdpa", "eager"):
            model = build(family, attn)
            nvm = nv.convert(copy.deepcopy(model), **AWAY)
            ref32, nv32 = output(model, kw32), output(nvm, kw32)
            cost = _max_diff(output(model.to(dtype), kw), ref32, valid)  # what the dtype costs the original
            got = output(nvm.to(dtype), kw)
            assert got.dtype == dtype
            assert _max_diff(got, nv32, valid) <= K * max(cost, _floor(ref32, dtype)), (attn, cost)


def _incremental(model, family):
    """(logits of a step-by-step cached forward, of one full forward, the cache, valid positions)."""
    kw, valid = inputs(family, "left" if family in CAUSAL else "right")
    if family in CAUSAL:
        ids, am = kw["input_ids"], kw["attention_mask"]
        full = model(input_ids=ids, attention_mask=am).logits
        out = model(input_ids=ids[:, :3], attention_mask=am[:, :3], use_cache=True)
        steps = [out.logits]
        for t in range(3, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], attention_mask=am[:, : t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
        return torch.cat(steps, 1), full, out.past_key_values, valid
    dec = kw.pop("decoder_input_ids")
    full = model(**kw, decoder_input_ids=dec).logits
    enc = model.get_encoder()(input_ids=kw["input_ids"], attention_mask=kw["attention_mask"])
    out = model(encoder_outputs=enc, attention_mask=kw["attention_mask"], decoder_input_ids=dec[:, :2], use_cache=True)
    steps = [out.logits]
    for t in range(2, dec.shape[1]):
        out = model(encoder_outputs=enc, attention_mask=kw["attention_mask"], decoder_input_ids=dec[:, t : t + 1],
                    past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
    return torch.cat(steps, 1), full, out.past_key_values, None


@pytest.mark.parametrize("attn", ("sdpa", "eager"))
@pytest.mark.parametrize("family", GENERATE)
def test_bfloat16_kv_cache_decoding_away_from_identity(family, attn):
    """Cached steps equal the full forward (to the identity tolerance); keys are cached in float32
    (their extra channel holds the per-key terms), values in the model's dtype; generate() gives
    the same tokens with and without the cache."""
    dtype = torch.bfloat16
    model = build(family, attn).to(dtype)
    nvm = nv.convert(copy.deepcopy(model), **AWAY)
    with torch.no_grad():
        inc, full, cache, valid = _incremental(nvm, family)
        inc_o, full_o, _, _ = _incremental(model, family)
    noise = _max_diff(inc_o, full_o, valid)  # the original's own cached-vs-full difference (0 on CPU)
    assert inc.dtype == dtype and _max_diff(inc, full, valid) <= K * max(noise, _floor(full, dtype))
    layer = (cache.self_attention_cache if hasattr(cache, "self_attention_cache") else cache).layers[0]
    assert layer.keys.dtype == torch.float32 and layer.values.dtype == dtype
    kw, _ = inputs(family, "left" if family in CAUSAL else "right")
    kw.pop("decoder_input_ids", None)
    gk = dict(_gen_kwargs(model, family, tokens=6), do_sample=False)
    assert torch.equal(nvm.generate(**kw, **gk, use_cache=True), nvm.generate(**kw, **gk, use_cache=False))
    assert nvm.generate(**kw, **gk, num_beams=3).shape[0] == kw["input_ids"].shape[0]


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("family", ALL)
def test_dirichlet_attention_in_half_precision(family, dtype):
    """The mean prediction of a converted model in ``dtype`` is as close to the float32 one as the
    original's ``dtype`` output is to its float32 output (both conversion orders); sampled
    forwards and the evaluation KL run too."""
    kw32, valid = inputs(family, "left")
    kw, _ = _half_inputs(family, dtype)
    model = build(family)
    with torch.no_grad():
        ref32 = output(model, kw32)
        cost = _max_diff(output(copy.deepcopy(model).to(dtype), kw), ref32, valid)
        mean32 = output(nv.convert_dirichlet(copy.deepcopy(model)), kw32)
        # in float32 the mean weights are the softmax up to eps/tau = 1e-5 (DirichletSpec defaults):
        # the outputs agree to 1e-4 (measured at most 2e-5), T5's relative position bias included
        assert _max_diff(mean32, ref32, valid) <= 1e-4
        tol = K * max(cost, _floor(ref32, dtype))
        orders = [nv.convert_dirichlet(copy.deepcopy(model).to(dtype)), nv.convert_dirichlet(copy.deepcopy(model)).to(dtype)]
        outs = []
        for dm in orders:
            outs.append(output(dm, kw))
            assert outs[-1].dtype == dtype and _max_diff(outs[-1], mean32, valid) <= tol, cost
            assert {m.dirichlet.log_tau.dtype for _, m, _, _ in attention_modules(dm)} == {torch.float32}  # tau stays float32
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)  # both conversion orders give the same model
        nv.set_prediction(dm, "sample")
        set_eval_kl(dm)
        sampled = output(dm, kw)
    assert sampled.dtype == dtype and bool(torch.isfinite(sampled).all())
    kls = [m.dirichlet.last_kl for _, m, _, _ in attention_modules(dm)]
    assert all(kl is not None and bool(torch.isfinite(kl).all()) for kl in kls)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("family", ("bart", "llama"))
def test_training_forward_and_backward_in_half_precision(family, dtype):
    """Sampled latents, KL terms and gradients: the NVIB's in float32, the model's in ``dtype``."""
    nvm = nv.convert(build(family), stdev_tau=0.5, alpha_tau=1.0).to(dtype).train()
    kw, _ = inputs(family, "right")
    out = nvm(**kw, labels=kw.get("decoder_input_ids", kw["input_ids"]))
    kl = nv.kl_terms(nvm).total()
    (out.loss + 1e-2 * kl.mean()).backward()
    assert bool(torch.isfinite(out.loss)) and kl.dtype == torch.float32 and bool(torch.isfinite(kl).all())
    nvib = _nvibs(nvm)[0]
    assert nvib.mu_proj.weight.grad.dtype == torch.float32 and bool(torch.isfinite(nvib.mu_proj.weight.grad).all())
    grads = [p.grad for n, p in nvm.named_parameters() if ".nvib." not in n and p.grad is not None]
    assert grads and all(g.dtype == dtype and bool(torch.isfinite(g).all()) for g in grads)


def test_priors_of_a_float16_eager_model_leave_padding_out():
    """A float16 eager model's masks say "masked" with -65504: the prior is still the mean over the
    non-pad inputs only (streamed in float64 and stored in float32: equal to 1e-6; counting the
    padded inputs moves it by ~1e-1)."""
    model = build("bart", attn="eager").to(torch.float16)
    kw, _ = inputs("bart", "left")
    seen = []
    module = model.model.encoder.layers[1].self_attn
    handle = module.register_forward_pre_hook(lambda m, args, kwargs: seen.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    priors = nv.estimate_prior(model, [kw], show_progress=False)
    handle.remove()
    xs = seen[0][kw["attention_mask"].bool()].double()
    torch.testing.assert_close(priors["model.encoder.layers.1.self_attn"].mean.double(), xs.mean(0), rtol=0, atol=1e-6)


def test_float16_masks_are_recognised_as_masks():
    """Hugging Face writes "masked" as -65504 in a float16 mask; widened to float32 it must stay
    masked, or padding goes unnoticed (an eager float16 model would attend to its padding)."""
    pad = torch.tensor([[False, False, True], [True, False, False]])
    fp16 = torch.zeros(2, 1, 3, 3, dtype=torch.float16).masked_fill(pad[:, None, None, :], torch.finfo(torch.float16).min)
    bias = hf_mask_bias(fp16, 2, 3, 3, False, torch.float32, fp16.device)
    assert bias.dtype == torch.float32 and torch.equal(key_padding_from_bias(bias, 2, 3), pad)
    assert bool(torch.isneginf(bias[pad[:, None, None, :].expand_as(bias)]).all())


@pytest.fixture(scope="module")
def minilm():
    from nvformer_studies.common.checkpoints import load_minilm
    from nvformer_studies.common.data import read_reviews

    model, tok = load_minilm()
    texts = read_reviews("books").texts[:20]
    src = tok(texts[:12], padding=True, truncation=True, max_length=64, return_tensors="pt")
    tgt = tok(texts[12:], padding=True, truncation=True, max_length=64, return_tensors="pt")
    return model, nv.estimate_prior(model, [dict(src)], show_progress=False), dict(tgt)


@pytest.mark.parametrize("dtype", HALF)
def test_minilm_with_an_empirical_prior_in_half_precision(minilm, dtype):
    """all-MiniLM-L6-v2 at the identity, empirical prior: NV (sdpa and eager) vs the original in
    ``dtype`` within K times the original's eager-vs-sdpa noise (measured, sdpa / eager: bfloat16
    noise 4.7e-2, NV 4.7e-2 / 4.7e-2; float16 noise 4.9e-3, NV 4.9e-3 / 4.9e-3; outputs up to 5.9).
    The priors are estimated on the float32 model, as a user would estimate once."""
    base, priors, tgt = minilm
    valid = tgt["attention_mask"].bool()
    outs = {}
    with torch.no_grad():
        for attn in ("sdpa", "eager"):
            model = copy.deepcopy(base).to(dtype)
            model.set_attn_implementation(attn)
            outs[attn] = model(**tgt).last_hidden_state
            nvm = nv.convert(model, prior=priors)
            outs["nv", attn] = nvm(**tgt).last_hidden_state
    noise = _max_diff(outs["sdpa"], outs["eager"], valid)
    for attn in ("sdpa", "eager"):
        assert outs["nv", attn].dtype == dtype
        assert _max_diff(outs["nv", attn], outs[attn], valid) <= K * max(noise, _floor(outs["sdpa"], dtype)), (attn, noise)

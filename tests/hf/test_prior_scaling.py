"""The length-aware prior (NVConfig.prior_scaling="length"): the prior component's pseudo-count is
multiplied by the number of tokens each query sees, so its odds against the tokens change by exactly
that factor (encoder rows, causal rows, cross-attention, padding); sdpa = eager, cached decoding =
the full forward, identity unchanged, adapters keep the setting."""

import pytest
import torch
from hf_models import build, inputs, output

import nvformer as nv


def _pair(family, attn="eager", **kw_convert):
    """The same converted model with the constant and with the length-scaled prior."""
    out = []
    for scaling in ("constant", "length"):
        m = build(family, attn).double()
        kw, _ = inputs(family, "right")
        nv.convert(m, prior=nv.estimate_prior(m, [kw], show_progress=False), alpha_tau=0.3, stdev_tau=0.2, prior_scaling=scaling, **kw_convert)
        out.append(m)
    return out, kw


def _odds(w):
    p = w[..., 0]
    return p / (1 - p)


@pytest.mark.parametrize("family,sites,name", [("bert", None, "attentions"), ("gpt2", None, "attentions"), ("llama", None, "attentions"),
                                                ("bart", None, "encoder_attentions"), ("bart", ("cross",), "cross_attentions")])
def test_the_prior_odds_grow_by_the_number_of_visible_tokens(family, sites, name):
    """In the first layer that reads the NV latent (same queries and keys in both models), the
    prior's odds against the tokens grow by exactly the tokens each query sees: all non-pad tokens
    (encoder, cross-attention: the source's), positions 1..t (causal), padding excluded."""
    (const, length), kw = _pair(family, **({} if sites is None else {"sites": sites}))
    with torch.no_grad():
        a, b = const(**kw, output_attentions=True), length(**kw, output_attentions=True)
    mask = kw["attention_mask"]
    ratio = _odds(getattr(b, name)[0]) / _odds(getattr(a, name)[0])  # [B, H, Nt]
    B, H, Nt = ratio.shape
    n = mask.sum(1).double()
    if family in ("gpt2", "llama"):
        want = torch.minimum(torch.arange(1, Nt + 1, dtype=torch.float64)[None, :], n[:, None])[:, None, :].expand(B, H, Nt)
    else:
        want = n[:, None, None].expand(B, H, Nt)
    rows = torch.ones(B, H, Nt, dtype=torch.bool) if name == "cross_attentions" else mask.bool()[:, None, :].expand(B, H, Nt)
    torch.testing.assert_close(ratio[rows], want[rows], rtol=1e-9, atol=0)


@pytest.mark.parametrize("family", ["bert", "llama", "bart"])
def test_sdpa_equals_eager_with_the_length_scaled_prior(family):
    outs = []
    for attn in ("eager", "sdpa"):
        m = build(family, attn).double()
        kw, mask = inputs(family, "right")
        nv.convert(m, prior=nv.estimate_prior(m, [kw], show_progress=False), alpha_tau=0.3, stdev_tau=0.2, prior_scaling="length")
        with torch.no_grad():
            out = output(m, kw)
            outs.append(out[mask] if mask is not None and out.dim() == 3 else out)
    tol = 1e-6 if family == "llama" else 1e-10  # Llama's RMSNorm rounds to float32 (eager and sdpa differ by 4e-8 without NV too)
    torch.testing.assert_close(outs[1], outs[0], rtol=tol, atol=tol)


@pytest.mark.parametrize("family", ["llama", "bart"])
def test_cached_decoding_with_the_length_scaled_prior_equals_the_full_forward(family):
    m = build(family, "sdpa").double()
    kw, _ = inputs(family, "right")
    nv.convert(m, prior=nv.estimate_prior(m, [kw], show_progress=False), alpha_tau=0.3, stdev_tau=0.2, prior_scaling="length")
    with torch.no_grad():
        if family == "llama":
            ids = kw["input_ids"][:1]
            full = m(input_ids=ids).logits
            out = m(input_ids=ids[:, :3], use_cache=True)
            steps, past = [out.logits], out.past_key_values
            for t in range(3, ids.shape[1]):
                out = m(input_ids=ids[:, t : t + 1], past_key_values=past, use_cache=True)
                steps.append(out.logits)
                past = out.past_key_values
        else:
            enc = {"input_ids": kw["input_ids"], "attention_mask": kw["attention_mask"]}
            dec = kw["decoder_input_ids"]
            full = m(**enc, decoder_input_ids=dec).logits
            out = m(**enc, decoder_input_ids=dec[:, :2], use_cache=True)
            steps, past = [out.logits], out.past_key_values
            for t in range(2, dec.shape[1]):
                out = m(**enc, decoder_input_ids=dec[:, t : t + 1], past_key_values=past, use_cache=True)
                steps.append(out.logits)
                past = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)


def test_identity_is_unchanged_and_the_setting_is_saved(tmp_path):
    m = build("bert", "sdpa")
    kw, _ = inputs("bert", "right")
    with torch.no_grad():
        want = output(m, kw)
    nv.convert(m, prior=nv.estimate_prior(m, [kw], show_progress=False), prior_scaling="length")
    with torch.no_grad():
        torch.testing.assert_close(output(m, kw), want, rtol=1e-5, atol=1e-5)
    assert nv.get_config(m).prior_scaling == "length"
    nv.set_knobs(m, alpha_tau=0.3)
    nv.save_adapter(m, tmp_path / "a")
    fresh = nv.load_adapter(build("bert", "sdpa"), tmp_path / "a")
    assert nv.get_config(fresh).prior_scaling == "length"
    with torch.no_grad():
        torch.testing.assert_close(output(fresh, kw), output(m, kw), rtol=0, atol=0)


def test_pytorch_models_and_sampling_refuse_it():
    enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 1, enable_nested_tensor=False)
    with pytest.raises(ValueError, match="supported on Hugging Face models"):
        nv.convert(enc, prior_scaling="length")
    with pytest.raises(ValueError, match="`prior_scaling` must be one of"):
        nv.NVConfig(prior_scaling="log")
    (_, length), kw = _pair("bert", "sdpa")
    nv.set_prediction(length, "sample")
    with pytest.raises(ValueError, match="evaluation form"):
        length(**kw)

"""Per-head knobs (one alpha_tau and one stdev_tau per key/value head): heads at the layer's knobs
compute what the layer computes, each head's attention equals the layer's at that head's knobs,
identity is exact per head, KV-cache decoding agrees with the full forward, adapters keep them,
and bad values are refused before anything changes."""

import pytest
import torch
from hf_models import build, inputs, output

import nvformer as nv
from nvformer.api import knob_groups


def _converted(family, attn="sdpa"):
    m = build(family, attn).double()
    kw, _ = inputs(family, "right")
    nv.convert(m, prior=nv.estimate_prior(m, [kw], show_progress=False))
    return m, kw


def _layer_knobs(m, u=0.5, stdev=0.3):
    for _, _, nvib in knob_groups(m):
        nvib.set_knobs(alpha_tau=u / float(nvib.prior.log_alpha_std), stdev_tau=stdev)


@pytest.mark.parametrize("family,attn", [("bert", "sdpa"), ("bert", "eager"), ("llama", "sdpa"), ("llama", "eager"), ("bart", "sdpa"),
                                         ("t5", "sdpa")])
def test_heads_at_the_layers_knobs_compute_what_the_layer_computes(family, attn):
    m, kw = _converted(family, attn)
    _layer_knobs(m)
    with torch.no_grad():
        want = output(m, kw)
    for _, _, nvib in knob_groups(m):
        nvib.set_head_knobs(nvib.alpha_tau, nvib.stdev_tau)
    with torch.no_grad():
        torch.testing.assert_close(output(m, kw), want, rtol=0, atol=1e-10)


def test_each_heads_attention_is_the_layers_at_that_heads_knobs():
    m, kw = _converted("bert", "eager")
    per = [(0.2, 0.0), (1.0, 0.1), (-0.5, 0.3), (3.0, 0.5)]  # (nats, stdev_tau) per head

    def heads():
        for _, _, nvib in knob_groups(m):
            s = float(nvib.prior.log_alpha_std)
            nvib.set_head_knobs([u / s for u, _ in per], [sd for _, sd in per])

    heads()
    with torch.no_grad():
        got = m(**kw, output_attentions=True).attentions[0]
    for h, (u, sd) in enumerate(per):
        for _, _, nvib in knob_groups(m):
            nvib.set_head_knobs()
        _layer_knobs(m, u, sd)
        with torch.no_grad():
            ref = m(**kw, output_attentions=True).attentions[0]
        torch.testing.assert_close(got[:, h], ref[:, h], rtol=0, atol=1e-12)


def test_heads_at_the_identity_compute_what_the_original_computes():
    m = build("llama", "sdpa")
    kw, mask = inputs("llama", "right")
    with torch.no_grad():
        want = output(m, kw)[mask]
    nv.convert(m, prior=nv.estimate_prior(m, [kw], show_progress=False))
    nv.set_head_knobs(m, {key: {"alpha_tau": [nv.IDENTITY.alpha_tau] * nvib.kv_heads, "stdev_tau": 0.0} for key, _, nvib in knob_groups(m)})
    assert all(nvib.kv_heads == 2 and nvib.num_heads == 4 for _, _, nvib in knob_groups(m))  # grouped-query attention: per key/value head
    with torch.no_grad():
        torch.testing.assert_close(output(m, kw)[mask], want, rtol=1e-5, atol=1e-5)


def test_cached_decoding_with_head_knobs_equals_the_full_forward():
    m, kw = _converted("llama", "sdpa")
    for _, _, nvib in knob_groups(m):
        s = float(nvib.prior.log_alpha_std)
        nvib.set_head_knobs([0.5 / s, 2.0 / s], [0.3, 0.1])
    ids = kw["input_ids"][:1]
    with torch.no_grad():
        full = m(input_ids=ids).logits
        out = m(input_ids=ids[:, :4], use_cache=True)
        steps = [out.logits]
        past = out.past_key_values
        for t in range(4, ids.shape[1]):
            out = m(input_ids=ids[:, t : t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)


def test_head_knobs_survive_an_adapter_round_trip(tmp_path):
    m, kw = _converted("bert")
    _layer_knobs(m)
    key = knob_groups(m)[1][0]
    nv.set_head_knobs(m, {key: {"alpha_tau": [0.1, 0.2, 0.3, 0.4], "stdev_tau": [0.0, 0.1, 0.2, 0.3]}})
    with torch.no_grad():
        want = output(m, kw)
    nv.save_adapter(m, tmp_path / "a")
    fresh = build("bert", "sdpa").double()
    nv.load_adapter(fresh, tmp_path / "a")
    assert nv.get_head_knobs(fresh) == nv.get_head_knobs(m) and list(nv.get_head_knobs(fresh)) == [key]
    with torch.no_grad():
        torch.testing.assert_close(output(fresh, kw), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("value,match", [
    ({"alpha_tau": [1.0, 2.0]}, "4 values"),
    ({"stdev_tau": [0.1, -0.1, 0.0, 0.0]}, ">= 0"),
    ({"alpha_tau": [1.0, float("nan"), 1.0, 1.0]}, "finite"),
    ({"beta": 1.0}, "expected"),
])
def test_bad_head_knobs_change_nothing(value, match):
    m, kw = _converted("bert")
    keys = [key for key, _, _ in knob_groups(m)]
    with pytest.raises(ValueError, match=match):
        nv.set_head_knobs(m, {keys[0]: {"alpha_tau": 1.0, "stdev_tau": 0.2}, keys[1]: value})
    assert nv.get_head_knobs(m) == {}  # the first, valid group was not applied either
    with pytest.raises(ValueError, match="match no NV module"):
        nv.set_head_knobs(m, {"decoder.7": {"alpha_tau": 1.0}})


def test_head_knobs_are_evaluation_only_and_hf_only():
    m, kw = _converted("bert")
    nv.set_head_knobs(m, {knob_groups(m)[0][0]: {"alpha_tau": 1.0}})
    m.train()
    with pytest.raises(ValueError, match="evaluation form"):
        m(**kw)
    enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 1, enable_nested_tensor=False)
    nv.convert(enc)
    with pytest.raises(ValueError, match="Hugging Face"):
        nv.set_head_knobs(enc, {})

"""The model-level verbs on Hugging Face and plain PyTorch models: convert (config, prior dict),
unconvert, get_config / get_knobs / set_knobs (atomic), estimate_prior, set_prediction."""

import copy

import pytest
import torch
from hf_models import build, inputs, output
from torch import nn

import nvformer as nv
from nvformer.api import knob_groups


def _transformer(seed=0):
    torch.manual_seed(seed)
    m = nn.Transformer(16, 4, 2, 2, 32, dropout=0.0, batch_first=True)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def _torch_batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 5, 16, generator=g), torch.randn(2, 4, 16, generator=g)) for _ in range(n)]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_torch_prior_dict_is_used_and_equals_the_converted_models_estimate():
    model = _transformer()
    batches = _torch_batches()
    priors = nv.estimate_prior(model, batches, show_progress=False)  # on the original model
    assert set(priors) == {f"encoder.layers.{i}.self_attn" for i in (0, 1)} | {f"decoder.layers.{i}.{a}" for i in (0, 1)
                                                                               for a in ("self_attn", "multihead_attn")}
    src, tgt = batches[0]
    with torch.no_grad():
        ref = model(src, tgt, tgt_mask=nn.Transformer.generate_square_subsequent_mask(4), tgt_is_causal=True)
    nv.convert(model, prior=priors)
    for name, p in priors.items():
        torch.testing.assert_close(model.get_submodule(name).nvib.prior.var, p.var)
    with torch.no_grad():
        out = model(src, tgt, tgt_mask=nn.Transformer.generate_square_subsequent_mask(4), tgt_is_causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    again = nv.estimate_prior(model, batches, show_progress=False, apply=False)  # converted, at the identity
    for name, p in priors.items():
        torch.testing.assert_close(again[name].mean, p.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(again[name].log_alpha, p.log_alpha, rtol=1e-5, atol=1e-6)
    assert {info.site for _, info, _ in knob_groups(model)} == {"encoder", "decoder", "cross"}


@pytest.mark.parametrize("family", ["bert", "gpt2", "bart", "t5", "llama"])
def test_unconvert_restores_classes_and_state_dict(family):
    model = build(family)
    classes = {n: type(m) for n, m in model.named_modules()}
    before = _state(model)
    kw, valid = inputs(family, "right")
    with torch.no_grad():
        ref = output(model, kw)
    nv.convert(model, prior=nv.estimate_prior(model, [kw], show_progress=False), alpha_tau=-1.0, stdev_tau=0.2)
    with torch.no_grad():
        assert not torch.allclose(output(model, kw), ref, atol=1e-4)
    assert nv.unconvert(model) is model
    assert {n: type(m) for n, m in model.named_modules()} == classes
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        torch.testing.assert_close(output(model, kw), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="not converted"):
        nv.unconvert(model)
    nv.convert(model)  # converting again works


def test_unconvert_plain_pytorch_model():
    model = _transformer()
    classes = {n: type(m) for n, m in model.named_modules()}
    before = _state(model)
    nested = model.encoder.use_nested_tensor
    nv.convert(model, alpha_tau=0.5)
    nv.unconvert(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes and model.encoder.use_nested_tensor == nested
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_get_config_round_trips_per_site_and_per_layer_knobs():
    model = nv.convert(build("bart"), formula="exact", delta=0.5)
    nv.set_knobs(model, alpha_tau=2.0, site="encoder")
    nv.set_knobs(model, stdev_tau=0.3, site="decoder", layers=1)
    nv.set_knobs(model, mu_tau=0.8, site="cross")
    cfg = model_cfg = nv.get_config(model)
    assert cfg.formula == "exact" and cfg.delta == 0.5 and cfg.sites == ("encoder", "decoder", "cross")
    assert cfg.knobs == {"encoder": nv.IDENTITY.replace(alpha_tau=2.0), "decoder.0": nv.IDENTITY,
                         "decoder.1": nv.IDENTITY.replace(stdev_tau=0.3), "cross": nv.IDENTITY.replace(mu_tau=0.8)}
    fresh = nv.convert(build("bart"), model_cfg)
    assert nv.get_knobs(fresh) == nv.get_knobs(model)
    kw, _ = inputs("bart", "right")
    with torch.no_grad():
        torch.testing.assert_close(output(fresh, kw), output(model, kw), rtol=0, atol=0)
    other = nv.convert(build("bart"))
    nv.set_knobs(other, model_cfg)  # a config sets every module
    assert nv.get_knobs(other) == nv.get_knobs(model)
    assert nv.get_config(nv.convert(build("bert"))).knobs == {"*": nv.IDENTITY}


def test_set_knobs_is_atomic_and_mappings_touch_only_their_groups():
    model = nv.convert(build("bart"))
    before = nv.get_knobs(model)
    with pytest.raises(ValueError, match="stdev_tau"):
        nv.set_knobs(model, mu_tau=0.5, stdev_tau=-1.0)
    assert nv.get_knobs(model) == before  # nothing changed, not even the first module
    with pytest.raises(ValueError, match="match no NV module"):
        nv.set_knobs(model, {"encoder.9": {"alpha_tau": 1.0}})
    with pytest.raises(ValueError, match="finite"):
        nv.set_knobs(model, {"encoder.0": {"alpha_tau": float("nan")}, "decoder.1": {"alpha_tau": 1.0}})
    assert nv.get_knobs(model) == before
    nv.set_knobs(model, {"encoder.1": nv.Knobs(alpha_tau=1.0), "decoder": {"stdev_tau": 0.1}})
    after = nv.get_knobs(model)
    assert after["encoder.1"].alpha_tau == 1.0 and after["decoder.0"].stdev_tau == after["decoder.1"].stdev_tau == 0.1
    assert after["encoder.0"] == after["cross"] == nv.IDENTITY
    with pytest.raises(ValueError, match="unknown site"):
        nv.set_knobs(model, alpha_tau=1.0, site="attention")
    with pytest.raises(ValueError, match="convert it first"):
        nv.set_knobs(build("bert"), alpha_tau=1.0)


def test_convert_errors_are_checked_before_the_model_changes():
    gpt2 = build("gpt2")
    with pytest.raises(ValueError, match=r"no attention module at site\(s\) \['encoder'\]; its sites are \['decoder'\]"):
        nv.convert(gpt2, sites=("encoder",))
    assert not any(hasattr(m, "nvib") for m in gpt2.modules())
    with pytest.raises(ValueError, match="unknown argument"):
        nv.convert(gpt2, temperature=2.0)
    bert = build("bert")
    other = nv.estimate_prior(build("bart"), [inputs("bart", "right")[0]], show_progress=False)
    with pytest.raises(ValueError, match="no entry"):
        nv.convert(bert, prior=other)
    assert not any(hasattr(m, "nvib") for m in bert.modules())  # nothing half-converted
    nv.convert(bert)
    with pytest.raises(ValueError, match="already converted"):
        nv.convert(bert)
    torch_model = nv.convert(_transformer())
    with pytest.raises(ValueError, match="already converted"):
        nv.convert(torch_model)


def test_set_prediction_samples_like_the_training_form_without_dropout():
    model = nv.convert(build("bert"), alpha_tau=2.0, stdev_tau=0.3)
    kw, valid = inputs("bert", "right")
    with torch.no_grad():
        mean = output(model, kw)
        nv.set_prediction(model, "sample")
        torch.manual_seed(5)
        s1 = output(model, kw)
        s2 = output(model, kw)
    assert not torch.allclose(s1, s2) and not model.training
    # the same draws as the training form of the attention modules with their dropout off
    reference = copy.deepcopy(model)
    nv.set_prediction(reference, "mean")
    for _, m in nv.api.nv_modules(reference):
        m.train()
        for d in m.modules():
            if isinstance(d, nn.Dropout):
                d.p = 0.0
    with torch.no_grad():
        torch.manual_seed(5)
        torch.testing.assert_close(output(reference, kw), s1, rtol=0, atol=0)
    nv.set_prediction(model, "mean")
    with torch.no_grad():
        torch.testing.assert_close(output(model, kw), mean, rtol=0, atol=0)
    with pytest.raises(ValueError, match="mode"):
        nv.set_prediction(model, "median")
    with pytest.raises(ValueError, match="no NV or Dirichlet"):
        nv.set_prediction(build("bert"), "sample")


def test_estimate_prior_needs_data():
    with pytest.raises(ValueError, match="no data"):
        nv.estimate_prior(build("bert"), [], show_progress=False)
    with pytest.raises(ValueError, match="no data"):
        nv.estimate_prior(_transformer(), [], show_progress=False)

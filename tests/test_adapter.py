"""NV adapters: save what NV adds, load it onto a freshly loaded model of any class, reject what
does not fit before changing anything."""

import json

import pytest
import torch
import transformers as tf
from hf_models import build, inputs, output
from torch import nn

import nvformer as nv
from nvformer.adapter import CONFIG_FILE, TENSORS_FILE


def _regularised(family, save_base_to=None):
    """A converted tiny model (prior from one batch) with knobs away from the identity in two groups."""
    model = build(family)
    if save_base_to is not None:
        model.save_pretrained(save_base_to)
    kw, _ = inputs(family, "right")
    nv.convert(model, prior=nv.estimate_prior(model, [kw], show_progress=False))
    groups = list(nv.get_knobs(model))
    nv.set_knobs(model, {groups[0]: nv.Knobs(alpha_tau=0.5, stdev_tau=0.2), groups[-1]: nv.Knobs(alpha_tau=-1.0, mu_tau=0.9)})
    return model, kw


@pytest.mark.parametrize("family", ["bert", "gpt2", "bart", "llama", "t5"])
def test_round_trip_onto_a_freshly_loaded_model(family, tmp_path):
    model, kw = _regularised(family, tmp_path / "base")
    nv.save_adapter(model, tmp_path / "nv")
    assert sorted(p.name for p in (tmp_path / "nv").iterdir()) == [CONFIG_FILE, TENSORS_FILE]
    fresh = type(model).from_pretrained(tmp_path / "base").eval()
    fresh.set_attn_implementation("sdpa")
    assert nv.load_adapter(fresh, tmp_path / "nv") is fresh
    assert nv.get_config(fresh) == nv.get_config(model)
    with torch.no_grad():
        torch.testing.assert_close(output(fresh, kw), output(model, kw), rtol=0, atol=1e-6)


def test_an_adapter_of_the_base_model_loads_onto_a_model_with_a_head(tmp_path):
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=3)
    tf.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "clf")
    base = tf.AutoModel.from_pretrained(tmp_path / "clf").eval()
    kw, _ = inputs("bert", "right")
    nv.convert(base, prior=nv.estimate_prior(base, [kw], show_progress=False), alpha_tau=0.3)
    nv.save_adapter(base, tmp_path / "nv")
    assert set(json.loads((tmp_path / "nv" / CONFIG_FILE).read_text())["modules"]) == {f"encoder.layer.{i}.attention.self" for i in (0, 1)}
    clf = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path / "clf").eval()
    nv.load_adapter(clf, tmp_path / "nv")
    with torch.no_grad():
        torch.testing.assert_close(clf.bert(**kw).last_hidden_state, base(**kw).last_hidden_state, rtol=0, atol=1e-6)


def test_trained_nvib_parameters_are_saved_and_restored(tmp_path):
    model, kw = _regularised("bert", tmp_path / "base")
    nvib = model.bert.encoder.layer[1].attention.self.nvib
    assert nvib.in_identity_form()
    with torch.no_grad():
        nvib.mu_proj.weight.add_(torch.randn_like(nvib.mu_proj.weight) * 0.01)  # as training would
    assert not nvib.in_identity_form()
    nv.save_adapter(model, tmp_path / "nv")
    meta = json.loads((tmp_path / "nv" / CONFIG_FILE).read_text())
    assert [m.get("trained") for m in meta["modules"].values()] == [False, True]
    fresh = nv.load_adapter(type(model).from_pretrained(tmp_path / "base").eval(), tmp_path / "nv")
    torch.testing.assert_close(fresh.bert.encoder.layer[1].attention.self.nvib.mu_proj.weight, nvib.mu_proj.weight, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(output(fresh, kw), output(model, kw), rtol=0, atol=1e-6)


def test_plain_pytorch_model_round_trip(tmp_path):
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2).eval()
    original = {k: v.clone() for k, v in enc.state_dict().items()}
    x = torch.randn(2, 5, 16)
    nv.convert(enc, prior=nv.estimate_prior(enc, [x], show_progress=False), alpha_tau=0.2, stdev_tau=0.1)
    nv.save_adapter(enc, tmp_path / "nv")
    fresh = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2).eval()
    fresh.load_state_dict(original)
    nv.load_adapter(fresh, tmp_path / "nv")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), enc(x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="saved from a PyTorch model"):
        nv.load_adapter(build("bert"), tmp_path / "nv")


def test_the_adapter_of_a_real_checkpoint_is_a_tiny_fraction_of_it(tmp_path):
    from nvformer_studies.common.checkpoints import load_minilm, minilm_path

    model, tok = load_minilm()
    batch = dict(tok(["a short review of a book", "another one, a little longer than the first"], padding=True, return_tensors="pt"))
    nv.convert(model, prior=nv.estimate_prior(model, [batch], show_progress=False))
    nv.save_adapter(model, tmp_path / "nv")
    adapter = sum(p.stat().st_size for p in (tmp_path / "nv").iterdir())
    weights = (minilm_path() / "model.safetensors").stat().st_size
    assert adapter < 0.005 * weights, (adapter, weights)  # 6 priors of 2 x 384 + 2 numbers, and the JSON


def test_mismatched_models_are_rejected_before_anything_changes(tmp_path):
    model, _ = _regularised("bert")
    nv.save_adapter(model, tmp_path / "nv")
    gpt2 = build("gpt2")
    with pytest.raises(ValueError, match="attention modules differ"):
        nv.load_adapter(gpt2, tmp_path / "nv")
    wide = tf.BertForSequenceClassification(tf.BertConfig(vocab_size=60, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=64)).eval()
    with pytest.raises(ValueError, match="width 48"):
        nv.load_adapter(wide, tmp_path / "nv")
    with pytest.raises(ValueError, match="already converted"):
        nv.load_adapter(model, tmp_path / "nv")
    for m in (gpt2, wide):
        assert not any(hasattr(x, "nvib") for x in m.modules())
    with pytest.raises(ValueError, match="not an NV adapter"):
        nv.load_adapter(build("bert"), tmp_path)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["config"]["knobs"]["*"].update(stdev_tau=-0.5), "stdev_tau"),
    (lambda m: m["config"]["knobs"]["*"].update(alpha_tau=float("nan")), "finite"),
    (lambda m: m["config"].update(formula="magic"), "formula"),
    (lambda m: m.update(extra=1), "unknown key"),
    (lambda m: m.update(format_version=1), "format version"),
    (lambda m: next(iter(m["modules"].values())).update(site="middle"), "bad entry"),
])
def test_invalid_adapter_files_are_rejected(tmp_path, edit, match):
    model, _ = _regularised("bert")
    nv.set_knobs(model, nv.IDENTITY)
    nv.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    edit(meta)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta))
    fresh = build("bert")
    with pytest.raises(ValueError, match=match):
        nv.load_adapter(fresh, tmp_path)
    assert not any(hasattr(x, "nvib") for x in fresh.modules())


def test_non_finite_priors_are_rejected(tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = _regularised("bert")
    nv.save_adapter(model, tmp_path)
    tensors = load_file(str(tmp_path / TENSORS_FILE))
    key = next(k for k in tensors if k.endswith("prior.mean"))
    tensors[key][0] = float("nan")
    save_file(tensors, str(tmp_path / TENSORS_FILE))
    with pytest.raises(ValueError, match="not finite"):
        nv.load_adapter(build("bert"), tmp_path)

"""The out-of-domain study: its pieces against direct computations, and a tiny end-to-end run."""

import math

import pytest
import torch
import transformers as tf
from hf_models import build, inputs

from nvformer import convert, estimate_prior
from nvformer_studies.sentiment.report import headline, summary_markdown, write_outputs
from nvformer_studies.sentiment.study import (
    MeanPoolClassifier,
    StudyConfig,
    StudyResult,
    information_maximisation,
    prior_only,
    run_study,
)


def test_information_maximisation_matches_a_direct_computation():
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.2], [-3.0, 1.0]])
    p = logits.double().softmax(-1)
    marginal = p.mean(0)
    direct = -(marginal * marginal.log()).sum() + (p * p.log()).sum(-1).mean()
    assert information_maximisation(logits) == pytest.approx(direct.item(), abs=1e-12)
    # confident and balanced: log 2; collapsed onto one class (however confident): 0
    assert information_maximisation(torch.tensor([[50.0, -50.0], [-50.0, 50.0]])) == pytest.approx(math.log(2))
    assert information_maximisation(torch.tensor([[50.0, -50.0], [50.0, -50.0]])) == pytest.approx(0.0, abs=1e-12)


def test_prior_only_control_puts_all_attention_on_the_prior_component():
    model = build("bert", attn="eager")  # the eager NV path returns the attention weights over [prior, tokens]
    kw, _ = inputs("bert", "right")
    convert(model, prior=estimate_prior(model, [kw], show_progress=False), alpha_tau=1e4)
    seen = {}
    hooks = [model.bert.encoder.layer[i].attention.self.register_forward_hook(lambda mod, args, out, i=i: seen.update({i: out[1]}))
             for i in (0, 1)]
    with torch.no_grad():
        model(**kw)
        assert seen[1][..., 0].max() < 0.9  # at identity the prior column gets little weight
        prior_only(model, layers=1)
        model(**kw)
    for h in hooks:
        h.remove()
    w = seen[1]  # [B, H, N, 1 + N]
    torch.testing.assert_close(w[..., 0], torch.ones_like(w[..., 0]), rtol=0, atol=1e-6)
    assert w[..., 1:].abs().max() < 1e-6
    assert seen[0][..., 0].max() < 0.9  # layer 0 untouched
    assert model.bert.encoder.layer[0].attention.self.nvib.knobs().alpha_tau == 1e4


def test_mean_pool_classifier_head_fits_separable_features():
    torch.manual_seed(0)
    enc = tf.BertModel(tf.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    clf = MeanPoolClassifier(enc, 2)

    class Set:  # the TextBatches interface: batches, order, labels, unsort
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.labels = torch.randint(0, 2, (n,), generator=g)
            ids = torch.where(self.labels[:, None].bool(), torch.randint(1, 15, (n, 6), generator=g), torch.randint(15, 30, (n, 6), generator=g))
            self.batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
            self.order = torch.arange(n)

        def unsort(self, rows):
            return rows

    info = clf.fit_head(Set(80, 0), Set(40, 1))
    assert info["val_accuracy"] > 0.9 and info["l2"] in (1e-2, 1e-3, 1e-4)
    assert clf(**Set(5, 2).batches[0]).logits.shape == (5, 2)


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown domain"):
        StudyConfig(targets=("dvd", "poetry"))
    with pytest.raises(ValueError, match="cannot also be a target"):
        StudyConfig(targets=("books",))
    with pytest.raises(ValueError, match="WiSE"):
        StudyConfig(wise=(1.0,))


def test_tiny_study_end_to_end(tmp_path):
    from nvformer_studies.common.checkpoints import load_minilm

    _, tok = load_minilm()
    cfg = tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        num_labels=2, max_position_embeddings=64)
    torch.manual_seed(0)
    tf.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "ft")
    tok.save_pretrained(tmp_path / "ft")
    torch.manual_seed(1)
    tf.BertModel(cfg).save_pretrained(tmp_path / "pre")
    tok.save_pretrained(tmp_path / "pre")
    study = StudyConfig(model_dir=str(tmp_path / "ft"), pretrained_dir=str(tmp_path / "pre"), targets=("dvd", "airline"),
                        max_length=32, n_val=24, n_test=30, prior_examples=16, trials=2, layer_trials=2, joint_trials=2,
                        wise=(0.5,), frozen=True, bootstrap=50)
    result = run_study(study, tmp_path / "out", show_progress=False)
    write_outputs(result, tmp_path / "out")
    methods = {(r["setting"], r["method"]) for r in result.rows}
    for m in ("baseline", "nv-target", "nv-source", "nv-label-free", "nv-layer-0", "nv-layer-1", "nv-best-layer", "nv-per-layer",
              "control-target", "control-layer-1", "wise-target", "wise-source", "wise+nv-target"):
        assert ("fine-tuned", m) in methods, m
    assert ("frozen", "nv-target") in methods and ("frozen", "nv-label-free") not in methods
    for r in result.rows:  # every row's metrics are those of its saved logits
        key = f"{r['setting']}|{r['method']}|{r['target']}|{r['domain']}"
        logits, y = result.logits[key], result.labels[r["domain"]]
        assert len(y) == 30 and r["accuracy"] == pytest.approx((logits.argmax(-1) == y).float().mean().item())
    base = [r for r in result.rows if r["method"] == "baseline" and r["setting"] == "fine-tuned"]
    assert {r["domain"] for r in base} == {"books", "dvd", "airline"}
    assert {(c["lam"], c["domain"]) for c in result.wise_curve} == {(lam, d) for lam in (0.5, 1.0) for d in ("books", "dvd", "airline")}
    # the searches' choices are no worse than the identity on the validation split they were tuned on
    assert all(r["val"] is not None for r in result.rows if r["method"].startswith("nv-") and r["setting"] == "fine-tuned")
    text = summary_markdown(result)
    assert "| baseline |" in text and "| nv-target |" in text and "Where the gain lives" in text
    assert "Goal" in headline(result)
    for name in ("results.json", "logits.safetensors", "summary.md", "gains.png", "layers.png", "wise.png"):
        assert (tmp_path / "out" / name).exists(), name
    again = StudyResult.load(tmp_path / "out")
    assert summary_markdown(again) == text
    for name in ("logits", "labels"):  # the cache is safetensors, and exact
        saved, loaded = getattr(result, name), getattr(again, name)
        assert list(loaded) == list(saved) and all(torch.equal(loaded[k], saved[k]) and loaded[k].dtype == saved[k].dtype for k in saved)
    assert result.info["cache_calls"]["memo"] > 0  # settings visited twice were not recomputed

"""KnobCache: memoised, layer-replaying evaluation equals plain evaluation for every knob change."""

import pytest
import torch
import transformers as tf

from nvformer import convert, estimate_prior, set_knobs
from nvformer.tasks import classification_batches, predict_logits
from nvformer.tuning.cache import KnobCache, layer_stack


class _Tok:
    """A minimal tokenizer interface over integer 'texts' (lists of ids)."""

    def __call__(self, texts, truncation=True, max_length=64):
        return {"input_ids": [t[:max_length] for t in texts], "attention_mask": [[1] * min(len(t), max_length) for t in texts]}

    def pad(self, feats, return_tensors="pt"):
        n = max(len(f["input_ids"]) for f in feats)
        ids = torch.zeros(len(feats), n, dtype=torch.long)
        mask = torch.zeros(len(feats), n, dtype=torch.long)
        for i, f in enumerate(feats):
            ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[i, : len(f["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=48, num_labels=3,
                        initializer_range=0.3)
    model = tf.BertForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(1)
    texts = [torch.randint(1, 50, (int(n),), generator=g).tolist() for n in torch.randint(3, 20, (23,), generator=g)]
    data = classification_batches(_Tok(), texts, batch_size=5)
    other = classification_batches(_Tok(), texts[:7], batch_size=3)
    convert(model, prior=estimate_prior(model, data.batches, show_progress=False), alpha_tau=1e4)
    return model, data, other


def test_layer_stack_finds_the_encoder_layers(setup):
    model, *_ = setup
    stack, mods = layer_stack(model)
    assert stack is model.bert.encoder.layer and [len(m) for m in mods] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="no NV attention module"):
        layer_stack(torch.nn.Linear(2, 2))


def test_replayed_and_memoised_logits_equal_plain_evaluation(setup):
    model, data, other = setup
    cache = KnobCache(model)
    base = cache.logits(data)
    torch.testing.assert_close(base, predict_logits(model, data), rtol=0, atol=0)
    assert cache.calls["full"] == 1
    settings = [dict(layers=3, alpha_tau=-1.0), dict(layers=1, alpha_tau=-2.0, stdev_tau=0.2), dict(layers=2, alpha_tau=-1e4),
                dict(alpha_tau=0.5)]
    for s in settings:
        set_knobs(model, alpha_tau=1e4, stdev_tau=0.0)
        set_knobs(model, **s)
        got = cache.logits(data)
        torch.testing.assert_close(got, predict_logits(model, data), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(got, base, atol=1e-4), s  # the knob change is visible
    # layers 3, 1 and 2 settings replayed the reference outputs; the all-layer one ran everything
    assert cache.calls["replayed_layers"] == 3 and cache.calls["full"] == 2
    assert cache.calls["run_layers"] == 4 + 1 + 3 + 2 + 4
    set_knobs(model, alpha_tau=1e4, stdev_tau=0.0)
    set_knobs(model, layers=3, alpha_tau=-1.0)
    again = cache.logits(data)
    assert cache.calls["memo"] == 1 and again is cache.memo[next(k for k in cache.memo if k[2] == cache._state())]
    # another data set has its own entries
    torch.testing.assert_close(cache.logits(other), predict_logits(model, other), rtol=1e-6, atol=1e-6)
    set_knobs(model, alpha_tau=1e4, stdev_tau=0.0)


def test_clear_and_tag_separate_weight_changes(setup):
    model, data, _ = setup
    cache = KnobCache(model)
    before = cache.logits(data)
    with torch.no_grad():
        w = model.classifier.weight
        saved = w.clone()
        w.mul_(2)
        cache.clear(tag="doubled")
        torch.testing.assert_close(cache.logits(data), predict_logits(model, data), rtol=0, atol=0)
        w.copy_(saved)
    cache.clear(tag=None)
    torch.testing.assert_close(cache.logits(data), before, rtol=0, atol=0)


def test_memory_bound_drops_kept_outputs(setup):
    model, data, _ = setup
    cache = KnobCache(model, max_bytes=1)
    cache.logits(data)
    assert cache.outputs == {}
    set_knobs(model, layers=3, alpha_tau=-1.0)
    torch.testing.assert_close(cache.logits(data), predict_logits(model, data), rtol=1e-6, atol=1e-6)
    assert cache.calls["full"] == 2
    set_knobs(model, alpha_tau=1e4, stdev_tau=0.0)

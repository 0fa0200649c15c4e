"""The uncertainty harness: every predictive method and temperature scaling; the nv-sample method
(sampled NV latents in evaluation mode, nothing edited, the same samples as putting the NV attention
modules in training mode without dropout)."""

import copy

import pytest
import torch
import transformers as tf
from torch import nn

from nvformer import convert, convert_dirichlet, estimate_prior
from nvformer.api import nv_modules
from nvformer.tasks import TextBatches
from nvformer_studies.uncertainty.harness import predictive_probs, sampled_nv


def _tiny():
    torch.manual_seed(3)
    return tf.BertForSequenceClassification(tf.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                          intermediate_size=64, num_labels=2)).eval()  # dropout 0.1 everywhere


def test_sampled_nv_samples_in_eval_mode_and_matches_training_mode_without_dropout():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 40, (6, 9), generator=g)
    data = TextBatches([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], torch.arange(6))
    prior = [{"input_ids": torch.randint(1, 40, (8, 9), generator=g)}]
    model = sampled_nv(_tiny(), prior, stdev_tau=2.0, alpha_tau=0.5)
    assert not any(m.training for m in model.modules())
    assert all(m.p == 0.1 for m in model.modules() if isinstance(m, nn.Dropout))  # no dropout edited
    probs = predictive_probs("nv-sample", [model], data, samples=3, seed=0)
    assert probs.shape == (3, 6, 2) and not torch.equal(probs[0], probs[1])  # every forward samples
    assert torch.equal(probs, predictive_probs("nv-sample", [model], data, samples=3, seed=0))  # seeded
    # what the harness did before nvformer.set_prediction: NV modules in training mode, their dropout off
    manual = _tiny()
    convert(manual, prior=estimate_prior(manual, prior, show_progress=False), alpha_tau=0.5, stdev_tau=2.0)
    for _, m in nv_modules(manual):
        m.train()
        for d in m.modules():
            if isinstance(d, nn.Dropout):
                d.p = 0.0
    assert torch.equal(predictive_probs("nv-sample", [manual], data, samples=3, seed=0), probs)
    assert torch.equal(predictive_probs("nv-sample", [copy.deepcopy(model)], data, samples=3, seed=0), probs)


def test_predictive_probs_methods_and_temperature():
    from transformers import BertConfig, BertForSequenceClassification

    from nvformer.tasks import classification_batches
    from nvformer_studies.common.tokenizer import train_tokenizer
    from nvformer_studies.uncertainty.harness import apply_temperature

    tok = train_tokenizer(["a b c d e f g h i"] * 5, 300, min_frequency=1)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, num_labels=2,
                     hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    models = [BertForSequenceClassification(cfg).eval() for _ in range(2)]
    data = classification_batches(tok, ["a b c", "d e", "f g h i"], [0, 1, 0], batch_size=2, max_length=16)
    p_map = predictive_probs("map", models[:1], data, samples=5)
    assert p_map.shape == (1, 3, 2)
    torch.testing.assert_close(p_map.sum(-1), torch.ones(1, 3, dtype=p_map.dtype))
    mc = predictive_probs("mc-dropout", models[:1], data, samples=5, seed=1)
    assert mc.shape == (5, 3, 2) and not torch.equal(mc[0], mc[1])
    torch.testing.assert_close(predictive_probs("mc-dropout", models[:1], data, samples=5, seed=1), mc)  # seeded
    assert not models[0].bert.embeddings.dropout.training  # dropout switched back off
    ens = predictive_probs("ensemble", models, data)
    assert ens.shape == (2, 3, 2)
    torch.testing.assert_close(ens[0], p_map[0])
    convert_dirichlet(models[1])
    ds = predictive_probs("dirichlet-sample", models[1:], data, samples=3)
    assert ds.shape == (3, 3, 2) and not torch.equal(ds[0], ds[1])
    assert predictive_probs("dirichlet-mean", models[1:], data).shape == (1, 3, 2)
    t = apply_temperature(mc, 2.0)
    ref = torch.softmax(mc.mean(0).log() / 2.0, -1)
    torch.testing.assert_close(t[0], ref)
    with pytest.raises(ValueError, match="method"):
        predictive_probs("laplace", models, data)


def test_seed_cache_is_safetensors_and_exact(tmp_path):
    """A seed's run is cached without pickles: probabilities bit-exact, the rest as JSON; other settings miss."""
    from nvformer_studies.uncertainty.study import read_seed_cache, write_seed_cache

    g = torch.Generator().manual_seed(0)
    probs = {m: {d: torch.rand(3, 5, 2, generator=g, dtype=torch.float64).softmax(-1) for d in ("validation", "books", "dvd")}
             for m in ("map", "mc-dropout")}
    saved = {"key": "settings-1", "probs": probs, "seconds": 12.5, "nv_choice": {"stdev_tau": 0.25, "val_nll": 0.123456789012345678},
             "train": {"map-s1": {"train_loss": [0.7, 1 / 3], "val_accuracy": [0.5, 2 / 3], "best_epoch": 1}}}
    path = tmp_path / "probs-s1.safetensors"
    write_seed_cache(path, saved)
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    back = read_seed_cache(path, "settings-1")
    assert {k: v for k, v in back.items() if k != "probs"} == {k: v for k, v in saved.items() if k != "probs"}
    assert list(back["probs"]) == list(probs)
    for m in probs:
        assert list(back["probs"][m]) == list(probs[m]) and all(torch.equal(back["probs"][m][d], probs[m][d]) for d in probs[m])
    assert read_seed_cache(path, "settings-2") is None and read_seed_cache(tmp_path / "none.safetensors", "settings-1") is None
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="not a readable results file"):
        read_seed_cache(path, "settings-1")

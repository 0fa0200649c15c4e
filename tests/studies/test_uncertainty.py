"""The uncertainty study: every predictive method and temperature scaling; the nv-sample method
(sampled NV latents in evaluation mode, nothing edited, the same samples as putting the NV attention
modules in training mode without dropout); tau's own learning rate; the far-OOD data; the scores and
the detection metrics of the study; the seed cache and the tau sweep's choice."""

import copy

import pytest
import torch
import transformers as tf
from torch import nn

from nvformer import convert, convert_dirichlet, estimate_prior
from nvformer.api import nv_modules
from nvformer.tasks import TextBatches
from nvformer_studies.uncertainty.harness import predictive_logits, predictive_probs, sampled_nv


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
    with torch.no_grad():  # the recorded run's computation: the softmax of each batch's logits, in example order
        direct = data.unsort(torch.cat([models[0](**b).logits.double().softmax(-1) for b in data.batches]))
    assert torch.equal(p_map[0], direct)
    assert torch.equal(predictive_logits("mc-dropout", models[:1], data, samples=5, seed=1).softmax(-1),
                       predictive_probs("mc-dropout", models[:1], data, samples=5, seed=1))
    torch.testing.assert_close(p_map.sum(-1), torch.ones(1, 3, dtype=p_map.dtype))
    mc = predictive_probs("mc-dropout", models[:1], data, samples=5, seed=1)
    assert mc.shape == (5, 3, 2) and not torch.equal(mc[0], mc[1])
    torch.testing.assert_close(predictive_probs("mc-dropout", models[:1], data, samples=5, seed=1), mc)  # seeded
    assert not models[0].bert.embeddings.dropout.training  # dropout switched back off
    ens = predictive_probs("ensemble", models, data)
    assert ens.shape == (2, 3, 2)
    assert torch.equal(ens[0], p_map[0])  # bit-identical: the study reuses the "map" row as the ensemble's first member
    assert torch.equal(predictive_logits("ensemble", models, data), torch.cat([predictive_logits("map", models[:1], data),
                                                                              predictive_logits("ensemble", models[1:], data)]))
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
    """A seed's run is cached without pickles: logits bit-exact, the rest as JSON; other settings miss."""
    from nvformer_studies.uncertainty.study import read_seed_cache, write_seed_cache

    g = torch.Generator().manual_seed(0)
    probs = {m: {d: torch.rand(3, 5, 2, generator=g, dtype=torch.float64).softmax(-1) for d in ("validation", "books", "dvd")}
             for m in ("map", "mc-dropout")}
    saved = {"key": "settings-1", "logits": probs, "seconds": 12.5, "nv_choice": {"stdev_tau": 0.25, "val_nll": 0.123456789012345678},
             "train": {"map-s1": {"train_loss": [0.7, 1 / 3], "val_accuracy": [0.5, 2 / 3], "best_epoch": 1}}}
    path = tmp_path / "probs-s1.safetensors"
    write_seed_cache(path, saved)
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header, not a pickle
    back = read_seed_cache(path, "settings-1")
    assert {k: v for k, v in back.items() if k != "logits"} == {k: v for k, v in saved.items() if k != "logits"}
    assert list(back["logits"]) == list(probs)
    for m in probs:
        assert list(back["logits"][m]) == list(probs[m]) and all(torch.equal(back["logits"][m][d], probs[m][d]) for d in probs[m])
    assert read_seed_cache(path, "settings-2") is None and read_seed_cache(tmp_path / "none.safetensors", "settings-1") is None
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="not a readable results file"):
        read_seed_cache(path, "settings-1")


# ------------------------------------------------------------------------------------------ tau's own learning rate


def _tiny_dirichlet(seed=0):
    from nvformer_studies.common.checkpoints import load_minilm

    _, tok = load_minilm()
    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        num_labels=2)
    return convert_dirichlet(tf.BertForSequenceClassification(cfg)), tok


def test_parameter_groups_give_tau_its_own_learning_rate():
    from nvformer_studies.common.finetune import FinetuneConfig, parameter_groups

    model, _ = _tiny_dirichlet()
    cfg = FinetuneConfig(lr=5e-5, weight_decay=0.01)
    (alone,) = parameter_groups(model, cfg)  # the recorded runs: one group, tau included
    assert (alone["name"], alone["lr"], alone["weight_decay"]) == ("all", 5e-5, 0.01)
    assert [id(p) for p in alone["params"]] == [id(p) for p in model.parameters()]
    net, var = parameter_groups(model, cfg, variational_lr=0.1)
    assert (net["name"], net["lr"], net["weight_decay"]) == ("network", 5e-5, 0.01)
    assert (var["name"], var["lr"], var["weight_decay"]) == ("variational", 0.1, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in var["params"]] == [f"bert.encoder.layer.{i}.attention.self.dirichlet.log_tau" for i in range(2)]
    assert {id(p) for p in net["params"]} == set(names) - {id(p) for p in var["params"]}  # every other parameter keeps the network's
    opt = torch.optim.AdamW(parameter_groups(model, cfg, variational_lr=0.1))
    assert [(g["name"], g["lr"]) for g in opt.param_groups] == [("network", 5e-5), ("variational", 0.1)]
    with pytest.raises(ValueError, match="no variational parameters"):
        parameter_groups(_tiny(), cfg, variational_lr=0.1)
    # without variational_lr the optimiser steps exactly as the recorded runs' AdamW(model.parameters(), lr, weight_decay)
    recorded = copy.deepcopy(model).eval()
    model.eval()
    ids = torch.randint(0, 100, (4, 7), generator=torch.Generator().manual_seed(0))
    for m, opt in ((recorded, torch.optim.AdamW(recorded.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)),
                   (model, torch.optim.AdamW(parameter_groups(model, cfg)))):
        for _ in range(3):
            opt.zero_grad()
            m(ids, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), recorded.parameters()))


def test_gradients_are_clipped_per_group():
    """A huge gradient in one group is clipped to norm 1 without shrinking the other group's gradient
    (one global clip would scale both by the same factor)."""
    from nvformer_studies.common.finetune import clip_per_group

    a, b = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    a.grad = torch.tensor([0.3, 0.0, 0.4], dtype=torch.float64)  # norm 0.5: untouched
    b.grad = torch.tensor([600.0, 800.0], dtype=torch.float64)  # norm 1000: scaled to 1
    opt = torch.optim.AdamW([{"params": [a]}, {"params": [b]}])
    assert clip_per_group(opt, 1.0) == pytest.approx([0.5, 1000.0])
    assert torch.equal(a.grad, torch.tensor([0.3, 0.0, 0.4], dtype=torch.float64))
    assert torch.allclose(b.grad, torch.tensor([0.6, 0.8], dtype=torch.float64), rtol=1e-5)


def test_a_learnt_tau_moves_off_its_initial_value_only_at_its_own_learning_rate():
    """A tiny Dirichlet classifier fine-tuned on 32 books reviews with the study's ELBO: at the
    network's learning rate tau stays at 10 (as in the recorded run); with a learning rate of its
    own (0.1) it moves, while the network (at learning rate 0 here) stays exactly where it was."""
    from nvformer_studies.common.data import read_reviews
    from nvformer_studies.common.finetune import FinetuneConfig, finetune_classifier
    from nvformer_studies.uncertainty.harness import kl_loss

    r = read_reviews("books")
    idx = list(range(0, 2000, 62))[:32]  # both labels (the file is grouped by label)
    texts, labels = [r.texts[i] for i in idx], [r.labels[i] for i in idx]

    def run(lr, variational_lr):
        model, tok = _tiny_dirichlet()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        finetune_classifier(model, tok, texts, labels, texts[:8], labels[:8], FinetuneConfig(epochs=2, lr=lr, batch_size=8, max_length=32),
                            show_progress=False, extra_loss=kl_loss(len(texts)), variational_lr=variational_lr)
        taus = [float(layer.attention.self.dirichlet.tau.detach()) for layer in model.bert.encoder.layer]
        moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        return taus, moved

    taus, moved = run(1e-3, None)
    assert all(abs(t - 10.0) < 0.1 for t in taus) and len(moved) > 10  # the network trains, tau hardly moves
    taus, moved = run(0.0, 0.1)
    assert all(abs(t - 10.0) > 0.5 for t in taus), taus
    assert sorted(moved) == [f"bert.encoder.layer.{i}.attention.self.dirichlet.log_tau" for i in range(2)]


# ------------------------------------------------------------------------------------------ far-OOD data


def test_far_ood_sets_are_seeded_sized_distinct_and_disjoint():
    from nvformer_studies.common.subsets import seeded_subset
    from nvformer_studies.uncertainty.data import FAR_OOD, far_ood_pool, far_ood_sets

    sets = far_ood_sets(150, 0)
    assert list(sets) == list(FAR_OOD) and all(len(v) == 150 and len(set(v)) == 150 for v in sets.values())
    union = [t for v in sets.values() for t in v]
    assert len(set(union)) == len(union)  # no text in two sets
    assert far_ood_sets(150, 0) == sets and far_ood_sets(150, 1)["law"] != sets["law"]  # seeded
    assert all(t.strip() == t and t for t in union)
    assert not any("Ã" in t for t in sets["it"])  # the reader repaired the mojibake
    assert not any(t.startswith("=") for t in sets["wikitext"])  # paragraphs, no headings
    # a set is the seeded draw from its pool, minus what earlier sets took (the others keep their places in the permutation)
    for name in ("koran", "it"):
        pool, earlier = far_ood_pool(name), set(union[: 150 * FAR_OOD.index(name)])
        assert len(pool) == len(set(pool))
        idx = seeded_subset(len(pool), 150, 0, exclude=[i for i, t in enumerate(pool) if t in earlier], sort=False)
        assert sets[name] == [pool[i] for i in idx]
    assert far_ood_sets(150, 0, names=("it",))["it"] == [far_ood_pool("it")[i] for i in seeded_subset(len(far_ood_pool("it")), 150, 0, sort=False)]
    with pytest.raises(ValueError, match="fewer than"):
        far_ood_sets(10**6, 0, names=("it",))
    with pytest.raises(ValueError, match="unknown source"):
        far_ood_pool("books")


# ------------------------------------------------------------------------------------------ scores, detection, choice


def test_uncertainty_scores_and_detection():
    from nvformer import metrics
    from nvformer_studies.uncertainty.study import detection, uncertainty_scores

    g = torch.Generator().manual_seed(0)
    logits = {d: torch.randn(3, 20, 2, generator=g, dtype=torch.float64) * (2 if d == "books" else 1) for d in ("books", "dvd", "wikitext")}
    one = uncertainty_scores(logits["books"][:1].softmax(-1), logits["books"][:1])
    assert set(one) == {"maxp", "entropy", "energy"}  # one sample: no mutual information
    torch.testing.assert_close(one["energy"], -torch.logsumexp(logits["books"][0], -1))
    scores = {d: uncertainty_scores(x.softmax(-1)) for d, x in logits.items()}
    assert set(scores["books"]) == {"maxp", "entropy", "mi"}
    torch.testing.assert_close(scores["dvd"]["maxp"], 1 - logits["dvd"].softmax(-1).mean(0).max(-1).values)
    det = detection(scores)
    assert set(det) == {"maxp", "entropy", "mi"} and all(set(v) == {"dvd", "wikitext"} for v in det.values())
    assert det["mi"]["wikitext"] == metrics.ood_detection(metrics.mutual_information(logits["books"].softmax(-1)),
                                                          metrics.mutual_information(logits["wikitext"].softmax(-1)))
    # two classes: 1 - max p and entropy rank alike
    assert all(det["maxp"][d] == pytest.approx(det["entropy"][d]) for d in ("dvd", "wikitext"))


def test_the_sweep_chooses_on_validation_among_learnt_points_and_the_study_reads_it(tmp_path, monkeypatch):
    """Parts of the grid are cached without a choice; the whole grid writes sweep.json with the
    smallest validation NLL of the sampled predictive among the points with tau's own learning rate
    (the reference at the network's learning rate is reported, not chosen); read_choice checks the settings."""
    import json

    from nvformer_studies.uncertainty import study, sweep

    nll = {(None, 10.0): 0.40, (1e-3, 10.0): 0.46, (1e-2, 10.0): 0.44, (1e-1, 10.0): 0.50, (1e-3, 3.0): 0.45, (1e-2, 3.0): 0.43,
           (1e-1, 3.0): 0.48}
    ran = []

    def point(out, st, val, lr, pt, quiet):
        ran.append((lr, pt))
        return {"variational_lr": lr, "prior_tau": pt, "name": study.dirichlet_name(lr, pt), "nll_sample": nll[(lr, pt)], "tau": [10.0]}

    monkeypatch.setattr(sweep, "_point", point)
    monkeypatch.setattr(sweep, "validation_data", lambda *a: None)
    assert sweep.run_tau_sweep(tmp_path, prior_taus=[3.0]) is None and not (tmp_path / "sweep.json").exists()
    assert ran == [(lr, 3.0) for lr in sweep.VARIATIONAL_LRS]  # the reference (None, 10) belongs to prior_tau 10
    assert sweep.run_tau_sweep(tmp_path, variational_lrs=[None]) is None and ran[-1] == (None, 10.0)
    with pytest.raises(FileNotFoundError, match="--sweep first"):
        study.read_choice(tmp_path, study.settings(False))
    got = sweep.run_tau_sweep(tmp_path)
    assert got["choice"] == {"variational_lr": 1e-2, "prior_tau": 3.0} and len(got["points"]) == 7  # not the reference's 0.40
    assert json.loads((tmp_path / "sweep.json").read_text()) == got
    choice = study.read_choice(tmp_path, study.settings(False))
    assert {k: v for k, v in choice.items() if k != "sweep"} == got["choice"]
    assert study.dirichlet_name(**got["choice"]) == "dirichlet-vlr0.01-prior3"
    assert study.dirichlet_name(**study.FIXED) == "dirichlet" and study.dirichlet_name(**study.BROAD_FIT) == "dirichlet-prior1"
    with pytest.raises(ValueError, match="other settings"):
        study.read_choice(tmp_path, study.settings(True))
    with pytest.raises(ValueError, match="not in the grid"):
        sweep.run_tau_sweep(tmp_path, variational_lrs=[0.5])


def test_sweep_mechanism_is_read_off_the_sweep_points():
    """The sentence on why tau moves or not carries the sweep's own numbers: the largest move of tau at
    prior_tau = its initial value, and the first-epoch losses and accuracies of the other prior."""
    from nvformer_studies.uncertainty.report import _sweep_mechanism

    def pt(lr, prior, tau, loss, acc):
        return {"variational_lr": lr, "prior_tau": prior, "tau": tau, "train_loss": [loss, 0.1], "accuracy_mean": acc}

    points = [pt(0.01, 10.0, [10.0, 10.003], 0.66, 0.84), pt(0.1, 10.0, [9.998, 10.0], 0.70, 0.78),
              pt(0.01, 3.0, [5.0, 7.0], 88.5, 0.5), pt(0.1, 3.0, [3.0, 3.0], 34.7, 0.525)]
    text = _sweep_mechanism(points, 10.0)
    assert "by at most 0.003, even at learning rate 0.1" in text
    assert "With prior_tau 3 the KL is large" in text and "34.7 to 88.5 against 0.66 to 0.7" in text
    assert "0.500 to 0.525 against 0.780 to 0.840" in text
    assert _sweep_mechanism(points[2:], 10.0) == ""


def test_learnt_rows_are_called_run_to_run_variation_when_tau_did_not_move():
    """If the chosen model's tau stayed at its initial value (prior_tau equal to it), the reading says its
    rows differ by the optimisation, not by a learnt posterior; a tau that moved, or another prior, gets no such sentence."""
    from nvformer_studies.uncertainty.report import _optimiser_effect

    post = {"variational_lr": 0.01, "prior_tau": 10.0}
    still = {"tau_init": 10.0, "tau": {"dirichlet-vlr0.01-prior10-s0": [10.0, 10.004], "dirichlet-vlr0.01-prior10-s1": [9.999, 10.0],
                                       "dirichlet-s0": [12.0, 12.0]}}
    text = _optimiser_effect(still, post)
    assert "within 0.004 of its initial 10" in text and "not the effect of a learnt posterior" in text
    moved = {"tau_init": 10.0, "tau": {"dirichlet-vlr0.01-prior10-s0": [10.0, 10.5]}}
    assert _optimiser_effect(moved, post) == ""
    assert _optimiser_effect({"tau_init": 10.0, "tau": {"dirichlet-vlr0.01-prior3-s0": [10.0, 10.0]}}, post | {"prior_tau": 3.0}) == ""


def test_an_interrupted_seed_run_resumes_with_the_same_logits(tmp_path, monkeypatch):
    """Every (row, split) is kept as soon as it is computed: a run stopped halfway resumes without recomputing
    what it kept, and ends with the logits of an uninterrupted run; the partial file is then removed."""
    from types import SimpleNamespace

    from nvformer_studies.uncertainty import study

    calls = []

    def fake_logits(method, models, data, samples, seed):
        calls.append((method, data.name))
        if len(calls) == stop_at[0]:
            raise KeyboardInterrupt
        g = torch.Generator().manual_seed(hash((method, data.name, tuple(models))) % 2**31)
        return torch.randn(samples, 4, 2, generator=g, dtype=torch.float64)

    info = {"train_loss": [0.5], "val_accuracy": [0.8], "best_epoch": 0}
    monkeypatch.setattr(study, "predictive_logits", fake_logits)
    monkeypatch.setattr(study, "fit", lambda out, st, seed, dirichlet=None, quiet=False: (f"model-{seed}-{dirichlet}", None, info))
    monkeypatch.setattr(study, "sampled_nv", lambda model, batches, s: f"nv-{s}")
    val = SimpleNamespace(name="validation", labels=torch.tensor([0, 1, 1, 0]))
    data = ({"books": SimpleNamespace(name="books"), "dvd": SimpleNamespace(name="dvd")}, val, None)
    st = study.settings(True, {"variational_lr": 0.01, "prior_tau": 10.0})

    stop_at = [0]
    reference = study.seed_run(0, st, tmp_path / "a", data)
    total = len(calls)
    calls.clear()
    stop_at[0] = total // 2
    with pytest.raises(KeyboardInterrupt):
        study.seed_run(0, st, tmp_path / "b", data)
    assert (tmp_path / "b" / "partial-s0.safetensors").exists()
    kept = len(calls) - 1
    calls.clear()
    stop_at[0] = 0
    resumed = study.seed_run(0, st, tmp_path / "b", data)
    assert len(calls) == total - kept
    assert not (tmp_path / "b" / "partial-s0.safetensors").exists()
    assert reference["nv_choice"] == resumed["nv_choice"] and list(reference["logits"]) == list(resumed["logits"])
    for row, splits in reference["logits"].items():
        assert all(torch.equal(splits[d], resumed["logits"][row][d]) for d in splits)

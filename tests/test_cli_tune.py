"""`nvformer tune` end to end on a tiny classifier saved with the MiniLM tokenizer."""

import json

import torch
import transformers as tf

from nvformer.cli import main
from nvformer.hf.checkpoints import load_minilm
from nvformer.sentiment import domain_splits


def test_domain_splits_are_seeded_and_disjoint():
    a, b = domain_splits("airline", 0), domain_splits("airline", 0)
    assert a == b and [len(a[k][0]) for k in ("train", "validation", "test")] == [1400, 200, 400]
    assert not set(a["validation"][0]) & set(a["test"][0])


def test_cli_tune_runs_and_writes_its_outputs(tmp_path, capsys):
    _, tok = load_minilm()
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=2)
    tf.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    code = main(["tune", "--model", str(tmp_path / "m"), "--target", "kitchen", "--trials", "3", "--max-length", "32",
                 "--sites", "encoder", "--out", str(tmp_path / "out")])
    assert code == 0
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{"):])
    best = json.loads((tmp_path / "out" / "best.json").read_text())
    assert best["n_trials"] == 3 and set(best["best_params"]) == {"encoder/alpha_tau", "encoder/stdev_tau"}
    assert 0.0 <= best["best_value"] <= 1.0 and best["best_value"] >= best["identity_value"]
    assert set(best["best_report"]) == {"accuracy", "macro_f1", "nll", "ece"}
    assert printed["target"] == "kitchen" and printed["best_val_accuracy"] == best["best_value"]
    assert printed["test_metrics_of_best"] == best["best_report"]

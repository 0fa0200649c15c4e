"""`nvformer tune --method fit`: knobs fitted by gradient from the command line, labelled and
label-free, for a classifier, a causal LM and an encoder-decoder; the adapter and the report agree
with the library; bad fit options are one-line errors before any model is loaded."""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import nvformer as nv
from nvformer.files import read_columns
from nvformer.tasks import TASKS


@pytest.mark.parametrize("objective", ["nll", "information_maximisation"])
def test_classifier_fit(cli, root, bert_dir, bert_prior, reviews, objective):
    out = root / f"bert-fit-{objective}"
    code, stdout, err = cli("tune", "--method", "fit", "--objective", objective, "--model", bert_dir, "--adapter", bert_prior,
                            "--task", "classification", "--validation", reviews["dev"], "--batch-size", 8, "--steps", 12, "--lr", 0.2,
                            "--out", out)
    assert code == 0, err
    assert f"nvformer tune --method fit: {objective}" in stdout
    fit = json.loads((out / "fit.json").read_text())
    report = json.loads((out / "fit_report.json").read_text())
    assert report["batches"] == {"fit": 4, "held_out": 2}  # 48 rows in 6 batches, a quarter held out
    assert report["label_free"] == (objective != "nll")
    assert fit["best_value"] <= fit["initial_value"]  # the held-out objective never gets worse than the starting knobs
    assert (out / "fit_history.png").exists() and (out / "fitted_knobs.png").exists()
    # the adapter holds the fitted knobs, and the reported accuracy is the library's on the same rows
    model = nv.load_adapter(AutoModelForSequenceClassification.from_pretrained(bert_dir), out)
    assert {k: v.as_dict() for k, v in nv.get_knobs(model).items()} == fit["knobs"]
    tok = AutoTokenizer.from_pretrained(bert_dir)
    cols = read_columns(reviews["dev"], ["text", "label"])
    labels = [model.config.label2id[x] for x in cols["label"]]
    task = TASKS["classification"]
    data = task.prepare(tok, cols["text"], labels, batch_size=8, max_length=128)
    assert task.metrics["accuracy"](task.stats(model, data)) == pytest.approx(report["after"]["accuracy"], rel=1e-12)


def test_causal_lm_fit_on_unlabelled_text(cli, root, llama_dir, llama_prior, lm_files):
    out = root / "llama-fit"
    code, stdout, err = cli("tune", "--method", "fit", "--model", llama_dir, "--adapter", llama_prior, "--task", "causal-lm",
                            "--validation", lm_files["dev"], "--batch-size", 4, "--steps", 6, "--groups", "site", "--out", out)
    assert code == 0, err
    report = json.loads((out / "fit_report.json").read_text())
    assert report["label_free"] and report["objective"] == "nll"
    fit = json.loads((out / "fit.json").read_text())
    nats = list(fit["nats"].values())
    assert len(nats) == 2 and nats[0] == pytest.approx(nats[1], rel=1e-9)  # one setting for the decoder site
    if fit["best_step"] > 0:
        assert report["after"]["perplexity"] <= report["before"]["perplexity"] * 1.5


def test_seq2seq_fit(cli, root, marian_dir, mt_files):
    prior = root / "marian-prior-fit"
    assert cli("prior", "--model", marian_dir, "--data", mt_files["source"], "--target-column", "target", "--out", prior)[0] == 0
    out = root / "marian-fit"
    code, stdout, err = cli("tune", "--method", "fit", "--model", marian_dir, "--adapter", prior, "--task", "seq2seq",
                            "--validation", mt_files["dev"], "--batch-size", 4, "--steps", 4, "--fit-knobs", "alpha_tau", "--out", out)
    assert code == 0, err
    fit = json.loads((out / "fit.json").read_text())
    assert set(fit["knobs"]) >= {"encoder.0", "decoder.1", "cross"}
    assert all(k["stdev_tau"] == 0.0 for k in fit["knobs"].values())  # not fitted: left at the identity's 0


@pytest.mark.parametrize("extra,task,message", [
    (["--objective", "entropy"], "seq2seq", "label-free objectives need predictions without targets"),
    (["--holdout", "1.5"], "classification", "--holdout must lie in (0, 1)"),
    (["--lr", "0"], "classification", "--lr must be > 0"),
    (["--to-identity", "-1"], "classification", "--to-identity must be >= 0"),
    (["--fit-knobs", "alpha_tau,beta"], "classification", "knobs are alpha_tau, stdev_tau, mu_tau"),
    (["--objective", "kl"], "classification", "invalid choice: 'kl'"),
])
def test_bad_fit_options_are_one_line_errors_before_loading(cli, no_loading, bert_dir, bert_prior, marian_dir, reviews, mt_files, tmp_path,
                                                            extra, task, message):
    model, data = (marian_dir, mt_files["dev"]) if task == "seq2seq" else (bert_dir, reviews["dev"])
    code, stdout, err = cli("tune", "--method", "fit", "--model", model, "--adapter", bert_prior, "--task", task, "--validation", data,
                            "--out", tmp_path / "o", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert no_loading == []


def test_too_few_rows_to_hold_any_out(cli, bert_dir, bert_prior, reviews, tmp_path):
    code, stdout, err = cli("tune", "--method", "fit", "--model", bert_dir, "--adapter", bert_prior, "--task", "classification",
                            "--validation", reviews["dev"], "--batch-size", 64, "--out", tmp_path / "o")
    assert code == 2 and "fitting holds out a share of the batches" in err and len(err.strip().splitlines()) == 1

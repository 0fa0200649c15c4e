"""The causal-LM and sequence-to-sequence paths of the CLI: prior -> tune -> evaluate on tiny models,
and the numbers agree with each other and with the library."""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

import nvformer as nv
from nvformer.files import read_columns
from nvformer.tasks import TASKS


def test_causal_lm_prior_tune_evaluate(cli, root, llama_dir, llama_prior, lm_files):
    meta = json.loads((llama_prior / "nvformer.json").read_text())
    assert meta["architecture"] == "LlamaModel" and {e["site"] for e in meta["modules"].values()} == {"decoder"}
    out = root / "llama-nv"
    code, stdout, err = cli("tune", "--model", llama_dir, "--adapter", llama_prior, "--task", "causal-lm", "--validation", lm_files["dev"],
                            "--trials", 3, "--per-layer", "--sampler", "random", "--seed", 1, "--out", out)
    assert code == 0, err
    assert "best perplexity" in stdout
    best = json.loads((out / "best.json").read_text())
    assert set(best["best_params"]) == {f"decoder.{i}/{k}" for i in (0, 1) for k in ("alpha_tau", "stdev_tau")}
    assert best["n_trials"] == 3 and best["best_value"] <= best["identity_value"]  # minimised
    assert best["best_report"]["perplexity"] == pytest.approx(best["best_value"], rel=1e-12)

    code, stdout, err = cli("evaluate", "--model", llama_dir, "--adapter", out, "--task", "causal-lm", "--data", lm_files["dev"],
                            "--bootstrap", 100, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    ppl, nll = report["metrics"]["perplexity"], report["metrics"]["nll"]
    assert set(report["metrics"]) == {"perplexity", "nll"} and report["n_examples"] == 24
    assert ppl["nv"] == pytest.approx(best["best_value"], rel=1e-9)  # the same data and knobs as the search's best trial
    assert ppl["nv"] == pytest.approx(math.exp(nll["nv"]), rel=1e-9) and ppl["original"] == pytest.approx(math.exp(nll["original"]), rel=1e-9)
    assert ppl["low"] <= ppl["diff"] <= ppl["high"]

    # the library on a freshly loaded model gives the same numbers
    model = nv.load_adapter(AutoModelForCausalLM.from_pretrained(llama_dir), out)
    tok = AutoTokenizer.from_pretrained(llama_dir)
    task = TASKS["causal-lm"]
    data = task.prepare(tok, read_columns(lm_files["dev"], ["text"])["text"], batch_size=32, max_length=128)
    assert task.metrics["perplexity"](task.stats(model, data)) == pytest.approx(ppl["nv"], rel=1e-12)
    knobs = nv.get_knobs(model)
    assert knobs["decoder.1"].alpha_tau == pytest.approx(best["best_params"]["decoder.1/alpha_tau"])

    # the study lives in out/study.db: asking for more trials resumes it
    assert (out / "study.db").exists()
    code, stdout, err = cli("tune", "--model", llama_dir, "--adapter", llama_prior, "--task", "causal-lm", "--validation", lm_files["dev"],
                            "--trials", 4, "--per-layer", "--sampler", "random", "--seed", 2, "--out", out)
    assert code == 0, err
    again = json.loads((out / "best.json").read_text())
    assert again["n_trials"] == 4 and again["best_value"] <= best["best_value"]


def test_tune_with_a_shared_storage_and_the_nll_objective(cli, root, llama_dir, llama_prior, lm_files):
    url = f"sqlite:///{root / 'shared-studies.db'}"
    out = root / "llama-nv-shared"
    code, stdout, err = cli("tune", "--model", llama_dir, "--adapter", llama_prior, "--task", "causal-lm", "--validation", lm_files["dev"],
                            "--metric", "nll", "--trials", 2, "--storage", url, "--study", "lm-nll", "--max-examples", 10, "--out", out)
    assert code == 0, err
    best = json.loads((out / "best.json").read_text())
    assert best["storage"] == url and best["study_name"] == "lm-nll" and not (out / "study.db").exists()
    assert best["best_value"] == pytest.approx(math.log(best["best_report"]["perplexity"]), rel=1e-9)


@pytest.mark.parametrize("metric", ["nll", "chrf"])
def test_seq2seq_prior_tune_evaluate(cli, root, marian_dir, mt_files, metric):
    prior = root / f"marian-prior-{metric}"
    code, stdout, err = cli("prior", "--model", marian_dir, "--data", mt_files["source"], "--target-column", "target", "--out", prior)
    assert code == 0, err
    sites = {e["site"] for e in json.loads((prior / "nvformer.json").read_text())["modules"].values()}
    assert sites == {"encoder", "decoder", "cross"}
    out = root / f"marian-nv-{metric}"
    code, stdout, err = cli("tune", "--model", marian_dir, "--adapter", prior, "--task", "seq2seq", "--validation", mt_files["dev"],
                            "--metric", metric, "--sites", "encoder,cross", "--trials", 2, "--out", out)
    assert code == 0, err
    best = json.loads((out / "best.json").read_text())
    assert set(best["best_params"]) == {f"{s}/{k}" for s in ("encoder", "cross") for k in ("alpha_tau", "stdev_tau")}

    code, stdout, err = cli("evaluate", "--model", marian_dir, "--adapter", out, "--task", "seq2seq", "--data", mt_files["dev"],
                            "--metric", "chrf", "--bootstrap", 100, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert list(report["metrics"]) == ["nll", "perplexity", "chrf"]
    assert report["metrics"][metric]["nv"] == pytest.approx(best["best_value"], rel=1e-9)
    assert report["knobs"]["decoder"] == {"alpha_tau": 1e4, "stdev_tau": 0.0, "mu_tau": 1.0}  # not tuned: still the identity
    chrf = report["metrics"]["chrf"]
    assert 0 <= chrf["original"] <= 100 and chrf["low"] <= chrf["diff"] <= chrf["high"]

    model = nv.load_adapter(AutoModelForSeq2SeqLM.from_pretrained(marian_dir), out)
    tok = AutoTokenizer.from_pretrained(marian_dir)
    cols = read_columns(mt_files["dev"], ["text", "target"])
    task = TASKS["seq2seq"]
    data = task.prepare(tok, cols["text"], targets=cols["target"], batch_size=32, max_length=128)
    assert task.metrics["nll"](task.stats(model, data, "nll")) == pytest.approx(report["metrics"]["nll"]["nv"], rel=1e-12)


def test_evaluate_without_adapter_prints_the_original_only(cli, bert_dir, reviews):
    code, stdout, err = cli("evaluate", "--model", bert_dir, "--task", "classification", "--data", reviews["test"], "--max-examples", 20)
    assert code == 0, err
    lines = stdout.splitlines()
    assert "20 examples" in lines[0] and lines[1].split() == ["metric", "original"]
    assert [ln.split()[0] for ln in lines[2:]] == ["accuracy", "nll", "macro_f1", "ece"]
    code, stdout, err = cli("evaluate", "--model", bert_dir, "--task", "classification", "--data", reviews["test"], "--max-examples", 20, "--json")
    report = json.loads(stdout)
    assert report["adapter"] is None and report["knobs"] is None and set(report["metrics"]["accuracy"]) == {"direction", "original"}


def test_tune_into_a_folder_of_another_search_space_is_refused(cli, root, llama_dir, llama_prior, lm_files):
    out = root / "llama-two-spaces"
    base = ("tune", "--model", llama_dir, "--adapter", llama_prior, "--task", "causal-lm", "--validation", lm_files["dev"], "--trials", 2,
            "--out", out)
    code, _, err = cli(*base)
    assert code == 0, err
    code, _, err = cli(*base, "--alpha-range", "-3", "3")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "`space`" in err and "--study NAME (or another --out)" in err
    code, _, err = cli(*base, "--alpha-range", "-3", "3", "--study", "narrow")  # a new study in the same storage
    assert code == 0, err

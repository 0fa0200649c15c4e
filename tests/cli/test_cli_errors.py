"""Bad input: exit code 2, one line on stderr, no traceback, and refused before any model is loaded.

Also ``--version``, every option's default in ``--help``, and that ``import nvformer`` stays light."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from nvformer.cli import build_parser

SITES_OF_BERT = "its sites are encoder"


def assert_refused(result, calls, *needles):
    code, out, err = result
    assert code == 2, (code, out, err)
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith("nvformer")
    for needle in needles:
        assert needle in err, (needle, err)
    assert calls == [], f"a model was loaded before the error: {calls}"


@pytest.fixture(scope="module")
def bad(tmp_path_factory, bert_prior) -> dict[str, Path]:
    """Broken inputs: files and folders that are not what the options expect."""
    d = tmp_path_factory.mktemp("bad")
    (d / "empty-folder").mkdir()
    (d / "a-file.txt").write_text("hello\n")
    (d / "sheet.xlsx").write_bytes(b"PK\x03\x04")
    (d / "neutral.csv").write_text("text,label\ngood film,positive\nso-so,neutral\n")
    (d / "five.csv").write_text("text,label\ngood film,1\nbad film,5\n")
    (d / "numbers.csv").write_text("text,label\n1,0\n2,1\n")
    (d / "empty.csv").write_text("text,label\n")
    meta = json.loads((bert_prior / "nvformer.json").read_text())

    def adapter(name: str, edit) -> None:
        folder = d / name
        shutil.copytree(bert_prior, folder)
        m = json.loads(json.dumps(meta))
        edit(m)
        (folder / "nvformer.json").write_text(json.dumps(m))

    adapter("negative-stdev", lambda m: m["config"]["knobs"]["*"].update(stdev_tau=-0.5))
    adapter("nan-alpha", lambda m: m["config"]["knobs"]["*"].update(alpha_tau=float("nan")))
    adapter("unknown-key", lambda m: m.update(extra=1))
    adapter("wider", lambda m: m["modules"]["encoder.layer.0.attention.self"].update(dim=64))
    adapter("nan-prior", lambda m: None)
    tensors = load_file(str(d / "nan-prior" / "nvformer.safetensors"))
    tensors["encoder.layer.1.attention.self.prior.mean"][3] = float("nan")
    save_file(tensors, str(d / "nan-prior" / "nvformer.safetensors"))
    tensors = load_file(str(d / "wider" / "nvformer.safetensors"))  # a consistent adapter of a model 64 wide
    for f in ("mean", "var"):
        key = f"encoder.layer.0.attention.self.prior.{f}"
        tensors[key] = tensors[key].repeat(2)
    save_file(tensors, str(d / "wider" / "nvformer.safetensors"))
    adapter("short-prior", lambda m: m["modules"]["encoder.layer.0.attention.self"].update(dim=64))
    return d


def tune_args(bert_dir, adapter, dev, out, *extra):
    return ("tune", "--model", bert_dir, "--adapter", adapter, "--task", "classification", "--validation", dev, "--out", out, *extra)


# --------------------------------------------------------------------------------------------- prior


def test_prior_input_errors(cli, no_loading, bert_dir, marian_dir, reviews, bad, tmp_path):
    out = tmp_path / "out"
    base = ["prior", "--model", bert_dir, "--data", reviews["source"], "--out", out]
    cases = [
        (["prior", "--model", tmp_path / "nope", "--data", reviews["source"], "--out", out], ["no such folder"]),
        (["prior", "--model", bad / "a-file.txt", "--data", reviews["source"], "--out", out], ["not a folder"]),
        (["prior", "--model", bad / "empty-folder", "--data", reviews["source"], "--out", out], ["no config.json"]),
        (["prior", "--model", bert_dir, "--data", tmp_path / "missing.csv", "--out", out], ["--data", "no such file"]),
        (["prior", "--model", bert_dir, "--data", bad / "sheet.xlsx", "--out", out], ["unknown data file kind '.xlsx'"]),
        (["prior", "--model", bert_dir, "--data", bad / "empty-folder", "--out", out], ["not a file"]),
        (["prior", "--model", bert_dir, "--data", bad / "empty.csv", "--out", out], ["no rows"]),
        ([*base, "--text-column", "review"], ["no column 'review' (--text-column)", "its columns are 'text'"]),
        ([*base, "--sites", "encoder,middle"], ["--sites", "unknown site(s) 'middle'", "encoder, decoder, cross"]),
        ([*base, "--sites", "cross"], ["no 'cross' attention", SITES_OF_BERT]),
        ([*base, "--max-examples", "0"], ["--max-examples", "positive integer, got 0"]),
        ([*base, "--batch-size", "-3"], ["--batch-size", "positive integer"]),
        ([*base, "--max-length", "many"], ["--max-length", "positive integer, got 'many'"]),
        ([*base, "--max-length", "300"], ["--max-length 300", "has 256"]),
        (["prior", "--model", bert_dir, "--data", bad / "a-file.txt", "--out", bad / "a-file.txt"], ["--out", "not a folder"]),
        (["prior", "--model", marian_dir, "--data", reviews["source"], "--out", out], ["--target-column is required", "encoder-decoder"]),
        (["prior", "--model", marian_dir, "--data", reviews["source"], "--out", out, "--target-column", "de"],
         ["no column 'de' (--target-column)"]),
        (["prior", "--model", bert_dir, "--out", out], ["required: --data"]),
        (["prior", "--model", bert_dir, "--data", reviews["source"], "--out", out, "--frobnicate"], ["unrecognized arguments: --frobnicate"]),
    ]
    for argv, needles in cases:
        assert_refused(cli(*argv), no_loading, *needles)
    assert not out.exists()


def test_numbers_are_not_text(cli, no_loading, bert_dir, bad, tmp_path):
    result = cli("prior", "--model", bert_dir, "--data", bad / "numbers.csv", "--out", tmp_path / "o")
    assert_refused(result, no_loading, "column 'text' must hold text", "data row 1 has int")


# --------------------------------------------------------------------------------------------- tune


def test_tune_input_errors(cli, no_loading, bert_dir, llama_dir, marian_dir, bert_prior, llama_prior, reviews, bad, tmp_path):
    out = tmp_path / "tuned"
    ok = tune_args(bert_dir, bert_prior, reviews["dev"], out)
    cases = [
        ([*ok, "--task", "regression"], ["--task", "invalid choice: 'regression'"]),
        ([*ok, "--alpha-range", "5", "-5"], ["--alpha-range is reversed", "LO 5 > HI -5"]),
        ([*ok, "--alpha-range", "nan", "1"], ["--alpha-range", "finite number, got 'nan'"]),
        ([*ok, "--stdev-range", "0.5", "0.1"], ["--stdev-range is reversed"]),
        ([*ok, "--stdev-range", "-0.1", "0.5"], ["--stdev-range must be >= 0"]),
        ([*ok, "--mu-range", "1", "inf"], ["--mu-range", "finite"]),
        ([*ok, "--log-alpha"], ["--log-alpha needs a positive --alpha-range", "-15 10"]),
        ([*ok, "--trials", "0"], ["--trials", "positive integer, got 0"]),
        ([*ok, "--metric", "bleu"], ["--metric bleu", "accuracy, nll, macro_f1, ece"]),
        ([*ok, "--storage", "study.db"], ["--storage", "not an Optuna RDB URL"]),
        ([*ok, "--sites", "decoder"], ["no 'decoder' attention", SITES_OF_BERT]),
        ([*ok, "--label-column", "stars"], ["no column 'stars' (--label-column)", "'text', 'label'"]),
        (tune_args(bert_dir, tmp_path / "no-adapter", reviews["dev"], out), ["--adapter", "no such folder"]),
        (tune_args(bert_dir, bad / "empty-folder", reviews["dev"], out), ["--adapter", "no nvformer.json"]),
        (tune_args(bert_dir, bad / "negative-stdev", reviews["dev"], out), ["--adapter", "stdev_tau"]),
        (tune_args(bert_dir, bad / "nan-alpha", reviews["dev"], out), ["--adapter", "alpha_tau"]),
        (tune_args(bert_dir, bad / "unknown-key", reviews["dev"], out), ["--adapter", "unknown key(s) ['extra']"]),
        (tune_args(bert_dir, bad / "wider", reviews["dev"], out), ["--adapter", "width 32, the adapter's has width 64"]),
        (tune_args(bert_dir, bad / "short-prior", reviews["dev"], out), ["--adapter", "must be a scalar or have shape [64], got (32,)"]),
        (tune_args(bert_dir, bad / "nan-prior", reviews["dev"], out), ["--adapter", "prior `mean` of module 'encoder.layer.1.attention.self'",
                                                                       "not finite"]),
        (tune_args(bert_dir, llama_prior, reviews["dev"], out), ["made for another model", "LlamaModel", "BertForSequenceClassification", "layers.0.self_attn"]),
        (tune_args(bert_dir, bert_prior, reviews["dev"], bert_prior), ["--out", "is the input adapter"]),
        (tune_args(bert_dir, bert_prior, bad / "neutral.csv", out), ["label 'neutral'", "data row 2", "0='negative', 1='positive'"]),
        (tune_args(bert_dir, bert_prior, bad / "five.csv", out), ["label 5", "not one of the model's classes"]),
        ([*tune_args(bert_dir, bert_prior, reviews["dev"], out), "--task", "seq2seq"], ["--task seq2seq", "not an encoder-decoder"]),
        ([*tune_args(bert_dir, bert_prior, reviews["dev"], out), "--task", "causal-lm"], ["not a causal language model", "encoder"]),
        (("tune", "--model", llama_dir, "--adapter", llama_prior, "--task", "causal-lm", "--validation", reviews["dev"], "--out", out,
          "--max-length", "256"), ["--max-length 256 needs 257 positions"]),
    ]
    for argv, needles in cases:
        assert_refused(cli(*argv), no_loading, *needles)
    assert not out.exists()


@pytest.fixture(scope="module")
def marian_encoder_prior(root, marian_dir, mt_files) -> Path:
    out = root / "marian-encoder-prior"
    from nvformer.cli import main

    assert main(["prior", "--model", str(marian_dir), "--data", str(mt_files["source"]), "--target-column", "target", "--sites", "encoder",
                 "--out", str(out)]) == 0
    return out


def test_tune_a_site_the_adapter_did_not_convert(cli, no_loading, marian_dir, marian_encoder_prior, mt_files, tmp_path):
    result = cli("tune", "--model", marian_dir, "--adapter", marian_encoder_prior, "--task", "seq2seq", "--validation", mt_files["dev"],
                 "--sites", "encoder,cross", "--out", tmp_path / "o")
    assert_refused(result, no_loading, "--sites", "no NV module at 'cross'", "its sites: encoder")
    result = cli("tune", "--model", marian_dir, "--adapter", marian_encoder_prior, "--task", "seq2seq", "--validation", mt_files["dev"],
                 "--target-column", "reference", "--out", tmp_path / "o")
    assert_refused(result, no_loading, "no column 'reference' (--target-column)", "'text', 'target'")


# --------------------------------------------------------------------------------------------- evaluate


def test_evaluate_input_errors(cli, no_loading, bert_dir, llama_prior, reviews, tmp_path):
    ok = ("evaluate", "--model", bert_dir, "--task", "classification", "--data", reviews["test"])
    cases = [
        ([*ok, "--bootstrap", "0"], ["--bootstrap", "positive integer"]),
        ([*ok, "--confidence", "1.5"], ["--confidence must be between 0 and 1"]),
        ([*ok, "--metric", "accuracy,bleu"], ["--metric bleu"]),
        ([*ok, "--text-column", "body"], ["no column 'body' (--text-column)", "its columns are 'text', 'label'"]),
        ([*ok, "--adapter", llama_prior], ["made for another model"]),
        ([*ok, "--adapter", tmp_path], ["no nvformer.json"]),
        (("evaluate", "--model", bert_dir, "--task", "classification"), ["required: --data"]),
    ]
    for argv, needles in cases:
        assert_refused(cli(*argv), no_loading, *needles)


# --------------------------------------------------------------------------------------------- failures found late


def test_a_folder_that_does_not_load_is_one_line(cli, bert_dir, reviews, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(bert_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors at all")
    code, out, err = cli("evaluate", "--model", broken, "--task", "classification", "--data", reviews["test"])
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert "cannot load it as AutoModelForSequenceClassification" in err

    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(bert_dir / f, no_tok / f)
    code, out, err = cli("evaluate", "--model", no_tok, "--task", "classification", "--data", reviews["test"])
    assert code == 2 and "no tokenizer files" in err and err.count("\n") == 1

    bad_config = tmp_path / "bad-config"
    shutil.copytree(bert_dir, bad_config)
    (bad_config / "config.json").write_text('{"hidden_size": 32}')
    code, out, err = cli("evaluate", "--model", bad_config, "--task", "classification", "--data", reviews["test"])
    assert code == 2 and "cannot read config.json" in err and err.count("\n") == 1


def test_errors_reach_the_terminal_as_one_line_through_a_real_process(bert_dir, bert_prior, reviews, tmp_path):
    argv = [sys.executable, "-m", "nvformer.cli", *map(str, tune_args(bert_dir, bert_prior, reviews["dev"], tmp_path / "o")), "--alpha-range", "5", "-5"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "nvformer tune: error: --alpha-range is reversed: LO 5 > HI -5\n"

    broken = tmp_path / "broken-model"
    shutil.copytree(bert_dir, broken)
    (broken / "model.safetensors").write_bytes(b"garbage")
    script = Path(sys.executable).with_name("nvformer")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "nvformer.cli"]
    proc = subprocess.run([*cmd, "evaluate", "--model", str(broken), "--task", "classification", "--data", str(reviews["test"])],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("nvformer evaluate: error: --model")


# --------------------------------------------------------------------------------------------- version, help, imports


def test_version(cli):
    code, out, err = cli("--version")
    assert code == 0 and out == "nvformer 0.2.0\n" and err == ""


def help_entries(text: str) -> dict[str, str]:
    """``{option: its help}`` from ``--help`` output (an entry is an option line and the lines indented below it)."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"^  (?:-\w, )?(--[\w-]+)", line)
        if m:
            current = m.group(1)
            entries[current] = line
        elif current and line.startswith("      "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


@pytest.mark.parametrize("command", ["prior", "tune", "evaluate"])
def test_help_shows_every_default(cli, command):
    code, out, err = cli(command, "--help")
    assert code == 0 and err == ""
    entries = help_entries(out)
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    options = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    assert {a.option_strings[-1] for a in options} == set(entries) - {"--help"}
    for action in options:
        entry = entries[action.option_strings[-1]]
        if action.required:
            assert entry.endswith("(required)"), entry
            continue
        assert "(default: " in entry, entry
        d = action.default
        if isinstance(d, bool):
            assert entry.endswith("(default: off)"), entry
        elif isinstance(d, (int, str)):
            assert f"(default: {d})" in entry, entry
        elif isinstance(d, float):
            assert f"(default: {d:g})" in entry, entry
        elif isinstance(d, tuple):
            assert f"(default: {' '.join(f'{x:g}' for x in d)})" in entry, entry


def test_import_nvformer_and_the_cli_stay_light():
    code = ("import sys, nvformer, nvformer.cli, nvformer.files; "
            "heavy = [m for m in ('transformers', 'datasets', 'optuna', 'matplotlib', 'accelerate') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

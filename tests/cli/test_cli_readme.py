"""The README's "Your own model and data" section, run as written: its three commands on a tiny BERT
sentiment classifier and real review files, then its Python lines; what the CLI reported must be
what the library computes."""

from __future__ import annotations

import csv
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import nvformer as nv
from nvformer.tasks import TASKS, classification_batches

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Your own model and data"
ROW = re.compile(r"^(\w+) \((?:higher|lower) is better\)\s+(\S+)\s+(\S+)\s+(\S+)\s+\[(\S+), (\S+)\]$")


def readme_blocks() -> dict[str, list[list[str]]]:
    """The fenced blocks of the section, by language, in order (each block as its lines)."""
    text = README.read_text()
    assert text.count(SECTION) == 1
    body = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks: dict[str, list[list[str]]] = {}
    for lang, code in re.findall(r"```(\w+)\n(.*?)```", body, re.S):
        blocks.setdefault(lang, []).append(code.strip("\n").splitlines())
    return blocks


def readme_commands(paths: dict[str, Path], block: int = 0) -> list[list[str]]:
    """The commands of the section's bash block number ``block`` as argv lists (after the program),
    placeholders replaced by ``paths``."""
    commands = []
    for line in readme_blocks()["bash"][block]:
        words = shlex.split(line, comments=True)
        if not words:
            continue
        assert words[0].endswith("nvformer"), line
        unknown = [w for w in words[1:] if not w.startswith("-") and ("my-" in w or w.endswith((".csv", ".txt"))) and w not in paths]
        assert not unknown, f"placeholder(s) the test does not provide: {unknown}"
        commands.append([str(paths.get(w, w)) for w in words[1:]])
    return commands


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def table(out: str) -> dict[str, tuple[float, ...]]:
    rows = {}
    for line in out.splitlines():
        m = ROW.match(line.strip())
        if m:
            rows[m.group(1)] = tuple(float(x) for x in m.groups()[1:])
    return rows


def test_readme_commands_then_python(cli, root, bert_dir, reviews):
    paths = {"my-model": bert_dir, "source.csv": reviews["source"], "target-dev.csv": reviews["dev"], "target-test.csv": reviews["test"],
             "my-prior": root / "readme-prior", "my-nv": root / "readme-nv"}
    commands = readme_commands(paths)
    assert [c[0] for c in commands] == ["prior", "tune", "evaluate"]
    outputs = []
    for argv in commands:
        code, out, err = cli(*argv)
        assert code == 0, err
        assert "Traceback" not in err
        outputs.append(out)

    # the files the README promises
    prior, tuned = paths["my-prior"], paths["my-nv"]
    assert {p.name for p in prior.iterdir()} == {"nvformer.json", "nvformer.safetensors"}
    assert {"nvformer.json", "nvformer.safetensors", "trials.csv", "best.json", "history.png", "knobs.png"} <= {p.name for p in tuned.iterdir()}
    assert json.loads((prior / "nvformer.json").read_text())["architecture"] == "BertModel"  # estimated on AutoModel
    best = json.loads((tuned / "best.json").read_text())
    assert best["n_trials"] == 50 and (tuned / "trials.csv").read_text().count("\n") == 51

    # what evaluate printed, and the same numbers exactly with --json
    shown = table(outputs[2])
    assert list(shown) == ["accuracy", "nll", "macro_f1", "ece"]
    code, out, err = cli(*commands[2], "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["n_examples"] == 48 and report["bootstrap"]["n_resamples"] == 1000
    for name, (original, nvalue, diff, low, high) in shown.items():
        m = report["metrics"][name]
        for printed, exact in ((original, m["original"]), (nvalue, m["nv"]), (diff, m["diff"]), (low, m["low"]), (high, m["high"])):
            assert printed == pytest.approx(exact, rel=1e-5, abs=1e-9)
        assert m["low"] <= m["diff"] <= m["high"]

    # the README's Python lines: the tuned adapter on a freshly loaded classifier
    python = "\n".join(readme_blocks()["python"][0]).replace('"my-model"', repr(str(bert_dir))).replace('"my-nv"', repr(str(tuned)))
    scope: dict = {}
    exec(python, scope)
    model = scope["model"].eval()
    tok = AutoTokenizer.from_pretrained(bert_dir)
    rows = read_csv(reviews["test"])
    labels = [model.config.label2id[r["label"]] for r in rows]
    data = TASKS["classification"].prepare(tok, [r["text"] for r in rows], labels, batch_size=32, max_length=128)
    task = TASKS["classification"]
    stats = task.stats(model, data)
    for name in shown:
        assert task.metrics[name](stats) == report["metrics"][name]["nv"]
    original = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    stats0 = task.stats(original, data)
    for name in shown:
        assert task.metrics[name](stats0) == report["metrics"][name]["original"]

    # the same knobs on a model converted here, with a prior estimated here from the same source text
    fresh = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    source = [r["text"] for r in read_csv(reviews["source"])]
    priors = nv.estimate_prior(fresh, classification_batches(tok, source, batch_size=32, max_length=128).batches, show_progress=False)
    nv.convert(fresh, prior=priors)
    knobs = best["best_params"]
    nv.set_knobs(fresh, alpha_tau=knobs["all/alpha_tau"], stdev_tau=knobs["all/stdev_tau"])
    assert knobs["all/alpha_tau"] < 10 and best["best_value"] > best["identity_value"]  # the search moved away from the identity
    with torch.no_grad():
        for batch in data.batches:
            torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)
        # and at another setting far from the identity, where the prior weighs most
        for m in (fresh, model):
            nv.set_knobs(m, alpha_tau=-5.0, stdev_tau=0.3)
        for batch in data.batches:
            torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, atol=1e-6, rtol=0)


def test_prior_adapter_from_the_base_model_is_the_identity_on_the_classifier(bert_dir, bert_prior, reviews):
    """An adapter estimated on AutoModel (BertModel) loads onto AutoModelForSequenceClassification of the
    same folder (module names relative to the base model), and at its identity knobs changes nothing."""
    tok = AutoTokenizer.from_pretrained(bert_dir)
    rows = read_csv(reviews["dev"])
    batch = dict(tok([r["text"] for r in rows[:16]], padding=True, truncation=True, max_length=128, return_tensors="pt"))
    original = AutoModelForSequenceClassification.from_pretrained(bert_dir).eval()
    model = nv.load_adapter(AutoModelForSequenceClassification.from_pretrained(bert_dir).eval(), bert_prior)
    assert len(nv.api.nv_modules(model)) == 2 and set(nv.get_knobs(model)) == {"encoder.0", "encoder.1"}
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, original(**batch).logits, atol=1e-5, rtol=0)


def test_readme_causal_lm_fit_command(cli, root, llama_dir, llama_prior):
    """The section's second block: knobs of a causal LM fitted on unlabelled target text (a plain text
    file, one dvd review per line: enough rows for the default batch size and the held-out share)."""
    from nvformer_studies.common.data import read_reviews

    text = root / "readme-target-text.txt"
    text.write_text("".join(" ".join(t.split()[:40]) + "\n" for t in read_reviews("dvd").texts[:96]), encoding="utf-8")
    paths = {"my-lm": llama_dir, "my-prior": llama_prior, "target-text.txt": text, "my-nv": root / "readme-lm-nv"}
    commands = readme_commands(paths, block=1)
    assert [c[0] for c in commands] == ["tune"] and "--method" in commands[0] and "fit" in commands[0]
    code, out, err = cli(*commands[0])
    assert code == 0, err
    assert "Traceback" not in err
    assert {"nvformer.json", "nvformer.safetensors", "fit.json"} <= {p.name for p in paths["my-nv"].iterdir()}

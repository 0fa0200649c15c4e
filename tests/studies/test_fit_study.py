"""The fitted-knobs study end to end on tiny models (real review, domain and translation text, tiny
budgets): the fine-tuned and frozen-feature classifiers, the causal LM and the Marian translation
parts; every method's rows, the CSV the section is rendered from, the bootstrap, transfer and length
tables."""

import csv
import json

import pytest
import torch
import transformers as tf

from nvformer_studies.common.checkpoints import load_minilm
from nvformer_studies.fitknobs.report import fit_section
from nvformer_studies.fitknobs.study import FIT_METHODS, FitStudyConfig, run_fit_study, time_fits


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    _, tok = load_minilm()
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    folder = tmp_path_factory.mktemp("fit-study") / "tiny"
    tf.BertForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_fit_study_end_to_end(tiny_classifier, tmp_path):
    cfg = FitStudyConfig.smoke(model_dir=str(tiny_classifier), wise=(), max_length=32)
    res = run_fit_study(cfg, tmp_path / "run", show_progress=False)
    methods = [m for m in FIT_METHODS if m != "wise"]
    assert {r["method"] for r in res["rows"]} == set(methods)
    assert len(res["rows"]) == len(methods) * 2 * 2  # per target: the target's and the source's test split
    for r in res["rows"]:
        if r["method"].startswith("fit-"):
            assert r["steps"] <= cfg.steps and r["forward_equivalents"] > 0
    text = fit_section([res], tmp_path / "figures", tmp_path / "results")
    with open(tmp_path / "results" / "fit_knobs.csv") as f:
        rows = list(csv.DictReader(f))
    need = {"model", "target", "method", "metric", "baseline", "value", "gain", "ci_low", "ci_high", "forward_equivalents", "seconds", "unit"}
    assert need <= set(rows[0])
    assert len(rows) == len(methods) * 3 and {r["target"] for r in rows} == {"dvd", "airline", "mean"}
    for r in rows:
        assert r["model"] == "finetuned" and r["unit"] == "points"
        assert float(r["ci_low"]) <= float(r["gain"]) + 1e-9 <= float(r["ci_high"]) + 2e-9
        assert float(r["gain"]) == pytest.approx(float(r["value"]) - float(r["baseline"]), abs=1e-9)
        if r["method"] == "baseline":
            assert float(r["gain"]) == 0.0
    with open(tmp_path / "results" / "fit_knobs_transfer.csv") as f:
        assert [r["model"] for r in csv.DictReader(f)] == ["finetuned"] * 4
    assert (tmp_path / "figures" / "fit_knobs_gain.png").exists() and (tmp_path / "figures" / "fit_knobs_layers.png").exists()
    assert (tmp_path / "figures" / "fit_knobs_heads.png").exists()
    assert "## Fitted knobs" in text and "Reading, `finetuned` (the recorded run)" in text


def test_lm_part_end_to_end(tmp_path):
    """A tiny Llama over the MiniLM tokenizer on real domain text: baseline, search and the label-free
    fit rows, in the same CSV as the classifier's, with relative perplexity changes."""
    from hf_models import tiny_llama

    from nvformer_studies.fitknobs.lm import FitLMConfig, run_fit_lm

    _, tok = load_minilm()
    tok.bos_token = "[CLS]"
    lm = run_fit_lm(FitLMConfig.smoke(), model=tiny_llama(tok), tok=tok, show_progress=False)
    assert [(r["target"], r["method"]) for r in lm["rows"]] == [(t, m) for t in ("koran", "law") for m in ("baseline", "search", "fit-lm-unlabelled")]
    for r in lm["rows"]:
        assert r["unit"] == "relative" and r["ci_low"] <= r["gain"] + 1e-12 <= r["ci_high"] + 2e-12
        assert r["value"] == pytest.approx(r["baseline"] * (1 + r["gain"]), rel=1e-9)
    text = fit_section([], tmp_path / "figures", tmp_path / "results", lm=lm)
    with open(tmp_path / "results" / "fit_knobs.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {"smollm2"} and len(rows) == 6
    for name in ("fit_knobs_gain_smollm2.png", "fit_knobs_layers_smollm2.png"):
        assert (tmp_path / "figures" / name).exists() and f"(figures/{name})" in text
    # transfer: each target's fitted knobs on every target and on WikiText-2, the search's on WikiText-2;
    # a fresh copy of the same tiny model (run_fit_lm converted the first), the same prior
    from nvformer_studies.fitknobs.lm import run_lm_transfer

    tr = run_lm_transfer(FitLMConfig.smoke(), lm, model=tiny_llama(tok), tok=tok, show_progress=False)
    assert [(r["method"], r["fitted_on"], r["target"]) for r in tr["rows"]] == [
        (m, f, d) for f in ("koran", "law") for m, ds in (("search", ("wikitext",)), ("fit-lm-unlabelled", ("koran", "law", "wikitext")))
        for d in ds]
    for r in tr["rows"]:
        assert r["ci_low"] <= r["gain"] + 1e-12 <= r["ci_high"] + 2e-12 and r["own"] == (r["fitted_on"] == r["target"])
    own = {r["fitted_on"]: r["gain"] for r in tr["rows"] if r["own"]}
    assert own == pytest.approx({r["target"]: r["gain"] for r in lm["rows"] if r["method"] == "fit-lm-unlabelled"}, rel=1e-9, abs=1e-12)
    text = fit_section([], tmp_path / "figures", tmp_path / "results", lm={**lm, "transfer": tr})
    with open(tmp_path / "results" / "fit_knobs.csv") as f:
        rows = {(r["method"], r["target"]): r for r in csv.DictReader(f)}
    wiki = {(r["method"], r["fitted_on"]): r["gain"] for r in tr["rows"] if r["target"] == "wikitext"}
    for (m, t), r in rows.items():
        expected = 0.0 if m == "baseline" else wiki[(m, t)]
        assert float(r["in_domain_gain"]) == pytest.approx(expected, abs=1e-12)
    with open(tmp_path / "results" / "fit_knobs_transfer.csv") as f:
        assert len([r for r in csv.DictReader(f) if r["model"] == "smollm2"]) == len(tr["rows"])
    assert "Transfer and in-domain cost, `smollm2`" in text and "Reading, SmolLM2 transfer" in text


def test_frozen_setting(tiny_classifier, tmp_path):
    """The frozen-feature model: the pretrained encoder's mean-pooled features with a head fitted on the
    source training split, no WiSE-FT rows; its rows sit beside the fine-tuned model's in one CSV."""
    cfg = FitStudyConfig.smoke(setting="frozen", pretrained_dir=str(tiny_classifier), model_dir=str(tiny_classifier), max_length=32,
                               targets=("dvd",), wise=(0.5,))
    assert cfg.wise == ()
    res = run_fit_study(cfg, tmp_path / "frozen", show_progress=False)
    assert {r["method"] for r in res["rows"]} == {m for m in FIT_METHODS if m != "wise"}
    assert 0.0 <= res["head"]["val_accuracy"] <= 1.0 and res["head"]["l2"] > 0
    fine = run_fit_study(FitStudyConfig.smoke(model_dir=str(tiny_classifier), wise=(), max_length=32, targets=("dvd",)), None,
                         show_progress=False)
    text = fit_section([fine, res], tmp_path / "figures", tmp_path / "results")
    with open(tmp_path / "results" / "fit_knobs.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["model"] for r in rows} == {"finetuned", "frozen"}
    assert (tmp_path / "figures" / "fit_knobs_gain_frozen.png").exists() and "Model `frozen`" in text
    with pytest.raises(ValueError, match="unknown setting"):
        FitStudyConfig(setting="lora")


def test_fit_study_resumes_after_a_finished_target(tiny_classifier, tmp_path, monkeypatch):
    """A run stopped during its second target resumes from the first target's saved state and ends with
    the uninterrupted run's rows and test logits; the saved state is gone once the run ends."""
    import nvformer_studies.fitknobs.study as study

    cfg = FitStudyConfig.smoke(model_dir=str(tiny_classifier), wise=(), max_length=32)
    whole = run_fit_study(cfg, tmp_path / "whole", show_progress=False)
    real_tent, calls = study.tent, []

    def stopped(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_tent(*a, **kw)

    monkeypatch.setattr(study, "tent", stopped)
    with pytest.raises(KeyboardInterrupt):
        run_fit_study(cfg, tmp_path / "cut", show_progress=False)
    assert (tmp_path / "cut" / study.PARTIAL_FILE).exists() and not (tmp_path / "cut" / "results.json").exists()
    monkeypatch.setattr(study, "tent", real_tent)
    other = FitStudyConfig.smoke(model_dir=str(tiny_classifier), wise=(), max_length=32, steps=2)
    assert study._load_partial(tmp_path / "cut" / study.PARTIAL_FILE, other)[3] == []  # other settings: start over
    resumed = run_fit_study(cfg, tmp_path / "cut", show_progress=False)
    assert resumed["info"]["resumed_after"] == ["dvd"] and whole["info"]["resumed_after"] == []
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [drop(r) for r in resumed["rows"]] == [drop(r) for r in json.loads(json.dumps(whole["rows"], default=str))]
    assert resumed["transfer"] == whole["transfer"]
    assert resumed["logits"].keys() == whole["logits"].keys()
    for k, v in whole["logits"].items():
        torch.testing.assert_close(resumed["logits"][k], v, rtol=0, atol=0)
    assert not (tmp_path / "cut" / study.PARTIAL_FILE).exists()


def test_mean_pool_classifier_loss_with_labels(tiny_classifier):
    """Given labels, the frozen-feature classifier returns their cross-entropy (what ``nll`` fitting reads)."""
    from nvformer_studies.sentiment.study import MeanPoolClassifier

    enc = tf.AutoModel.from_pretrained(tiny_classifier)
    model = MeanPoolClassifier(enc).eval()
    ids = torch.tensor([[101, 2000, 102], [101, 2001, 102]])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1]))
    assert out.loss.item() == pytest.approx(torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1])).item(), abs=1e-7)
    assert model(input_ids=ids, attention_mask=torch.ones_like(ids)).loss is None


def test_translation_part_end_to_end(tmp_path):
    """A tiny Marian model trained on koran pairs: every method's rows on a target, BLEU gains that are
    value minus baseline inside their bootstrap interval, and the marian rows in the same CSV."""
    pytest.importorskip("sacrebleu")
    from nvformer_studies.fitknobs.translation import MT_METHODS, FitMTConfig, decoder_entropy, run_fit_translation

    cfg = FitMTConfig.smoke(model_dir=str(tmp_path / "marian"))
    mt = run_fit_translation(cfg, show_progress=False)
    assert [(r["target"], r["method"]) for r in mt["rows"]] == [("law", m) for m in MT_METHODS]
    for r in mt["rows"]:
        assert r["unit"] == "BLEU" and r["ci_low"] <= r["gain"] + 1e-9 <= r["ci_high"] + 1e-9
        assert r["gain"] == pytest.approx(r["value"] - r["baseline"], abs=1e-9)
        if r["method"].startswith("fit-") or r["method"] == "tent":
            assert 1 <= r["steps"] <= cfg.steps and r["forward_equivalents"] > 0
    assert next(r for r in mt["rows"] if r["method"] == "baseline")["gain"] == 0.0
    assert next(r for r in mt["rows"] if r["method"] == "search")["site"] in ("encoder", "cross", "decoder")
    text = fit_section([], tmp_path / "figures", tmp_path / "results", translation=mt)
    with open(tmp_path / "results" / "fit_knobs.csv") as f:
        assert {r["model"] for r in csv.DictReader(f)} == {"marian"}
    assert "Model `marian`" in text and "Reading, `marian`" in text
    # the label-free objective counts only the decoder positions of the labels
    logits = torch.randn(2, 3, 5, dtype=torch.float64)
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    p = logits.softmax(-1)
    h = -(p * p.log()).sum(-1)
    expected = (h[0, 0] + h[0, 1] + h[1, 0]) / 3
    out = type("Out", (), {"logits": logits})()
    assert decoder_entropy(out, {"labels": labels}).item() == pytest.approx(expected.item(), abs=1e-12)


def test_translation_part_resumes_after_a_finished_target(tmp_path, monkeypatch):
    """The translation part stopped during its second target resumes from the first target's saved rows
    and ends with the uninterrupted run's rows (seconds aside); the saved rows are gone at the end."""
    pytest.importorskip("sacrebleu")
    import dataclasses

    import nvformer_studies.fitknobs.translation as mt_mod

    base = mt_mod.FitMTConfig.smoke(model_dir=str(tmp_path / "marian"))
    cfg = dataclasses.replace(base, study=dataclasses.replace(base.study, domains=("koran", "law", "it")))
    whole = mt_mod.run_fit_translation(cfg, show_progress=False)
    real_tent, calls = mt_mod.tent, []

    def stopped(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_tent(*a, **kw)

    monkeypatch.setattr(mt_mod, "tent", stopped)
    with pytest.raises(KeyboardInterrupt):
        mt_mod.run_fit_translation(cfg, show_progress=False, partial_dir=tmp_path / "run")
    assert json.loads((tmp_path / "run" / mt_mod.PARTIAL_FILE).read_text())["done"] == ["law"]
    monkeypatch.setattr(mt_mod, "tent", real_tent)
    resumed = mt_mod.run_fit_translation(cfg, show_progress=False, partial_dir=tmp_path / "run")
    assert resumed["info"]["resumed_after"] == ["law"] and whole["info"]["resumed_after"] == []
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [drop(r) for r in resumed["rows"]] == [drop(r) for r in json.loads(json.dumps(whole["rows"], default=str))]
    assert not (tmp_path / "run" / mt_mod.PARTIAL_FILE).exists()


def test_time_fits_rows(tiny_classifier):
    """The cost benchmark's fits (benchmarks/fit_cost.py): one row per target and knob group, with the
    study's budget and cost accounting."""
    cfg = FitStudyConfig.smoke(model_dir=str(tiny_classifier), wise=(), max_length=32, targets=("dvd",))
    rows = time_fits(cfg, ("site", "head"), show_progress=False)
    assert [(r["target"], r["groups"]) for r in rows] == [("dvd", "site"), ("dvd", "head")]
    for r in rows:
        assert 1 <= r["steps"] <= cfg.steps and r["seconds"] > 0 and r["examples"] == cfg.n_val
        assert r["forward_equivalents"] >= 3 * r["steps"]  # every step trains on at least one example


def test_fit_cost_command_rejects_bad_options(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "fit_cost.py"
    spec = importlib.util.spec_from_file_location("fit_cost_benchmark", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for argv in (["--targets", "books"], ["--groups", "layer,row"], ["--threads", "0"]):
        with pytest.raises(SystemExit) as e:
            mod.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "error:" in err[-1] and "Traceback" not in "".join(err)


def test_fit_knobs_command_rejects_bad_parts(capsys, tmp_path):
    """Unknown parts, and the LM transfer without the LM part's results, are one-line errors before any work."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "experiments" / "fit_knobs.py"
    spec = importlib.util.spec_from_file_location("fit_knobs_command", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for argv, needle in ((["--models", "finetuned,lora"], "--models: unknown lora"),
                         (["--models", "smollm2-transfer"], "run --models smollm2 first")):
        with pytest.raises(SystemExit) as e:
            mod.main([*argv, "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and needle in err[0]
    assert not (tmp_path / "out").exists()


def test_translation_reading_names_a_bleu_floor():
    """When the unregularised model scores below the floor on every target, the reading says that no gain can show."""
    from nvformer_studies.fitknobs.translation import FLOOR_BLEU, _reading

    def rows(base):
        return [{"target": t, "method": m, "baseline": b, "gain": 0.0, "ci_low": -0.1, "ci_high": 0.1}
                for t, b in zip(("law", "it"), base) for m in ("baseline", "search")]

    assert "does not translate these domains" in _reading(rows([0.3, FLOOR_BLEU / 2]))
    assert "does not translate" not in _reading(rows([0.3, FLOOR_BLEU + 5]))


def test_reading_standing_names_each_rival():
    from nvformer_studies.fitknobs.report import _standing

    assert _standing(3.0, {"control": 3.08, "search": 0.33}) == "Ahead of search; not ahead of control. "
    assert _standing(1.0, {"wise": 0.5}) == "Ahead of wise. "
    assert _standing(0.0, {"wise": 0.5}) == "Ahead of none; not ahead of wise. "

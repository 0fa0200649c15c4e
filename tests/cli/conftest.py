"""Fixtures of the command-line tests: tiny models saved to folders (with the MiniLM tokenizer) and
small data files of real review text, built once per session."""

from __future__ import annotations

import contextlib
import csv
import json
import random
from pathlib import Path

import pytest
import torch
import transformers as tf
from hf_models import perturb, tiny_llama, tiny_marian

from nvformer.cli import main
from nvformer_studies.common.checkpoints import load_minilm
from nvformer_studies.common.data import read_reviews

LABELS = ("negative", "positive")


def run(capsys, *argv) -> tuple[int, str, str]:
    """``nvformer.cli.main(argv)``: ``(exit code, stdout, stderr)``."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _tokenizer():
    _, tok = load_minilm()
    return tok


@contextlib.contextmanager
def one_thread():
    """One torch thread: the models are tiny (two threads only add synchronisation, and stall badly when
    other work shares the two cores; training the classifier is also reproducible this way)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="session")
def bert_dir(root) -> Path:
    """A tiny BERT sentiment classifier (2 layers, 32 wide; labels negative/positive), trained for 4
    epochs on 256 books reviews (about 2 s): well above chance on dvd, so the knobs matter."""
    from nvformer.tasks import classification_batches

    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
                        id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)})
    model = tf.BertForSequenceClassification(cfg)
    books = read_reviews("books")
    idx = random.Random(1).sample(range(len(books)), 256)
    data = classification_batches(tok, [books.texts[i] for i in idx], [books.labels[i] for i in idx], batch_size=32, max_length=64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    with one_thread():
        for _ in range(4):
            for batch, labels in zip(data.batches, data.labels[data.order].split(32)):
                opt.zero_grad()
                model(**batch, labels=labels).loss.backward()
                opt.step()
    return _saved(model.eval(), tok, root / "bert-classifier")


@pytest.fixture(scope="session")
def llama_dir(root) -> Path:
    """A tiny Llama causal LM (GQA, RoPE) with the MiniLM tokenizer, BOS = [CLS]."""
    tok = _tokenizer()
    tok.bos_token = "[CLS]"
    return _saved(perturb(tiny_llama(tok, positions=256), std=0.1), tok, root / "llama-lm")


@pytest.fixture(scope="session")
def marian_dir(root) -> Path:
    """A tiny Marian encoder-decoder with the MiniLM tokenizer."""
    tok = _tokenizer()
    return _saved(perturb(tiny_marian(tok, positions=256, dropout=0.0, attention_dropout=0.0), std=0.1), tok, root / "marian-mt")


def _saved(model, tok, folder: Path) -> Path:
    """``folder`` with the model and its tokenizer saved in it (a model folder as users have them)."""
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def reviews(root) -> dict[str, Path]:
    """Real review text: ``source.csv`` (64 books reviews, column text), ``target-dev.csv`` and
    ``target-test.csv`` (48 dvd reviews each, columns text and label = negative/positive)."""
    books, dvd = read_reviews("books"), read_reviews("dvd")
    r = random.Random(0)
    src = r.sample(range(len(books)), 64)
    tgt = r.sample(range(len(dvd)), 96)
    files = {"source": write_csv(root / "source.csv", ["text"], [[books.texts[i]] for i in src])}
    for name, idx in (("dev", tgt[:48]), ("test", tgt[48:])):
        files[name] = write_csv(root / f"target-{name}.csv", ["text", "label"], [[dvd.texts[i], LABELS[dvd.labels[i]]] for i in idx])
    return files


def _clip(text: str, words: int) -> str:
    return " ".join(text.split()[:words])


@pytest.fixture(scope="session")
def lm_files(root) -> dict[str, Path]:
    """Causal-LM text: ``lm-source.txt`` (one books review per line) and ``lm-dev.jsonl`` (dvd reviews, field text)."""
    books, dvd = read_reviews("books"), read_reviews("dvd")
    src = root / "lm-source.txt"
    src.write_text("".join(_clip(t, 60) + "\n" for t in books.texts[:40]), encoding="utf-8")
    return {"source": src, "dev": write_jsonl(root / "lm-dev.jsonl", [{"text": _clip(t, 60)} for t in dvd.texts[:24]])}


@pytest.fixture(scope="session")
def mt_files(root) -> dict[str, Path]:
    """Sequence-to-sequence pairs (a review's first 20 words -> its first 8): ``mt-source.jsonl`` (books)
    and ``mt-dev.jsonl`` (dvd), fields text and target."""
    books, dvd = read_reviews("books"), read_reviews("dvd")

    def pairs(texts):
        return [{"text": _clip(t, 20), "target": _clip(t, 8)} for t in texts]

    return {"source": write_jsonl(root / "mt-source.jsonl", pairs(books.texts[100:130])),
            "dev": write_jsonl(root / "mt-dev.jsonl", pairs(dvd.texts[100:120]))}


@pytest.fixture(scope="session")
def bert_prior(root, bert_dir, reviews) -> Path:
    """The prior adapter of the tiny BERT from the source reviews (written by the CLI)."""
    out = root / "bert-prior"
    with one_thread():
        assert main(["prior", "--model", str(bert_dir), "--data", str(reviews["source"]), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def llama_prior(root, llama_dir, lm_files) -> Path:
    out = root / "llama-prior"
    with one_thread():
        assert main(["prior", "--model", str(llama_dir), "--data", str(lm_files["source"]), "--out", str(out), "--max-examples", "30"]) == 0
    return out


@pytest.fixture
def no_loading(monkeypatch) -> list:
    """Make every model loading (``from_pretrained`` of the auto classes and of any model class) fail
    and record it; the test asserts the list stays empty (the CLI refused before loading)."""
    calls: list = []

    def refuse(cls, *args, **kwargs):
        calls.append((cls.__name__, args))
        raise AssertionError("a model was loaded")

    for name in ("AutoModel", "AutoModelForSequenceClassification", "AutoModelForCausalLM", "AutoModelForSeq2SeqLM"):
        monkeypatch.setattr(getattr(tf, name), "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(tf.PreTrainedModel, "from_pretrained", classmethod(refuse))
    return calls


@pytest.fixture
def cli(capsys):
    """``cli(*argv) -> (exit code, stdout, stderr)`` of ``nvformer.cli.main`` run in this process."""
    return lambda *argv: run(capsys, *argv)

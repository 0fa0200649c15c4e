"""Tasks: batching restores example order, and every score equals the model's own computation."""

import math

import pytest
import sacrebleu
import torch
from hf_models import perturb, tiny_llama, tiny_marian

from nvformer.metrics import classification_metrics
from nvformer.tasks import (
    TASKS,
    classification_batches,
    generate_texts,
    get_task,
    holdout_split,
    lm_batches,
    lm_nll,
    predict_logits,
    seq2seq_batches,
    seq2seq_nll,
)
from nvformer_studies.common.checkpoints import load_minilm


@pytest.fixture(scope="module")
def tok():
    _, t = load_minilm()
    t.bos_token = "[CLS]"
    return t


@pytest.fixture(scope="module")
def llama(tok):
    return tiny_llama(tok)


@pytest.fixture(scope="module")
def marian(tok):
    return perturb(tiny_marian(tok))


TEXTS = ["the cat sat on the mat .", "a much longer sentence about the law and its articles , in several parts", "hello"]


def test_classification_batches_restore_order_and_match_unbatched_predictions():
    from nvformer_studies.common.data import read_reviews

    model, tok = load_minilm(head="classification")
    r = read_reviews("dvd")
    texts, labels = r.texts[995:1005], r.labels[995:1005]
    data = classification_batches(tok, texts, labels, batch_size=4, max_length=64)
    assert len(data) == 10 and data.labels.tolist() == labels
    lens = [b["input_ids"].shape[1] for b in data.batches]
    assert lens == sorted(lens)
    logits = predict_logits(model, data)
    with torch.no_grad():
        for i in (0, 3, 9):
            one = model(**tok(texts[i], truncation=True, max_length=64, return_tensors="pt")).logits[0]
            torch.testing.assert_close(logits[i], one, rtol=0, atol=1e-5)
    assert math.isfinite(classification_metrics(logits, data.labels)["nll"])
    stats = TASKS["classification"].stats(model, data)
    assert TASKS["classification"].metric("accuracy")(stats) == pytest.approx(classification_metrics(logits, data.labels)["accuracy"])



def test_lm_nll_equals_the_models_own_loss(tok, llama):
    data = lm_batches(tok, TEXTS, max_tokens=12, batch_size=2)
    nll = lm_nll(llama, data)
    for i, t in enumerate(TEXTS):
        ids = torch.tensor([[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"][:12]]])
        with torch.no_grad():
            loss = llama(input_ids=ids, labels=ids).loss.double()
        assert data.n_tokens[i] == ids.shape[1] - 1
        assert nll[i].item() == pytest.approx(loss.item() * (ids.shape[1] - 1), rel=1e-5)
    stats = TASKS["causal-lm"].stats(llama, data)
    assert TASKS["causal-lm"].metric("perplexity")(stats) == pytest.approx(math.exp(nll.sum().item() / data.n_tokens.sum().item()))
    with pytest.raises(ValueError, match="no texts"):
        lm_batches(tok, [])


def test_seq2seq_nll_equals_the_models_own_loss(tok, marian):
    targets = ["le chat", "une phrase beaucoup plus longue sur la loi", "salut toi"]
    data = seq2seq_batches(tok, TEXTS, targets, batch_size=2, max_length=16)
    nll = seq2seq_nll(marian, data)
    for i in range(3):
        enc = tok(TEXTS[i], truncation=True, max_length=16, return_tensors="pt")
        labels = tok(text_target=targets[i], truncation=True, max_length=16, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            loss = marian(**enc, labels=labels).loss.double()
        assert nll[i].item() == pytest.approx(loss.item() * labels.shape[1], rel=1e-5)
    assert data.references == targets and data.sources == TEXTS
    with pytest.raises(ValueError, match="3 sources but 2 targets"):
        seq2seq_batches(tok, TEXTS, targets[:2])


def test_generated_texts_come_back_in_input_order_and_bleu_stats_sum_to_sacrebleu(tok, marian):
    out = generate_texts(marian, tok, TEXTS, batch_size=2, max_new_tokens=6)
    for i in (0, 2):
        one = generate_texts(marian, tok, [TEXTS[i]], batch_size=1, max_new_tokens=6)
        assert one[0] == out[i]
    refs = ["the cat sat", "a sentence about the law", "hello there"]
    hyps = ["the cat sat on", "a sentence on the law", "hello"]
    for name, ref in (("bleu", sacrebleu.corpus_bleu(hyps, [refs]).score), ("chrf", sacrebleu.corpus_chrf(hyps, [refs]).score)):
        from nvformer.tasks import sentence_stats

        assert TASKS["seq2seq"].metric(name)(sentence_stats(name, hyps, refs)) == pytest.approx(ref)


def test_task_table_and_metric_errors():
    assert [get_task(t).default_metric for t in ("classification", "causal-lm", "seq2seq")] == ["accuracy", "perplexity", "nll"]
    with pytest.raises(ValueError, match="unknown task"):
        get_task("regression")
    with pytest.raises(ValueError, match="no metric 'bleu'"):
        get_task("classification").metric("bleu")
    assert {m.direction for m in TASKS["causal-lm"].metrics.values()} == {"minimize"}


def test_labelled_batches_carry_labels_in_batch_order():
    import torch

    from nvformer.tasks import TextBatches, labelled_batches

    b1 = {"input_ids": torch.tensor([[5, 6, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    b2 = {"input_ids": torch.tensor([[7, 8, 9], [4, 3, 2]]), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    data = TextBatches([b1, b2], order=torch.tensor([2, 0, 1]), labels=torch.tensor([10, 11, 12]))
    cls = labelled_batches(data, "classification")
    assert [b["labels"].tolist() for b in cls] == [[12], [10, 11]]
    lm = labelled_batches(data, "causal-lm")
    assert lm[0]["labels"].tolist() == [[5, 6, -100]] and torch.equal(lm[1]["labels"], b2["input_ids"])
    assert "labels" not in b1 and labelled_batches(data, "seq2seq")[0].keys() == b1.keys()


def test_holdout_split_is_seeded_disjoint_and_complete():
    held, fit = holdout_split(200, 0.25, seed=0)
    assert len(held) == 50 and len(fit) == 150 and sorted(held + fit) == list(range(200))
    assert (held, fit) == holdout_split(200, 0.25, seed=0) and held != holdout_split(200, 0.25, seed=1)[0]
    assert held + fit == torch.randperm(200, generator=torch.Generator().manual_seed(0)).tolist()  # the permutation's order
    assert [len(x) for x in holdout_split(2, 0.9, seed=3)] == [1, 1]  # always one of each
    with pytest.raises(ValueError, match="holdout_split"):
        holdout_split(1, 0.25, seed=0)
    with pytest.raises(ValueError, match="holdout_split"):
        holdout_split(10, 1.0, seed=0)

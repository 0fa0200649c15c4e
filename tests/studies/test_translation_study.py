"""Translation study pieces (nvformer_studies.translation): tokenizer, batching, BLEU/chrF and the
their paired bootstrap, and a tiny end-to-end run (train a tiny Marian model, convert, identity
check, a 2-trial knob search)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter

import pytest
import torch

pytest.importorskip("sacrebleu")
pytest.importorskip("tokenizers")
pytest.importorskip("optuna")

import sacrebleu  # noqa: E402

import nvformer as nv  # noqa: E402
from nvformer.tasks import generate_texts, get_task, sentence_stats  # noqa: E402
from nvformer_studies.common.data import read_parallel  # noqa: E402
from nvformer_studies.common.tensorfiles import load_meta  # noqa: E402
from nvformer_studies.common.tokenizer import train_tokenizer  # noqa: E402
from nvformer_studies.translation import model as marian  # noqa: E402
from nvformer_studies.translation import study as mt  # noqa: E402

# a few seconds of training: enough for multi-word (if input-independent) outputs, so BLEU has 4-grams
TINY = marian.TranslationConfig(vocab_size=1000, d_model=32, layers=1, heads=2, ffn=64, max_length=64, batch_tokens=512, epochs=4, lr=5e-3,
                            warmup=10, val_size=16, train_pairs=300, eval_batch_size=16)


@pytest.fixture(scope="module")
def koran():
    try:
        return read_parallel("koran", "train"), read_parallel("koran", "dev")
    except FileNotFoundError:
        pytest.skip("../shared/data is not available")


@pytest.fixture(scope="module")
def tok(koran):
    train, _ = koran
    return train_tokenizer(train.de[:1000] + train.en[:1000], vocab_size=600)


def test_tokenizer_round_trip_on_koran_lines(tok, koran, tmp_path):
    train, dev = koran
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == 600
    lines = train.de[:100] + train.en[:100] + dev.de[:100] + dev.en[:100]  # dev lines were not seen in training
    enc = tok(lines)["input_ids"]
    for line, ids in zip(lines, enc):
        assert ids[-1] == tok.eos_token_id and tok.eos_token_id not in ids[:-1]
        assert tok.unk_token_id not in ids  # byte-level: nothing is unknown
        assert tok.decode(ids, skip_special_tokens=True) == line
    # subwords are learnt: far fewer tokens than bytes
    assert sum(map(len, enc)) < 0.5 * sum(len(s.encode()) for s in lines)
    # truncation keeps the end-of-sentence token
    short = tok(lines[:5], truncation=True, max_length=8)["input_ids"]
    assert all(len(s) == 8 and s[-1] == tok.eos_token_id for s in short)
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(lines[:20])["input_ids"] == enc[:20] and again.pad_token_id == 0


def test_tokenizer_rejects_bad_input():
    with pytest.raises(ValueError, match="no texts"):
        train_tokenizer([])
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["a b"], vocab_size=100)


def test_length_batches_and_collate():
    src = [5, 3, 9, 3, 7, 1, 12]
    tgt = [4, 6, 8, 2, 9, 2, 3]
    batches = marian.length_batches(src, tgt, batch_tokens=20)
    assert sorted(i for b in batches for i in b) == list(range(len(src)))
    for b in batches:
        assert len(b) == 1 or len(b) * max(max(src[i], tgt[i]) for i in b) <= 20
    flat = [i for b in batches for i in b]
    assert [src[i] for i in flat] == sorted(src)
    out = marian.collate([[7, 8, 1], [9, 1]], [[4, 5, 6, 1], [3, 1]], pad_id=0)
    assert out["input_ids"].tolist() == [[7, 8, 1], [9, 1, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["labels"].tolist() == [[4, 5, 6, 1], [3, 1, -100, -100]]
    assert out["decoder_input_ids"].tolist() == [[0, 4, 5, 6], [0, 3, 1, 0]]
    assert out["decoder_attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    with pytest.raises(ValueError, match="targets"):
        marian.collate([[1]], [[1], [2]], pad_id=0)
    with pytest.raises(ValueError, match="lengths"):
        marian.length_batches([1, 2], [1], 10)


def test_koran_dev_subset_avoids_the_checkpoint_selection_pairs(koran):
    cfg = mt.TranslationStudyConfig(train=TINY, domains=("koran", "law"), n_dev=300, n_test=10, subset_seed=1)
    sets = mt.domain_sets(cfg, None)
    val = marian.koran_splits(TINY)["val_idx"]
    assert len(val) == TINY.val_size and not set(val) & set(sets["koran"]["indices"]["dev"])
    assert len(sets["koran"]["indices"]["dev"]) == 300 and len(sets["law"]["indices"]["test"]) == 10
    _, dev = koran
    assert sets["koran"]["dev"][0] == [dev.de[i] for i in sets["koran"]["indices"]["dev"]]
    assert sets["law"]["info"]["dev_excluded_for_checkpoint_selection"] == 0


def _direct_bleu(hyps: list[str], refs: list[str]) -> float:
    """Corpus BLEU-4 (Papineni et al. 2002) for whitespace-tokenised text, no smoothing."""
    match, total = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for h, r in zip(hyps, refs):
        hw, rw = h.split(), r.split()
        hyp_len, ref_len = hyp_len + len(hw), ref_len + len(rw)
        for n in range(1, 5):
            hc = Counter(tuple(hw[i : i + n]) for i in range(len(hw) - n + 1))
            rc = Counter(tuple(rw[i : i + n]) for i in range(len(rw) - n + 1))
            match[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            total[n - 1] += max(len(hw) - n + 1, 0)
    if min(match) == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(match, total)) / 4
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return 100 * bp * math.exp(log_p)


REFS = ["the cat sat on the mat today", "a dog ran in the park with joy", "he reads a good book every night",
        "we went to the sea last summer", "my sister plays the piano very well", "it rained all day in the city",
        "the old man walked to the shop", "they ate bread and cheese for lunch"]
HYP_A = ["the cat sat on a mat today", "a dog ran in the park", "he reads a book every night", "we went to sea last summer",
         "my sister plays piano very well", "it rained all day in town", "the old man walked to a shop", "they ate bread for lunch"]
HYP_B = ["the cat sat on the mat", "the dog ran in the park with joy", "he reads good books every night", "we went to the sea in summer",
         "my sister plays the piano well", "it rained the whole day in the city", "an old man walked to the shop", "they ate bread and cheese"]


def test_corpus_scores_equal_sacrebleu_and_a_direct_computation():
    for hyps in (HYP_A, HYP_B, REFS):
        got = marian.corpus_scores(hyps, REFS)
        assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [REFS]).score, abs=1e-12)
        assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [REFS]).score, abs=1e-12)
        assert got["bleu"] == pytest.approx(_direct_bleu(hyps, REFS), abs=1e-9)
    assert marian.corpus_scores(REFS, REFS) == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}
    assert 0 < marian.corpus_scores(HYP_A, REFS)["bleu"] < 100
    with pytest.raises(ValueError, match="hypotheses"):
        marian.corpus_scores(HYP_A[:3], REFS)
    with pytest.raises(ValueError, match="no sentences"):
        marian.corpus_scores([], [])


def _bootstrap_bleu(hyps_a, hyps_b, refs, n=1000, seed=0):
    """The study's bootstrap of corpus BLEU and chrF: the task metrics on per-sentence sacrebleu statistics."""
    return {name: get_task("seq2seq").metric(name).compare(sentence_stats(name, hyps_a, refs), sentence_stats(name, hyps_b, refs),
                                                           n_resamples=n, seed=seed) for name in ("bleu", "chrf")}


def test_paired_bootstrap_equals_a_direct_resampling_loop():
    n, seed = 40, 7
    got = _bootstrap_bleu(HYP_A, HYP_B, REFS, n=n, seed=seed)
    idx = torch.randint(0, len(REFS), (n, len(REFS)), generator=torch.Generator().manual_seed(seed))
    for name, fn in (("bleu", sacrebleu.corpus_bleu), ("chrf", sacrebleu.corpus_chrf)):
        diffs = []
        for row in idx.tolist():
            refs = [REFS[i] for i in row]
            diffs.append(fn([HYP_B[i] for i in row], [refs]).score - fn([HYP_A[i] for i in row], [refs]).score)
        d = torch.tensor(diffs, dtype=torch.float64)
        full_a, full_b = fn(HYP_A, [REFS]).score, fn(HYP_B, [REFS]).score
        assert got[name]["a"] == pytest.approx(full_a, abs=1e-9) and got[name]["b"] == pytest.approx(full_b, abs=1e-9)
        assert got[name]["diff"] == pytest.approx(full_b - full_a, abs=1e-9)
        assert got[name]["low"] == pytest.approx(float(torch.quantile(d, 0.025)), abs=1e-9)
        assert got[name]["high"] == pytest.approx(float(torch.quantile(d, 0.975)), abs=1e-9)
        assert got[name]["low"] < got[name]["high"]
    swapped = _bootstrap_bleu(HYP_B, HYP_A, REFS, n=n, seed=seed)
    assert swapped["bleu"]["low"] == pytest.approx(-got["bleu"]["high"], abs=1e-9)
    same = _bootstrap_bleu(HYP_A, HYP_A, REFS, n=n, seed=seed)
    assert all(same[k][q] == 0 for k in ("bleu", "chrf") for q in ("diff", "low", "high"))
    with pytest.raises(ValueError, match="hypotheses"):
        _bootstrap_bleu(HYP_A, HYP_B[:2], REFS)


def test_study_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="domain"):
        mt.TranslationStudyConfig(domains=("koran", "news"))
    with pytest.raises(ValueError, match="site"):
        mt.TranslationStudyConfig(sites=("self",))
    with pytest.raises(ValueError, match="vocab_size"):
        marian.TranslationConfig(vocab_size=0)


def test_tiny_end_to_end_translation_study(koran, tmp_path):
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model_dir = tmp_path / "model"
    model, tok, info = marian.load_or_train(model_dir, TINY, show_progress=False)
    assert info["train_pairs"] == 300 and info["history"]["steps"] > 0 and (model_dir / marian.INFO_FILE).exists()
    again, _, info2 = marian.load_or_train(model_dir, TINY, show_progress=False)  # cached: loaded, not retrained
    assert info2 == info
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))

    cfg = mt.TranslationStudyConfig(train=TINY, domains=("koran", "it"), sites=("cross",), n_dev=6, n_test=8, n_prior=16, trials=2,
                                    n_bootstrap=50, max_new_tokens=24, max_length=48, batch_size=8)
    res = mt.run_translation_study(cfg, tmp_path / "study", model_dir=model_dir, show_progress=False)
    # the equivalence check of the pipeline: NV model at identity == original model, sentence by sentence
    for d in ("koran", "it"):
        assert res["identity"][d]["bleu_vs_original"] == pytest.approx(100.0)
        assert res["identity"][d]["identical_fraction"] == 1.0
        assert res["data"][d]["dev_pairs"] == 6 and res["data"][d]["test_pairs"] == 8
    assert res["data"]["koran"]["dev_excluded_for_checkpoint_selection"] == 16
    assert res["data"]["it"]["repaired_lines_test"] == read_parallel("it", "test").repaired > 0
    assert set(res["prior"]["s_alpha"]) == {"model.encoder.layers.0.self_attn", "model.decoder.layers.0.self_attn",
                                            "model.decoder.layers.0.encoder_attn"}
    for d in ("koran", "it"):
        r = res["tuned"][d]["cross"]
        assert r["trials"] == 2 and set(r["best_params"]) == {"cross/alpha_tau", "cross/stdev_tau"}
        assert r["alpha_range"][1] == pytest.approx(10.0 / res["prior"]["s_alpha_min"]["cross"])
        assert r["best_dev_bleu"] >= r["identity_corner_dev_bleu"]
        for k in ("bleu", "chrf"):
            b = r["bootstrap"][k]
            assert b["low"] <= b["diff"] <= b["high"]
            assert b["diff"] == pytest.approx(r["test"][k] - res["baseline"][d]["test"][k], abs=1e-9)
    saved = json.loads((tmp_path / "study" / "results.json").read_text())
    assert saved["identity"] == res["identity"]
    summary = (tmp_path / "study" / "summary.md").read_text()
    assert "| it | cross |" in summary and "| koran | 8 | 100.00 | 100.0% |" in summary
    assert (tmp_path / "study" / "tune" / "it-cross" / "trials.csv").exists()

    # the conversion is live: identity logits at alpha_tau = 1e4, different ones with the knobs moved
    test = read_parallel("koran", "test")
    before = generate_texts(model, tok, test.de[:8], batch_size=4, max_new_tokens=24)
    assert all(len(h.split()) >= 4 for h in before)  # 4-grams exist, so the BLEU identity check above is not vacuous
    enc = [tok(x, truncation=True, max_length=64)["input_ids"] for x in (test.de[:8], test.en[:8])]
    batch = marian.collate(*enc, tok.pad_token_id)
    batch.pop("labels")
    valid = batch["decoder_attention_mask"].bool()
    with torch.no_grad():
        ref = model(**batch).logits[valid]
        nvm = nv.convert(model, prior=None, alpha_tau=1e4)
        id_err = float((nvm(**batch).logits[valid] - ref).abs().max())
        assert id_err < 1e-4
        assert generate_texts(nvm, tok, test.de[:8], batch_size=4, max_new_tokens=24) == before
        for site in ("encoder", "cross", "decoder"):  # (the tiny model barely reads its input: small but clear changes)
            nv.set_knobs(nvm, alpha_tau=1e4, stdev_tau=0.0)
            nv.set_knobs(nvm, site=site, alpha_tau=-1e4)
            assert (nvm(**batch).logits[valid] - ref).abs().max() > max(1e-3, 100 * id_err), site
    with pytest.raises(ValueError, match="no texts"):
        generate_texts(nvm, tok, [])
    with pytest.raises(ValueError, match="positions"):
        generate_texts(nvm, tok, ["Und"], max_length=TINY.max_positions + 1)


def test_interrupted_training_resumes_to_the_uninterrupted_weights(koran, tmp_path, monkeypatch):
    """load_or_train checkpoints after every epoch: killed during epoch 3's evaluation, a second call
    continues after epoch 2 and ends with exactly the weights and history of a run never stopped."""
    torch.set_num_threads(1)
    cfg = dataclasses.replace(TINY, epochs=3)
    whole, _, info = marian.load_or_train(tmp_path / "whole", cfg, show_progress=False)
    assert not (tmp_path / "whole" / marian.RESUME_FILE).exists()  # removed once training ends

    calls = []
    real = marian.generate_texts

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(marian, "generate_texts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        marian.load_or_train(tmp_path / "split", cfg, show_progress=False)
    assert (tmp_path / "split" / marian.RESUME_FILE).exists() and not (tmp_path / "split" / marian.INFO_FILE).exists()
    meta = load_meta(tmp_path / "split" / marian.RESUME_FILE)  # the header alone: epochs 0 and 1 finished, this config
    assert meta["epoch"] == 1 and meta["config"] == dataclasses.asdict(cfg)
    with pytest.raises(ValueError, match="not a readable results file"):
        load_meta(tmp_path / "split" / "tokenizer.json")
    monkeypatch.setattr(marian, "generate_texts", real)
    resumed, _, info2 = marian.load_or_train(tmp_path / "split", cfg, show_progress=False)
    timing = "epoch_seconds"
    assert {k: v for k, v in info2["history"].items() if k != timing} == {k: v for k, v in info["history"].items() if k != timing}
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert not (tmp_path / "split" / marian.RESUME_FILE).exists()

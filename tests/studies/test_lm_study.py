"""Causal-LM perplexity: the study's bootstrap of log perplexity against a loop, data loading,
and a tiny end-to-end study run."""

import math

import pytest
import torch
from hf_models import tiny_llama

from nvformer.tasks import get_task
from nvformer_studies.common.subsets import seeded_subset
from nvformer_studies.lm.report import lm_markdown
from nvformer_studies.lm.study import LMStudyConfig, lm_texts, perplexity, run_lm_study


@pytest.fixture(scope="module")
def tiny():
    from nvformer_studies.common.checkpoints import load_minilm

    _, tok = load_minilm()
    tok.bos_token = "[CLS]"
    return tiny_llama(tok), tok


def test_bootstrap_log_ppl_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    n_tok = torch.randint(5, 40, (50,), generator=g)
    a = n_tok * (3.0 + torch.rand(50, generator=g, dtype=torch.float64))
    b = a - n_tok * 0.2 * torch.rand(50, generator=g, dtype=torch.float64)
    rows = [torch.stack([x, n_tok.double()], 1) for x in (a, b)]  # the per-unit statistics of the causal-lm task
    got = get_task("causal-lm").metric("nll").compare(*rows, n_resamples=300, seed=4)
    gen = torch.Generator().manual_seed(4)
    idx = torch.randint(0, 50, (300, 50), generator=gen)
    stats = torch.tensor([((b[i] - a[i]).sum() / n_tok[i].sum()).item() for i in idx], dtype=torch.float64)
    assert got["diff"] == pytest.approx(math.log(perplexity(b, n_tok)) - math.log(perplexity(a, n_tok)))
    assert got["low"] == pytest.approx(torch.quantile(stats, 0.025).item()) and got["high"] < 0


def test_domain_texts_are_disjoint_and_seeded():
    prior, val = lm_texts("wikitext", "prior"), lm_texts("wikitext", "validation")
    assert not set(prior) & set(val) and lm_texts("wikitext", "prior") == prior
    assert len(lm_texts("law", "validation")) == 2000 and lm_texts("reviews", "test")[:3] == lm_texts("reviews", "test", seed=0)[:3]
    assert seeded_subset(len(val), 5, 1) == seeded_subset(len(val), 5, 1) and len(seeded_subset(len(val), 5, 1)) == 5
    with pytest.raises(ValueError, match="only the source"):
        lm_texts("law", "prior")
    with pytest.raises(ValueError, match="unknown domain"):
        lm_texts("poetry", "test")


def test_tiny_lm_study_end_to_end(tiny, tmp_path):
    model, tok = tiny
    cfg = LMStudyConfig(targets=("law",), n_prior=8, n_val=6, n_test=10, max_tokens=16, trials=3, samples=("The law",),
                        max_new_tokens=4, bootstrap=100)
    res = run_lm_study(cfg, tmp_path, model=model, tok=tok, show_progress=False)
    assert res.info["identity_max_abs_nll_diff"] < 1e-3 and res.info["identity_samples_equal"]
    rows = {(r["domain"], r["method"]) for r in res.rows}
    assert rows == {("wikitext", "source"), ("law", "target"), ("law", "source")}
    for r in res.rows:
        assert r["val_ppl"] <= r["val_ppl_identity"] + 1e-9  # the search can only match or beat its identity corner
        assert r["ratio_low"] <= r["ratio"] <= r["ratio_high"]
        assert r["test_ppl"] == pytest.approx(r["test_ppl_identity"] * r["ratio"], rel=1e-9)
    assert "| law |" in lm_markdown(res) and (tmp_path / "results.json").exists()
    assert len(res.samples) == 2

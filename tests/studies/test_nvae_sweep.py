"""The NVAE sparsity sweep: the kept-vector count, the sweep's rows and its length relation."""

import math

import pytest
import torch

import nvformer as nv
from nvformer_studies.nvae.report import _corr, _partial, length_relation, sweep_rows, sweep_section
from nvformer_studies.nvae.study import SWEEP
from nvformer_studies.nvae.training import effective_count, kept_vectors


def test_kept_vectors_are_the_pseudo_counts_above_the_threshold():
    """A hand-built latent: log a_i = x_i[0] (linear pseudo-count map, no quadratic term, no bias)."""
    nvib = nv.NVIB(4, 1, alpha_threshold=0.1, alpha_tau=0.0).eval()
    with torch.no_grad():
        nvib.alpha_lin.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        nvib.alpha_quad.zero_()
        nvib.alpha_bias.zero_()
    a = torch.tensor([[0.05, 0.1, 0.11, 2.0, 0.5], [0.3, 0.02, 0.09, 5.0, 7.0]], dtype=torch.float64)
    x = torch.zeros(2, 5, 4)
    x[..., 0] = a.log().float()
    pad = torch.tensor([[False] * 5, [False, False, False, False, True]])
    lat = nvib(x, key_padding_mask=pad)
    want = ((a > 0.1) & ~pad).sum(-1)
    assert kept_vectors(lat).tolist() == want.tolist() == [3, 2]
    torch.testing.assert_close(lat.log_alpha[:, 1:].exp()[~pad], a.float()[~pad].double(), rtol=1e-6, atol=0)


def test_correlation_helpers_match_torch():
    g = torch.Generator().manual_seed(0)
    x, y, z = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(3))
    y = y + 0.5 * x + 0.3 * z
    assert _corr(x.tolist(), y.tolist()) == pytest.approx(float(torch.corrcoef(torch.stack([x, y]))[0, 1]), abs=1e-12)
    # the partial correlation is the correlation of the residuals after regressing both on z (with an intercept)
    design = torch.stack([torch.ones_like(z), z], 1)
    rx, ry = (v - design @ torch.linalg.lstsq(design, v[:, None]).solution[:, 0] for v in (x, y))
    assert _partial(x.tolist(), y.tolist(), z.tolist()) == pytest.approx(float(torch.corrcoef(torch.stack([rx, ry]))[0, 1]), abs=1e-10)
    assert _corr([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None


def _model(bottleneck, kept, bleu, sentence_vectors, **config):
    cfg = {"bottleneck": bottleneck, "delta": 0.25, "lambda_d": 1.0, "kappa": 1, "prior_log_alpha": 0.0, "schedule": "monotonic", "lambda_g": 0.1,
           **config}
    split = {"bleu": bleu, "kept_fraction": kept, "vectors": sum(sentence_vectors) / 3, "tokens": 10.0, "pseudo_count": 3.0 * kept,
             "kl_g": 0.5, "kl_d": 0.1, "sentence_tokens": [5, 10, 15], "sentence_vectors": sentence_vectors}
    return {"config": cfg, "train": {"seconds": 60.0}, "test": split, "ood": split,
            **({"pseudo_counts": {"quantiles": {"q50": 0.2}, "share_at_most_threshold": 0.4, "effective_share": 0.8}} if bottleneck == "nvib" else {})}


def test_rows_reading_and_csv_of_the_sweep(tmp_path):
    res = {"data": {"test": 3, "ood": 3}, "threshold": 0.1, "seconds": 60.0,
           "information": {"nats": [20.0, 30.0, 70.0], "tokens": [5, 10, 15]},
           "models": {"autoencoder": _model("none", 1.0, 98.0, [5, 10, 15]), "nvae-sparse": _model("nvib", 0.5, 90.0, [3, 4, 8]),
                      "nvae-full": _model("nvib", 1.0, 95.0, [5, 10, 15], delta=1.0)}}
    rows = sweep_rows(res)
    assert [r["model"] for r in rows] == ["autoencoder", "nvae-sparse", "nvae-full"]
    assert rows[0]["delta"] is None and rows[1]["pseudo_count_per_token"] == pytest.approx(0.15) and rows[1]["prior_alpha"] == 1.0
    rel = length_relation(res)
    assert set(rel) == {"nvae-sparse", "nvae-full"} and rel["nvae-full"]["length"] == pytest.approx(1.0)
    assert rel["nvae-sparse"]["slope"] == pytest.approx(0.5)
    text = sweep_section(res, tmp_path / "figures", tmp_path / "results")
    csv = (tmp_path / "results" / "nvae_sweep.csv").read_text().splitlines()
    assert csv[0].startswith("model,bottleneck,delta,lambda_d,kappa") and "test_bleu" in csv[0] and "kept" in csv[0].split(",")
    assert "The goal is reached by 1 setting(s): nvae-sparse keeps 50% of the vectors at test BLEU 90.0" in text
    assert "effective number of vectors is 80%" in text and "effective_share" in csv[0] and "| - |" in text  # the autoencoder has none
    assert (tmp_path / "figures" / "nvae_sweep_tradeoff.png").exists() and (tmp_path / "figures" / "nvae_sweep_length.png").exists()


def test_the_sweep_covers_the_issues_settings():
    cfgs = [o for b, o in SWEEP.values() if b == "nvib"]
    assert {c.get("delta", 1.0) for c in cfgs} >= {0.1, 0.25, 0.5, 1.0}
    assert {c.get("lambda_d", 0.1) for c in cfgs} >= {0.1, 1.0, 10.0}
    assert any(c.get("kappa", 1) > 1 for c in cfgs) and any("prior_log_alpha" in c for c in cfgs)
    assert math.exp(SWEEP["nvae-d0.25-l1-p0.1"][1]["prior_log_alpha"]) == pytest.approx(0.1)
    assert {b for b, _ in SWEEP.values()} == {"nvib", "none", "pooled"}


def test_effective_count_is_the_exponentiated_entropy_of_the_normalised_pseudo_counts():
    """Closed forms: n equal pseudo-counts give n (whatever their size), one holding (nearly) all the
    mass gives 1; a general vector against torch.distributions.Categorical's entropy."""
    assert effective_count(torch.full((7,), 0.03, dtype=torch.float64)) == pytest.approx(7.0, rel=1e-12)
    assert effective_count(torch.tensor([5.0, 1e-300, 1e-300], dtype=torch.float64)) == pytest.approx(1.0, rel=1e-12)
    a = torch.tensor([0.05, 0.2, 1.5, 0.3], dtype=torch.float64)
    h = torch.distributions.Categorical(probs=a / a.sum()).entropy()
    assert effective_count(a) == pytest.approx(float(h.exp()), rel=1e-12)
    assert effective_count(a.float()) == pytest.approx(float(h.exp()), rel=1e-6)


def test_sweep_evaluation_is_cached_per_model_and_the_pseudo_counts_are_per_sentence(tmp_path, monkeypatch):
    """A tiny NVAE: the per-sentence pseudo-counts concatenate to token_pseudo_counts and have one entry per
    token; the sweep's evaluation is computed once per (config, training, data) and read back after."""
    from nvformer.models import NVAE, NVAEConfig
    from nvformer_studies.common.tokenizer import train_tokenizer
    from nvformer_studies.nvae import study
    from nvformer_studies.nvae import training as vae

    texts = ["the cat sat on the mat .", "a dog ran far away from home today .", "birds sing ."]
    tok = train_tokenizer(texts * 5, 300)
    torch.manual_seed(0)
    model = NVAE(NVAEConfig(vocab_size=len(tok), d_model=16, heads=2, encoder_layers=1, decoder_layers=1, ffn=32, max_length=24)).eval()
    per = vae.sentence_pseudo_counts(model, tok, texts)
    assert [len(x) for x in per] == [len(ids) for ids in vae.encode_texts(tok, texts, 24)]
    assert torch.equal(torch.cat(per), vae.token_pseudo_counts(model, tok, texts))
    calls = []
    real = vae.evaluate
    monkeypatch.setattr(vae, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = study._sweep_eval(tmp_path, model, {"seconds": 1.0, "steps": (1, 2)}, tok, texts, texts[:2])
    again = study._sweep_eval(tmp_path, model, {"seconds": 1.0, "steps": (1, 2)}, tok, texts, texts[:2])
    assert len(calls) == 2 and again == first  # test and OOD once; the second call reads the cache (tuples read back as lists)
    want = sum(effective_count(x) / len(x) for x in per) / len(per)
    assert first["pseudo_counts"]["effective_share"] == pytest.approx(want, rel=1e-12)
    study._sweep_eval(tmp_path, model, {"seconds": 2.0, "steps": (1, 2)}, tok, texts, texts[:2])
    assert len(calls) == 4  # another training summary: evaluated again


def test_the_sweep_has_its_own_budget_and_refuses_unknown_models_before_any_work(tmp_path):
    from nvformer_studies.nvae import study

    st, full = study.sweep_settings(False), study.settings(False)
    assert st["train"]["epochs"] == study.SWEEP_EPOCHS < full["train"]["epochs"]
    assert {k: v for k, v in st.items() if k != "train"} == {k: v for k, v in full.items() if k != "train"}
    assert study.sweep_settings(True) == study.settings(True)
    with pytest.raises(ValueError, match="unknown model.*nvae-d7"):
        study.run_nvae_sweep(tmp_path, ["autoencoder", "nvae-d7"])
    assert not any(tmp_path.iterdir())  # nothing trained, no tokenizer written


def test_the_dirichlet_kl_pushes_every_tokens_pseudo_count_by_the_same_factor():
    """KL_D depends on the pseudo-counts through their total only, so d KL_D / d log a_i = a_i f'(A):
    the relative push is the same for every token of a sentence (a tiny random NVAE, float64 sums)."""
    from nvformer.models import NVAE, NVAEConfig
    from nvformer_studies.common.tokenizer import train_tokenizer
    from nvformer_studies.nvae import training as vae

    texts = ["the cat sat on the mat .", "a dog ran far away from home today .", "birds sing in the old tree by the river ."]
    tok = train_tokenizer(texts * 5, 300)
    torch.manual_seed(0)
    model = NVAE(NVAEConfig(vocab_size=len(tok), d_model=16, heads=2, encoder_layers=1, decoder_layers=1, ffn=32, max_length=24, delta=0.25))
    push = vae.kl_d_push(model, tok, texts)
    assert push["spread_max"] < 1e-6 and push["relative_push_mean"] != 0.0
    assert all(p.grad is None for p in model.parameters())

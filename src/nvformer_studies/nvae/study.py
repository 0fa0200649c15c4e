"""The NVAE study (issue 7): NVAE vs a plain Transformer autoencoder vs a pooled Gaussian VAE
(docs/RESULTS.md section "nvae"; tables and text: :mod:`nvformer_studies.nvae.report`).

Data: sentences (5-30 words) of WikiText-2 ``valid.txt`` + ``test.txt`` (Merity et al. 2016; the two
files we have), shuffled with split seed 0 into 500 validation, 1000 test and the rest training
sentences (:func:`~nvformer_studies.nvae.training.wikitext_sentences`); out-of-domain: English
sentences (5-30 words) of ``mt-domains/law/test.en`` (seed 0). Tokenizer: byte-level BPE, 4000
subwords, trained on the training sentences. Models (:data:`MODELS`; ``NVAEConfig`` defaults: d_model
128, 4 heads, 2+2 layers, FFN 512, dropout 0.1; KL weights lambda_G = lambda_D = 0.1 ("nvae-d1":
lambda_D = 1; "nvae-strong": both 1) with monotonic annealing over 400 steps, posteriors starting
at 0.1 of the prior standard deviation) trained with :func:`~nvformer_studies.nvae.training.train`
(``TrainConfig`` defaults but 12 epochs: batch 64, AdamW 1e-3, seed 0).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from nvformer.models import NVAE, NVAEConfig

from ..common.tokenizer import train_tokenizer
from . import training as vae

__all__ = ["MODELS", "SWEEP", "TS", "load_or_train", "run_nvae_study", "run_nvae_sweep", "settings"]

# name -> (bottleneck, NVAEConfig overrides): the NVAE at the default KL weights, with a ten times stronger Dirichlet KL
# only, and with both KL terms ten times stronger (the paper trades reconstruction for fewer latent vectors through
# lambda_G / lambda_D), and the two baselines.
MODELS = {"nvae": ("nvib", {}), "nvae-d1": ("nvib", {"lambda_d": 1.0}), "nvae-strong": ("nvib", {"lambda_g": 1.0, "lambda_d": 1.0}),
          "autoencoder": ("none", {}), "pooled-vae": ("pooled", {})}
TS = [0.0, 0.25, 0.5, 0.75, 1.0]

# The sparsity sweep (issue 17): the settings that decide how many latent vectors an NVAE keeps (pseudo-count above the
# authors' threshold 0.1). KL_D pulls the total pseudo-count A towards B = alpha_p + delta (n - 1), so delta sets the
# budget per token (at delta = 1 every token can keep a pseudo-count of about 1, far above 0.1); lambda_D sets how hard
# the pull is, kappa how many samples each component gets, prior_log_alpha the prior's share. The autoencoder and the
# pooled VAE are the reference points; "nvae-d1" is MODELS' model of that name (same config, same cache).
SWEEP = {
    "autoencoder": ("none", {}),
    "pooled-vae": ("pooled", {}),
    "nvae-d1": ("nvib", {"lambda_d": 1.0}),
    "nvae-d0.5-l1": ("nvib", {"delta": 0.5, "lambda_d": 1.0}),
    "nvae-d0.25-l1": ("nvib", {"delta": 0.25, "lambda_d": 1.0}),  # close to Behjati et al. (EMNLP 2023 Findings)
    "nvae-d0.1-l1": ("nvib", {"delta": 0.1, "lambda_d": 1.0}),
    "nvae-d0.25-l0.1": ("nvib", {"delta": 0.25, "lambda_d": 0.1}),
    "nvae-d0.25-l10": ("nvib", {"delta": 0.25, "lambda_d": 10.0}),
    "nvae-d0.1-l10": ("nvib", {"delta": 0.1, "lambda_d": 10.0}),
    "nvae-d0.25-l1-k4": ("nvib", {"delta": 0.25, "lambda_d": 1.0, "kappa": 4}),
    "nvae-d0.25-l1-cyclic": ("nvib", {"delta": 0.25, "lambda_d": 1.0, "schedule": "cyclic"}),
    "nvae-d0.25-l1-p0.1": ("nvib", {"delta": 0.25, "lambda_d": 1.0, "prior_log_alpha": -2.302585092994046}),  # alpha_p = 0.1
}


def settings(smoke: bool) -> dict:
    """The study's sizes: the docs/RESULTS.md budget, or a tiny end-to-end check (``smoke``)."""
    if smoke:
        return {"model": dict(d_model=32, heads=2, encoder_layers=1, decoder_layers=1, ffn=64, max_length=48, warmup=10, cycle=10),
                "train": dict(epochs=1, batch_size=16, log_every=5, save_every=20, max_steps=12), "vocab": 400, "n_train": 200,
                "n_eval": 16, "n_samples": 16, "n_pairs": 4, "lm_epochs": 1}
    return {"model": {}, "train": {"epochs": 12}, "vocab": 4000, "n_train": None, "n_eval": 500, "n_samples": 1000, "n_pairs": 100, "lm_epochs": 3}


def load_or_train(name: str, bottleneck: str, overrides: dict, tok, sents, st: dict, out: Path) -> tuple[NVAE, dict]:
    """The trained model of ``name`` (cached in ``out/name`` while the configs match)."""
    cfg = NVAEConfig(vocab_size=len(tok), bottleneck=bottleneck, **{**st["model"], **overrides})
    tcfg = vae.TrainConfig(**st["train"])
    folder = out / name
    if (folder / vae.CONFIG_FILE).exists():
        model, _, meta = vae.load_model(folder)
        if meta["config"] == cfg.to_dict() and meta["train"]["train"] == asdict(tcfg):
            return model, meta["train"]
    torch.manual_seed(tcfg.seed)
    model = NVAE(cfg)
    train = sents["train"] if st["n_train"] is None else sents["train"][: st["n_train"]]
    summary = vae.train(model, tok, train, folder, tcfg, resume=True)
    return model.eval(), summary


def _tokenizer(out: Path, sents: dict, st: dict):
    """The BPE tokenizer of the training sentences, trained once and cached in ``out/tokenizer``."""
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tok_dir)
    tok = train_tokenizer(sents["train"], st["vocab"])
    tok.save_pretrained(tok_dir)
    return tok


def run_nvae_sweep(out: Path, names: list[str], *, smoke: bool = False, train_only: bool = False) -> dict | None:
    """Train (or load, :func:`load_or_train`) the sweep's models ``names`` (keys of :data:`SWEEP`) in
    ``out`` (the same folder and tokenizer as the NVAE study, so shared models are trained once),
    evaluate their reconstruction and latent size on the test and the law sentences and write
    ``out/sweep.json``; returns the results (None with ``train_only``)."""
    st = settings(smoke)
    t0 = time.time()
    sents = vae.wikitext_sentences(seed=0)
    ood = vae.ood_sentences("law", n=st["n_eval"], seed=0)
    tok = _tokenizer(out, sents, st)
    models = {name: load_or_train(name, *SWEEP[name], tok, sents, st, out) for name in names}
    if train_only:
        return None
    test = sents["test"][: st["n_eval"]]
    lm = vae.train_lm(tok, sents["train"], epochs=st["lm_epochs"])
    nats, lm_tokens = vae.lm_sentence_nll(lm, tok, test)
    res = {"data": {"train": len(sents["train"]), "test": len(test), "ood": len(ood), "ood_domain": "law"},
           "information": {"nats": nats, "tokens": lm_tokens, "lm": "2-layer GPT-2 trained on the training sentences"},
           "threshold": 0.1, "models": {}, "smoke": smoke}
    for name, (model, summary) in models.items():
        r = {"config": model.config.to_dict(), "train": summary}
        for split, texts in (("test", test), ("ood", ood)):
            ev = vae.evaluate(model, tok, texts)
            r[split] = {k: v for k, v in ev.items() if k not in ("reconstructions", "references")}
        if model.config.bottleneck == "nvib":
            a = vae.token_pseudo_counts(model, tok, test)
            q = torch.quantile(a, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)).tolist()
            r["pseudo_counts"] = {"quantiles": dict(zip(("q10", "q25", "q50", "q75", "q90"), q)),
                                  "share_at_most_threshold": float((a <= res["threshold"]).double().mean()), "tokens": int(a.numel())}
        res["models"][name] = r
    res["seconds"] = time.time() - t0
    (out / "sweep.json").write_text(json.dumps(res, indent=2))
    return res


def run_nvae_study(out: Path, names: list[str], *, smoke: bool = False, train_only: bool = False) -> dict | None:
    """Train (or load, see :func:`load_or_train`) the models ``names`` (keys of :data:`MODELS`) in
    ``out``, evaluate them and write ``out/results.json``; returns the results (None with
    ``train_only``). The tokenizer is trained once and cached in ``out/tokenizer``."""
    st = settings(smoke)
    t0 = time.time()
    sents = vae.wikitext_sentences(seed=0)
    ood = vae.ood_sentences("law", n=st["n_eval"], seed=0)
    tok = _tokenizer(out, sents, st)
    models = {}
    for name in names:
        models[name] = load_or_train(name, *MODELS[name], tok, sents, st, out)
    if train_only:
        return None
    test = sents["test"][: st["n_eval"]]
    lm = vae.train_lm(tok, sents["train"], epochs=st["lm_epochs"])
    n_s = st["n_samples"]
    real_lm = vae.train_lm(tok, sents["train"][:n_s], epochs=st["lm_epochs"])
    res = {"data": {"train": len(sents["train"]), "valid": len(sents["valid"]), "test": len(test), "ood": len(ood), "ood_domain": "law"},
           "reference": {"lm_ppl_test": vae.lm_perplexity(lm, tok, test), "lm_ppl_ood": vae.lm_perplexity(lm, tok, ood),
                         "reverse_ppl_real": vae.lm_perplexity(real_lm, tok, test)},
           "models": {}, "smoke": smoke}
    half = len(test) // 2
    for name, (model, summary) in models.items():
        r = {"config": model.config.to_dict(), "train": summary, "parameters": sum(p.numel() for p in model.parameters())}
        for split, texts in (("test", test), ("ood", ood)):
            ev = vae.evaluate(model, tok, texts)
            r[split] = {k: v for k, v in ev.items() if k not in ("reconstructions", "references")}
            r[split]["examples"] = [{"input": a, "output": b} for a, b in zip(ev["references"][:5], ev["reconstructions"][:5])]
        if model.config.bottleneck != "none":
            samples = tok.batch_decode(model.sample_prior(n_s, torch.Generator().manual_seed(0)), skip_special_tokens=True)
            nonempty = [s for s in samples if s.strip()] or ["."]
            rev = vae.train_lm(tok, nonempty, epochs=st["lm_epochs"])
            r["prior"] = {"samples": len(samples), "empty": len(samples) - len([s for s in samples if s.strip()]),
                          "distinct": len(set(samples)) / len(samples), "mean_words": sum(len(s.split()) for s in samples) / len(samples),
                          "forward_ppl": vae.lm_perplexity(lm, tok, nonempty), "reverse_ppl": vae.lm_perplexity(rev, tok, test),
                          "examples": samples[:8]}
        r["interpolation"] = vae.interpolation_curve(model, tok, test[: st["n_pairs"]], test[half : half + st["n_pairs"]], TS)
        h = len(ood) // 2
        r["interpolation_ood"] = vae.interpolation_curve(model, tok, ood[: st["n_pairs"]], ood[h : h + st["n_pairs"]], TS)
        res["models"][name] = r
    res["seconds"] = time.time() - t0
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res

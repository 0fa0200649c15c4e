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

__all__ = ["MODELS", "SWEEP", "TS", "load_or_train", "run_nvae_study", "run_nvae_sweep", "settings", "sweep_settings"]

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
# pooled VAE are the reference points. Trained for SWEEP_EPOCHS epochs (half the study's budget) in runs/nvae/sweep/.
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


SWEEP_EPOCHS = 6  # the sweep's training budget: half the NVAE study's 12 epochs, so that the sweep fits the CPU budget


def sweep_settings(smoke: bool) -> dict:
    """The sweep's sizes: :func:`settings` with :data:`SWEEP_EPOCHS` epochs of training (the smoke run's as is)."""
    st = settings(smoke)
    return st if smoke else st | {"train": st["train"] | {"epochs": SWEEP_EPOCHS}}


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
    ``out/sweep`` (:func:`sweep_settings`: :data:`SWEEP_EPOCHS` epochs; the NVAE study's tokenizer), evaluate their reconstruction and latent size on the test and the law sentences and write
    ``out/sweep.json``; returns the results (None with ``train_only``). Each model's evaluation is
    cached beside it (``sweep-eval.json``) and the sentences' information in ``out`` (so models can
    be evaluated as they finish, and a later call over more models only evaluates the new ones)."""
    unknown = [n for n in names if n not in SWEEP]
    if unknown:
        raise ValueError(f"run_nvae_sweep: unknown model(s) {', '.join(unknown)}; the sweep's: {', '.join(SWEEP)}")
    st = sweep_settings(smoke)
    t0 = time.time()
    sents = vae.wikitext_sentences(seed=0)
    ood = vae.ood_sentences("law", n=st["n_eval"], seed=0)
    tok = _tokenizer(out, sents, st)
    models = {name: load_or_train(name, *SWEEP[name], tok, sents, st, out / "sweep") for name in names}
    if train_only:
        return None
    test = sents["test"][: st["n_eval"]]
    nats, lm_tokens = _information(out, tok, sents["train"], test, st)
    res = {"epochs": st["train"]["epochs"], "data": {"train": len(sents["train"]), "test": len(test), "ood": len(ood), "ood_domain": "law"},
           "information": {"nats": nats, "tokens": lm_tokens, "lm": "2-layer GPT-2 trained on the training sentences"},
           "threshold": THRESHOLD, "models": {}, "smoke": smoke}
    for name, (model, summary) in models.items():
        folder = out / "sweep" / name
        res["models"][name] = _sweep_eval(folder, model, summary, tok, test, ood)
        if model.config.bottleneck == "nvib":
            res["models"][name]["kl_d_push"] = _cached(folder / "kl-d-push.json", {"config": model.config.to_dict(), "train": summary, "test": test},
                                                       lambda: vae.kl_d_push(model, tok, test))
    res["seconds"] = time.time() - t0
    (out / "sweep.json").write_text(json.dumps(res, indent=2))
    return res


THRESHOLD = 0.1  # the authors' evaluation threshold of a kept component's pseudo-count


def _cached(path: Path, key: dict, compute) -> dict:
    """``compute()``, cached in the JSON file ``path`` under ``key`` (recomputed when the key differs);
    returned as read back from JSON either way."""
    key = json.loads(json.dumps(key))  # tuples as lists, as read back
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["value"]
    value = json.loads(json.dumps(compute()))
    path.write_text(json.dumps({"key": key, "value": value}, indent=2))
    return value


def _information(out: Path, tok, train: list[str], test: list[str], st: dict) -> tuple[list[float], list[int]]:
    """Per test sentence, its information in nats and its tokens under a small GPT-2 trained on ``train``."""
    key = {"train": len(train), "test": test, "lm_epochs": st["lm_epochs"], "vocab": len(tok)}
    value = _cached(out / "sweep-information.json", key,
                    lambda: dict(zip(("nats", "tokens"), vae.lm_sentence_nll(vae.train_lm(tok, train, epochs=st["lm_epochs"]), tok, test))))
    return value["nats"], value["tokens"]


def _sweep_eval(folder: Path, model: NVAE, summary: dict, tok, test: list[str], ood: list[str]) -> dict:
    """One sweep model's evaluation (cached in ``folder/sweep-eval.json`` for its config, training and data):
    reconstruction and kept vectors on ``test`` and ``ood``; for an NVAE the quantiles of its token
    pseudo-counts, their share at most :data:`THRESHOLD`, and the mean effective number of components
    per sentence (:func:`~nvformer_studies.nvae.training.effective_count`) as a share of its tokens."""

    def compute() -> dict:
        r = {"config": model.config.to_dict(), "train": summary}
        for split, texts in (("test", test), ("ood", ood)):
            ev = vae.evaluate(model, tok, texts)
            r[split] = {k: v for k, v in ev.items() if k not in ("reconstructions", "references")}
        if model.config.bottleneck == "nvib":
            per = vae.sentence_pseudo_counts(model, tok, test)
            a = torch.cat(per)
            q = torch.quantile(a, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)).tolist()
            r["pseudo_counts"] = {"quantiles": dict(zip(("q10", "q25", "q50", "q75", "q90"), q)),
                                  "share_at_most_threshold": float((a <= THRESHOLD).double().mean()), "tokens": int(a.numel()),
                                  "effective_share": sum(vae.effective_count(x) / len(x) for x in per) / len(per)}
        return r

    key = {"config": model.config.to_dict(), "train": summary, "test": test, "ood": ood, "threshold": THRESHOLD}
    return _cached(folder / "sweep-eval.json", key, compute)


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

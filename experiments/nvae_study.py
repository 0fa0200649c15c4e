"""The NVAE study (issue 7): NVAE vs a plain Transformer autoencoder vs a pooled Gaussian VAE.

    .venv/bin/python experiments/nvae_study.py                 # train the three models (cached), evaluate, write RESULTS
    .venv/bin/python experiments/nvae_study.py --train-only    # only train / load runs/nvae/*
    .venv/bin/python experiments/nvae_study.py --reuse         # rewrite the section from runs/nvae/results.json
    .venv/bin/python experiments/nvae_study.py --smoke --out runs/nvae-smoke --no-results   # tiny end-to-end check

Data: sentences (5-30 words) of WikiText-2 ``valid.txt`` + ``test.txt`` (Merity et al. 2016; the two
files we have), shuffled with split seed 0 into 500 validation, 1000 test and the rest training
sentences (``nvformer.vae.wikitext_sentences``); out-of-domain: English sentences (5-30 words) of
``mt-domains/law/test.en`` (seed 0). Tokenizer: byte-level BPE, 4000 subwords, trained on the
training sentences. Models (``NVAEConfig`` defaults: d_model 128, 4 heads, 2+2 layers, FFN 512,
dropout 0.1; KL weights lambda_G = lambda_D = 0.1 ("nvae-d1": lambda_D = 1; "nvae-strong": both 1) with monotonic annealing over 400 steps, posteriors
starting at 0.1 of the prior standard deviation) trained with
``nvformer.vae.train`` (``TrainConfig`` defaults but 12 epochs: batch 64, AdamW 1e-3, seed 0).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "experiments"))

from identity import write_section  # noqa: E402
from nvformer import vae  # noqa: E402
from nvformer.models import NVAE, NVAEConfig  # noqa: E402
from nvformer.mt import train_tokenizer  # noqa: E402
from nvformer.plots import line_panels  # noqa: E402

# name -> (bottleneck, NVAEConfig overrides): the NVAE at the default KL weights, with a ten times stronger Dirichlet KL
# only, and with both KL terms ten times stronger (the paper trades reconstruction for fewer latent vectors through
# lambda_G / lambda_D), and the two baselines.
MODELS = {"nvae": ("nvib", {}), "nvae-d1": ("nvib", {"lambda_d": 1.0}), "nvae-strong": ("nvib", {"lambda_g": 1.0, "lambda_d": 1.0}),
          "autoencoder": ("none", {}), "pooled-vae": ("pooled", {})}
TS = [0.0, 0.25, 0.5, 0.75, 1.0]


def settings(smoke: bool) -> dict:
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "nvae"))
    parser.add_argument("--results", default=str(ROOT / "docs" / "RESULTS.md"))
    parser.add_argument("--no-results", action="store_true")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--models", default=",".join(MODELS), help="comma list of " + ", ".join(MODELS))
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.reuse:
        res = json.loads((out / "results.json").read_text())
    else:
        res = run(args, out)
        if res is None:
            return
    text = section(res, out, out / "figures" if args.no_results else ROOT / "docs" / "figures")
    print(text)
    if not args.no_results:
        write_section(text, "nvae", Path(args.results))


def run(args, out: Path) -> dict | None:
    st = settings(args.smoke)
    t0 = time.time()
    sents = vae.wikitext_sentences(seed=0)
    ood = vae.ood_sentences("law", n=st["n_eval"], seed=0)
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir)
    else:
        tok = train_tokenizer(sents["train"], st["vocab"])
        tok.save_pretrained(tok_dir)
    names = [n.strip() for n in args.models.split(",")]
    models = {}
    for name in names:
        models[name] = load_or_train(name, *MODELS[name], tok, sents, st, out)
    if args.train_only:
        return None
    test = sents["test"][: st["n_eval"]]
    lm = vae.train_lm(tok, sents["train"], epochs=st["lm_epochs"])
    n_s = st["n_samples"]
    real_lm = vae.train_lm(tok, sents["train"][:n_s], epochs=st["lm_epochs"])
    res = {"data": {"train": len(sents["train"]), "valid": len(sents["valid"]), "test": len(test), "ood": len(ood), "ood_domain": "law"},
           "reference": {"lm_ppl_test": vae.lm_perplexity(lm, tok, test), "lm_ppl_ood": vae.lm_perplexity(lm, tok, ood),
                         "reverse_ppl_real": vae.lm_perplexity(real_lm, tok, test)},
           "models": {}, "smoke": args.smoke}
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


def _fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def figures(res: dict, out: Path, fig_dir: Path) -> list[str]:
    names = []
    panels = {name: {f"BLEU to {end}{' (law)' if key.endswith('ood') else ''}": (r[key]["t"], r[key][f"bleu_{end}"])
                     for key in ("interpolation", "interpolation_ood") for end in ("a", "b")} for name, r in res["models"].items()}
    names.append(line_panels(panels, fig_dir / "nvae_interpolation.png", xlabel="t", ylabel="corpus BLEU").name)
    curves = {}
    for name in res["models"]:
        log = out / name / vae.LOG_FILE
        if log.exists():
            rows = list(csv.DictReader(log.open()))
            curves[name] = ([int(r["step"]) for r in rows], [float(r["recon_per_token"]) for r in rows])
    if curves:
        names.append(line_panels({"training reconstruction loss": curves}, fig_dir / "nvae_training.png", xlabel="step",
                                 ylabel="nats per token (train batches)", width=5.5).name)
    return names


def reading(res: dict) -> str:
    """The paper's expected shape checked against the recorded numbers (criteria stated inline)."""
    m = res["models"]
    if "autoencoder" not in m:
        return ""
    ae = m["autoencoder"]["test"]
    nvaes = [n for n, r in m.items() if r["config"]["bottleneck"] == "nvib"]
    parts = []
    for n in nvaes:
        t = m[n]["test"]
        close = t["bleu"] >= 0.8 * ae["bleu"]
        parts.append(f"{n} (lambda_G {m[n]['config']['lambda_g']:g}, lambda_D {m[n]['config']['lambda_d']:g}): test BLEU {t['bleu']:.1f} vs the "
                     f"autoencoder's {ae['bleu']:.1f} ({'within' if close else 'not within'} 20% of it), {100 * t['kept_fraction']:.0f}% of the "
                     f"token components kept, KL_G {t['kl_g']:.3f}")
    text = "**Reading (the recorded run).** " + "; ".join(parts) + "."
    if "pooled-vae" in m:
        pb = m["pooled-vae"]["test"]["bleu"]
        pp = m["pooled-vae"].get("prior") or {}
        generic = pb < 10 and pp.get("forward_ppl", float("inf")) < res["reference"]["lm_ppl_test"]
        text += f" Pooled VAE: test BLEU {pb:.1f}" + (
            " (one vector carries little of the sentence: its reconstructions and prior samples are generic, high-probability "
            f"text, hence a forward perplexity of its samples ({pp['forward_ppl']:.1f}) below that of real test sentences "
            f"({res['reference']['lm_ppl_test']:.1f}))." if generic else ".")
    compressing = [n for n in nvaes if m[n]["test"]["kept_fraction"] < 0.9]
    good = [n for n in compressing if m[n]["test"]["bleu"] >= 0.8 * ae["bleu"]]
    text += (" The paper's expected shape (reconstruction close to the autoencoder with fewer vectors) "
             + (f"holds for {', '.join(good)}." if good else
                "is not reproduced: " + ("no setting prunes 10% or more of the vectors" if not compressing else
                                         f"{', '.join(compressing)} prune(s) vectors but lose(s) reconstruction") + "."))
    k = TS.index(0.25) if 0.25 in TS else None
    if k is not None:
        text += (" Interpolation, BLEU of the t = 0.25 / 0.75 decodes to the far end (higher = a more gradual path): "
                 + ", ".join(f"{n} {r['interpolation']['bleu_b'][k]:.1f} / {r['interpolation']['bleu_a'][len(TS) - 1 - k]:.1f}"
                             for n, r in m.items()) + ".")
    priors = {n: r["prior"] for n, r in m.items() if r.get("prior")}
    if priors:
        best = min(priors, key=lambda n: priors[n]["reverse_ppl"])
        text += (" Prior samples, reverse perplexity (lower = samples closer to real text; real-data reference "
                 f"{res['reference']['reverse_ppl_real']:.1f}): " + ", ".join(f"{n} {p['reverse_ppl']:.1f}" for n, p in priors.items())
                 + f"; the most usable prior by this measure is {best}'s; distinct samples: "
                 + ", ".join(f"{n} {100 * p['distinct']:.0f}%" for n, p in priors.items()) + ".")
    return text


def _config_line(res: dict) -> str:
    c = next(iter(res["models"].values()))["config"]
    t = next(iter(res["models"].values()))["train"]["train"]
    return (f"Models: d_model {c['d_model']}, {c['heads']} heads, {c['encoder_layers']}+{c['decoder_layers']} layers, FFN {c['ffn']}, "
            f"dropout {c['dropout']}, max {c['max_length']} tokens; KL weights lambda_G = {c['lambda_g']}, lambda_D = {c['lambda_d']} unless "
            f"the model's name says otherwise (" + ", ".join(f"{n}: lambda_G {r['config']['lambda_g']:g}, lambda_D {r['config']['lambda_d']:g}"
                                                         for n, r in res["models"].items() if r["config"]["bottleneck"] == "nvib") + ") "
            f"({c['schedule']} annealing over {c['warmup']} steps; KL_G and the pooled KL averaged over dimensions, reconstruction = "
            f"token-mean cross-entropy); NVIB delta {c['delta']}, kappa {c['kappa']}, prior N(0, {c['prior_var']} I) with log alpha_p "
            f"{c['prior_log_alpha']}, posteriors initialised at {c['init_stdev']} of the prior standard deviation. Training: "
            f"{t['epochs']} epochs, batch {t['batch_size']}, AdamW {t['lr']} (warm-up {t['warmup_steps']} steps, linear decay), seed {t['seed']}, "
            "one process, 1 thread.")


def section(res: dict, out: Path, fig_dir: Path) -> str:
    ref = res["reference"]
    d = res["data"]
    lines = ["## NVAE: Transformer VAE with an NVIB latent (WikiText-2 sentences)", "",
             "Command: `.venv/bin/python experiments/nvae_study.py` (cached models in `runs/nvae/`; "
             f"evaluation {res['seconds'] / 60:.0f} min; training times below). Data: WikiText-2 sentences (5-30 words) of `valid.txt` + "
             f"`test.txt` (Merity et al. 2016), split seed 0: {d['train']} training, {d['valid']} validation, {d['test']} test sentences "
             f"used here; out of domain: {d['ood']} English sentences of `mt-domains/law/test.en` (seed 0). Tokenizer: byte-level BPE "
             "(4000) trained on the training sentences. Decoding: greedy from the posterior mean (evaluation form); NVAE components "
             "with pseudo-count <= 0.1 are pruned (the authors' threshold).", "",
             _config_line(res), "",
             "| model | params | training | test BLEU | test token acc | test nats/token | KL_G | KL_D | latent vectors | kept | total pseudo-count "
             "| OOD BLEU | OOD token acc | OOD vectors | OOD kept |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in res["models"].items():
        t, o, tr = r["test"], r["ood"], r["train"]
        lines.append(f"| {name} | {r['parameters'] / 1e6:.2f}M | {tr['steps']} steps, {tr['seconds'] / 60:.0f} min | {t['bleu']:.1f} | "
                     f"{100 * t['token_accuracy']:.1f}% | {t['recon_per_token']:.2f} | {t['kl_g']:.3f} | {t['kl_d']:.3f} | "
                     f"{t['vectors']:.1f} / {t['tokens']:.1f} tokens | {100 * t['kept_fraction']:.0f}% | {_fmt(t['pseudo_count'], '.1f')} | "
                     f"{o['bleu']:.1f} | {100 * o['token_accuracy']:.1f}% | {o['vectors']:.1f} / {o['tokens']:.1f} | {100 * o['kept_fraction']:.0f}% |")
    lines += ["", "Prior samples (latents drawn from the prior, greedy decoding; NVAE: number of vectors drawn from the training "
              "length distribution). Forward perplexity: samples scored by a 2-layer GPT-2 trained on the training sentences "
              f"(real test sentences: {ref['lm_ppl_test']:.1f}; law: {ref['lm_ppl_ood']:.1f}). Reverse perplexity: a GPT-2 of the same "
              f"size trained on the samples, scored on the real test sentences (trained on as many real training sentences instead: "
              f"{ref['reverse_ppl_real']:.1f}). The autoencoder has no prior.", "",
              "| model | samples | empty | distinct | mean words | forward ppl | reverse ppl |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in res["models"].items():
        p = r.get("prior")
        if p:
            lines.append(f"| {name} | {p['samples']} | {p['empty']} | {100 * p['distinct']:.0f}% | {p['mean_words']:.1f} | "
                         f"{p['forward_ppl']:.1f} | {p['reverse_ppl']:.1f} |")
    lines += ["", "Interpolation (NVAE and autoencoder: the union of both sentences' components with mixture weights pi_a (1 - t) "
              "and pi_b t; pooled VAE: z = (1 - t) mu_a + t mu_b) between test sentence pairs: corpus BLEU of the decodes to each end.", "",
              "| model | " + " | ".join(f"t={t:g} (a / b)" for t in TS) + " |", "| --- |" + " --- |" * len(TS)]
    for key, where in (("interpolation", "WikiText test"), ("interpolation_ood", "law")):
        for name, r in res["models"].items():
            c = r[key]
            lines.append(f"| {name} ({where}) | " + " | ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(c["bleu_a"], c["bleu_b"])) + " |")
    for f in figures(res, out, fig_dir):
        lines += ["", f"![{f}](figures/{f})"]
    lines += ["", reading(res)]
    lines += ["", "Examples (test reconstructions, prior samples, one interpolation path):", ""]
    for name, r in res["models"].items():
        lines.append(f"- **{name}** reconstruction: `{r['test']['examples'][0]['input']}` -> `{r['test']['examples'][0]['output']}`")
        if r.get("prior"):
            lines.append(f"  - prior samples: " + " / ".join(f"`{s}`" for s in r["prior"]["examples"][:4]))
        lines.append("  - path: " + " -> ".join(f"`{s}`" for s in r["interpolation"]["examples"]["path"]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

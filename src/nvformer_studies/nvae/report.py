"""The doc sections of the NVAE studies (docs/RESULTS.md "nvae" and "nvae-distributed"): tables,
figures and readings recomputed from their ``results.json``."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from ..common.docs import table
from ..common.plots import line_panels, pyplot, save
from .study import TS
from .training import LOG_FILE

__all__ = ["distributed_section", "figures", "length_relation", "reading", "section", "sweep_rows", "sweep_section"]


def figures(res: dict, out: Path, fig_dir: Path) -> list[str]:
    """The interpolation and training-loss figures in ``fig_dir`` (training logs read from ``out/<model>``); their file names."""
    names = []
    panels = {name: {f"BLEU to {end}{' (law)' if key.endswith('ood') else ''}": (r[key]["t"], r[key][f"bleu_{end}"])
                     for key in ("interpolation", "interpolation_ood") for end in ("a", "b")} for name, r in res["models"].items()}
    names.append(line_panels(panels, fig_dir / "nvae_interpolation.png", xlabel="t", ylabel="corpus BLEU").name)
    curves = {}
    for name in res["models"]:
        log = out / name / LOG_FILE
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
    """The models' and the training's settings, from the first model's record."""
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


def section(res: dict, out: Path, fig_dir: Path, csv_dir: Path | None = None) -> str:
    """The "nvae" section of docs/RESULTS.md from ``res`` of :func:`~nvformer_studies.nvae.study.run_nvae_study`
    (``out``: its folder; figures written to ``fig_dir``; tables through ``csv_dir`` if given)."""
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
             table([_model_row(name, r) for name, r in res["models"].items()], [
                 ("model", "{model}"), ("params", lambda r: f"{r['parameters'] / 1e6:.2f}M"),
                 ("training", lambda r: f"{r['steps']} steps, {r['train_seconds'] / 60:.0f} min"), ("test BLEU", "{test_bleu:.1f}"),
                 ("test token acc", _percent("test_token_accuracy", ".1f")), ("test nats/token", "{test_recon_per_token:.2f}"),
                 ("KL_G", "{test_kl_g:.3f}"), ("KL_D", "{test_kl_d:.3f}"), ("latent vectors", "{test_vectors:.1f} / {test_tokens:.1f} tokens"),
                 ("kept", _percent("test_kept_fraction", ".0f")), ("total pseudo-count", "{test_pseudo_count:.1f}"), ("OOD BLEU", "{ood_bleu:.1f}"),
                 ("OOD token acc", _percent("ood_token_accuracy", ".1f")), ("OOD vectors", "{ood_vectors:.1f} / {ood_tokens:.1f}"),
                 ("OOD kept", _percent("ood_kept_fraction", ".0f"))], csv_dir, "nvae")]
    lines += ["", "Prior samples (latents drawn from the prior, greedy decoding; NVAE: number of vectors drawn from the training "
              "length distribution). Forward perplexity: samples scored by a 2-layer GPT-2 trained on the training sentences "
              f"(real test sentences: {ref['lm_ppl_test']:.1f}; law: {ref['lm_ppl_ood']:.1f}). Reverse perplexity: a GPT-2 of the same "
              f"size trained on the samples, scored on the real test sentences (trained on as many real training sentences instead: "
              f"{ref['reverse_ppl_real']:.1f}). The autoencoder has no prior.", "",
              table([{"model": name, **{k: v for k, v in r["prior"].items() if k != "examples"}} for name, r in res["models"].items() if r.get("prior")],
                    {"model": "{model}", "samples": "{samples}", "empty": "{empty}", "distinct": _percent("distinct", ".0f"),
                     "mean words": "{mean_words:.1f}", "forward ppl": "{forward_ppl:.1f}", "reverse ppl": "{reverse_ppl:.1f}"}, csv_dir, "nvae-prior")]
    lines += ["", "Interpolation (NVAE and autoencoder: the union of both sentences' components with mixture weights pi_a (1 - t) "
              "and pi_b t; pooled VAE: z = (1 - t) mu_a + t mu_b) between test sentence pairs: corpus BLEU of the decodes to each end.", "",
              table([{"model": f"{name} ({where})", **{f"bleu_{end}@{t:g}": v for end in ("a", "b") for t, v in zip(TS, r[key][f"bleu_{end}"])}}
                     for key, where in (("interpolation", "WikiText test"), ("interpolation_ood", "law")) for name, r in res["models"].items()],
                    {"model": "{model}", **{f"t={t:g} (a / b)": _pair(t) for t in TS}}, csv_dir, "nvae-interpolation")]
    for f in figures(res, out, fig_dir):
        lines += ["", f"![{f}](figures/{f})"]
    lines += ["", reading(res)]
    lines += ["", "Examples (test reconstructions, prior samples, one interpolation path):", ""]
    for name, r in res["models"].items():
        lines.append(f"- **{name}** reconstruction: `{r['test']['examples'][0]['input']}` -> `{r['test']['examples'][0]['output']}`")
        if r.get("prior"):
            lines.append("  - prior samples: " + " / ".join(f"`{s}`" for s in r["prior"]["examples"][:4]))
        lines.append("  - path: " + " -> ".join(f"`{s}`" for s in r["interpolation"]["examples"]["path"]))
    return "\n".join(lines) + "\n"


def _model_row(name: str, r: dict) -> dict:
    """The table fields of one model: size, training, and its test and out-of-domain evaluation."""
    keys = ("bleu", "token_accuracy", "recon_per_token", "kl_g", "kl_d", "vectors", "tokens", "kept_fraction", "pseudo_count")
    return {"model": name, "parameters": r["parameters"], "steps": r["train"]["steps"], "train_seconds": r["train"]["seconds"],
            **{f"test_{k}": r["test"][k] for k in keys}, **{f"ood_{k}": r["ood"][k] for k in keys if k not in ("kl_g", "kl_d", "pseudo_count")}}


def _percent(key: str, spec: str):
    """A table cell: the fraction ``key`` in percent ("-" where it is None)."""
    return lambda r: "-" if r[key] is None else f"{100 * r[key]:{spec}}%"


def _pair(t: float):
    """A table cell: the BLEU of the decode at ``t`` to the first / the second sentence."""
    return lambda r: f"{r[f'bleu_a@{t:g}']:.1f} / {r[f'bleu_b@{t:g}']:.1f}"


def distributed_section(res: dict, fig_dir: Path, csv_dir: Path | None = None) -> str:
    """The "nvae-distributed" section of docs/RESULTS.md from ``res`` of
    :func:`~nvformer_studies.nvae.distributed.run_distributed` (the figure written to ``fig_dir``;
    the table through ``csv_dir`` if given)."""
    lines = ["## NVAE training on one vs two processes (Accelerate, gloo)", "",
             f"Command: `.venv/bin/python experiments/nvae_distributed.py` ({res['epochs']} epoch{'s' if res['epochs'] > 1 else ''} of the NVAE defaults on the WikiText-2 "
             "training sentences, split seed 0, global batch 64; 2 processes = `torchrun --nproc_per_node 2`, each half of every batch). "
             "Validation: the 500 validation sentences, evaluation form. Same-seed runs share data order and initialisation; they differ "
             "by the per-process latent samples and dropout masks.", "",
             table([{k: v for k, v in r.items() if k != "log"} | {"last_loss": r["log"][-1]["loss"]} for r in res["runs"]],
                   {"seed": "{seed}", "processes": "{procs}", "steps": "{steps}", "wall time": lambda r: f"{r['seconds'] / 60:.1f} min",
                    "last logged train loss": "{last_loss:.3f}", "valid nats/token": "{valid_recon_per_token:.3f}",
                    "valid token acc": _percent("valid_token_accuracy", ".1f"), "valid BLEU": "{valid_bleu:.1f}"}, csv_dir, "nvae-distributed")]
    by = {(r["seed"], r["procs"]): r for r in res["runs"]}
    diffs = [by[(s, 2)]["valid_recon_per_token"] - by[(s, 1)]["valid_recon_per_token"] for s in sorted({r["seed"] for r in res["runs"]})
             if (s, 1) in by and (s, 2) in by]
    seeds = [by[(s, 1)]["valid_recon_per_token"] for s in sorted({r["seed"] for r in res["runs"]}) if (s, 1) in by]
    if diffs:
        lines += ["", f"Validation nats/token, 2 processes minus 1 process, per seed: {', '.join(f'{d:+.3f}' for d in diffs)}; "
                      f"spread between seeds on 1 process: {max(seeds) - min(seeds):.3f}. "
                      + ("The 2-process runs match the 1-process ones within the seed spread (equal in expectation, as intended)."
                         if max(abs(d) for d in diffs) < max(seeds) - min(seeds) else
                         "The 2-process runs differ from the 1-process ones by more than the seed spread: not equal in expectation here.")]
    panels = {f"seed {s}": {f"{p} process{'es' if p > 1 else ''}": ([row["step"] for row in by[(s, p)]["log"]], [row["loss"] for row in by[(s, p)]["log"]])
                            for p in (1, 2) if (s, p) in by} for s in sorted({r["seed"] for r in res["runs"]})}
    name = line_panels(panels, fig_dir / "nvae_distributed.png", xlabel="step", ylabel="training loss (logged mean)").name
    lines += ["", f"![one vs two processes](figures/{name})", ""]
    return "\n".join(lines)


def sweep_rows(res: dict) -> list[dict]:
    """One row per model of the sparsity sweep (the fields of docs/results/nvae_sweep.csv): its
    settings, test reconstruction, the share of latent vectors kept, KL terms, law reconstruction,
    and the distribution of its token pseudo-counts."""
    rows = []
    for name, r in res["models"].items():
        c, t, o = r["config"], r["test"], r["ood"]
        nvib = c["bottleneck"] == "nvib"
        pc = r.get("pseudo_counts") or {}
        rows.append({"model": name, "bottleneck": c["bottleneck"], "delta": c["delta"] if nvib else None,
                     "lambda_d": c["lambda_d"] if nvib else None, "kappa": c["kappa"] if nvib else None,
                     "prior_alpha": math.exp(c["prior_log_alpha"]) if nvib else None, "schedule": c["schedule"] if c["bottleneck"] != "none" else None,
                     "lambda_g": c["lambda_g"] if c["bottleneck"] != "none" else None, "test_bleu": t["bleu"], "kept": t["kept_fraction"],
                     "vectors": t["vectors"], "tokens": t["tokens"], "pseudo_count_per_token": t["pseudo_count"] / t["tokens"] if nvib else None,
                     "kl_g": t["kl_g"], "kl_d": t["kl_d"], "ood_bleu": o["bleu"], "ood_kept": o["kept_fraction"],
                     "median_pseudo_count": pc.get("quantiles", {}).get("q50"), "share_at_most_threshold": pc.get("share_at_most_threshold"),
                     "effective_share": pc.get("effective_share"),
                     "train_minutes": r["train"]["seconds"] / 60})
    return rows


def _corr(x: list[float], y: list[float]) -> float | None:
    """Pearson correlation (None for a constant series)."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx, syy = sum((a - mx) ** 2 for a in x), sum((b - my) ** 2 for b in y)
    if sxx == 0 or syy == 0:
        return None
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(sxx * syy)


def _partial(x: list[float], y: list[float], z: list[float]) -> float | None:
    """Correlation of ``x`` and ``y`` with ``z`` partialled out."""
    rxy, rxz, ryz = _corr(x, y), _corr(x, z), _corr(y, z)
    if None in (rxy, rxz, ryz) or abs(rxz) >= 1 or abs(ryz) >= 1:
        return None
    return (rxy - rxz * ryz) / math.sqrt((1 - rxz**2) * (1 - ryz**2))


def length_relation(res: dict) -> dict[str, dict[str, float | None]]:
    """Per NVAE model: the correlation of the vectors it keeps per test sentence with the sentence's
    length in tokens, with its information (nats under a GPT-2 trained on the training sentences),
    and with the information once length is partialled out."""
    info = res["information"]["nats"]
    out = {}
    for name, r in res["models"].items():
        if r["config"]["bottleneck"] != "nvib":
            continue
        kept = [float(v) for v in r["test"]["sentence_vectors"]]
        length = [float(v) for v in r["test"]["sentence_tokens"]]
        out[name] = {"length": _corr(kept, length), "information": _corr(kept, info), "information_given_length": _partial(kept, info, length),
                     "slope": _slope(length, kept)}
    return out


def _slope(x: list[float], y: list[float]) -> float | None:
    """Least-squares slope of ``y`` on ``x``."""
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxx = sum((a - mx) ** 2 for a in x)
    return None if sxx == 0 else sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx


def sweep_figures(res: dict, rows: list[dict], fig_dir: Path) -> list[str]:
    """The trade-off of vectors kept against reconstruction BLEU (autoencoder and pooled VAE as
    reference points), and the vectors kept against sentence length; their file names."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    for r in rows:
        marker = {"nvib": "o", "none": "s", "pooled": "^"}[r["bottleneck"]]
        ax.plot(100 * r["kept"], r["test_bleu"], marker, ms=6, label=None if r["bottleneck"] == "nvib" else r["model"])
        ax.annotate(r["model"].removeprefix("nvae-"), (100 * r["kept"], r["test_bleu"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ae = next((r for r in rows if r["bottleneck"] == "none"), None)
    if ae is not None:
        ax.axhline(ae["test_bleu"] - 10, color="grey", lw=0.8, ls="--")
        ax.axvline(60, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="latent vectors kept (% of tokens, test)", ylabel="test reconstruction BLEU",
           title="NVAE sweep: fewer vectors against reconstruction (dashed: autoencoder - 10 BLEU; dotted: 60% kept)")
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7)
    names = [save(fig, fig_dir / "nvae_sweep_tradeoff.png").name]
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    top = 1
    for name, r in res["models"].items():
        if r["config"]["bottleneck"] != "nvib":
            continue
        bins: dict[int, list[int]] = {}
        for n, k in zip(r["test"]["sentence_tokens"], r["test"]["sentence_vectors"]):
            bins.setdefault(5 * (n // 5), []).append(k)
        xs = sorted(b for b in bins if len(bins[b]) >= 5)
        ax.plot([x + 2.5 for x in xs], [sum(bins[x]) / len(bins[x]) for x in xs], "o-", ms=3, label=name)
        top = max([top, *r["test"]["sentence_tokens"]])
    ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--", label="every token kept")
    ax.set(xlabel="sentence length (tokens, bins of 5)", ylabel="latent vectors kept (mean)", title="vectors kept against length (test)")
    ax.legend(fontsize=6, ncol=2)
    names.append(save(fig, fig_dir / "nvae_sweep_length.png").name)
    return names


def sweep_reading(res: dict, rows: list[dict]) -> str:
    """The goal (at most 60% of the vectors kept with test BLEU within 10 points of the autoencoder)
    checked against the rows; the length relation; why the Dirichlet KL alone does not prune."""
    ae = next((r for r in rows if r["bottleneck"] == "none"), None)
    nvae = [r for r in rows if r["bottleneck"] == "nvib"]
    if ae is None or not nvae:
        return ""
    hits = [r for r in nvae if r["kept"] <= 0.6 and r["test_bleu"] >= ae["test_bleu"] - 10]
    pruned = sorted((r for r in nvae if r["kept"] < 0.999), key=lambda r: r["kept"])
    text = [f"**Reading (the recorded run).** Autoencoder: test BLEU {ae['test_bleu']:.1f} with every token's vector. "]
    if hits:
        best = max(hits, key=lambda r: r["test_bleu"])
        text.append(f"The goal is reached by {len(hits)} setting(s): " + "; ".join(
            f"{r['model']} keeps {100 * r['kept']:.0f}% of the vectors at test BLEU {r['test_bleu']:.1f}" for r in hits)
            + f". The best of them, {best['model']}, keeps {best['vectors']:.1f} of {best['tokens']:.1f} vectors per sentence"
            f" ({best['ood_kept'] * 100:.0f}% on law sentences, OOD BLEU {best['ood_bleu']:.1f} against the autoencoder's {ae['ood_bleu']:.1f}). ")
    else:
        text.append("No setting reaches the goal (at most 60% of the vectors kept with test BLEU within 10 points of the autoencoder). ")
    if pruned:
        text.append("Settings that prune at all: " + ", ".join(f"{r['model']} {100 * r['kept']:.0f}% kept / BLEU {r['test_bleu']:.1f}" for r in pruned) + ". ")
        near = [r for r in pruned if r["median_pseudo_count"] is not None and r["delta"] and r["kept"] < 0.95]
        if near:
            text.append("Their median token pseudo-count is of the order of delta (" + ", ".join(
                f"{r['model']}: {r['median_pseudo_count']:.3f} for delta {r['delta']:g}" for r in near)
                + "): with delta near the threshold 0.1, the threshold cuts through the bulk of the pseudo-counts instead of "
                  "separating needed from unneeded vectors. ")
    eff = [r for r in nvae if r["effective_share"] is not None]
    if eff:
        lo, hi = min(eff, key=lambda r: r["effective_share"]), max(eff, key=lambda r: r["effective_share"])
        text.append(f"Without a threshold, the pseudo-counts' effective number of vectors is {100 * lo['effective_share']:.0f}% "
                    f"({lo['model']}) to {100 * hi['effective_share']:.0f}% ({hi['model']}) of the tokens. ")
    full = [r for r in nvae if r["kept"] >= 0.999]
    if full:
        text.append("Keeping every vector: " + ", ".join(f"{r['model']} (median pseudo-count {r['median_pseudo_count']:.2f})" for r in full
                                                          if r["median_pseudo_count"] is not None) + ". ")
    rel = length_relation(res)
    if rel:
        text.append("Vectors kept against the sentence (Pearson r over the test sentences; information = nats under a 2-layer GPT-2 "
                    "trained on the training sentences): " + "; ".join(
                        f"{n}: r(length) {_fmt_r(v['length'])}, r(information) {_fmt_r(v['information'])}, r(information | length) "
                        f"{_fmt_r(v['information_given_length'])}, {_fmt_r(v['slope'])} vectors per token" for n, v in rel.items()) + ". ")
    push = {n: r["kl_d_push"] for n, r in res["models"].items() if r.get("kl_d_push")}
    if push:
        text.append("Measured on the test sentences, the relative push of KL_D on a token's pseudo-count, (dKL_D / d log a_i) / a_i, "
                    "differs between the tokens of a sentence by at most " + ", ".join(
                        f"{v['spread_max']:.1e} ({n})" for n, v in push.items()) + " of its mean (max over sentences of (max - min) / |mean|): "
                    "the same factor for every token. ")
    text.append("Why the Dirichlet KL does not choose which vectors go: KL_D depends on the pseudo-counts only through their total "
                "A (docs/MATH.md section 2), so its gradient with respect to a token's log pseudo-count is a_i dKL_D/dA, the same "
                "relative push on every token; delta sets the budget B = alpha_p + delta (n - 1) that A is pulled to, and which "
                "tokens fall below the threshold 0.1 is left to the reconstruction loss (a component with a small pseudo-count gets "
                "a near-zero Dirichlet sample weight in training, so the decoder learns not to need it).")
    return "".join(text)


def _fmt_r(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def sweep_section(res: dict, fig_dir: Path, csv_dir: Path | None = None) -> str:
    """The "nvae-sweep" section of docs/RESULTS.md from ``res`` of
    :func:`~nvformer_studies.nvae.study.run_nvae_sweep` (figures written to ``fig_dir``; the table
    through ``csv_dir/nvae_sweep.csv`` if given)."""
    rows = sweep_rows(res)
    d = res["data"]
    opt = lambda spec, key: (lambda r: "-" if r[key] is None else format(r[key], spec))  # noqa: E731
    lines = ["## NVAE sparsity sweep: latent vectors kept against reconstruction", "",
             "Command: `.venv/bin/python experiments/nvae_sweep.py` (models cached in `runs/nvae/sweep/`; "
             f"evaluation {res['seconds'] / 60:.0f} min). Data as in the NVAE section: {d['test']} WikiText-2 test sentences, "
             f"{d['ood']} law sentences (split seed 0). Every model: the NVAE section's sizes and training, but "
             f"{res.get('epochs', 12)} epochs (seed 0, "
             "monotonic KL annealing over 400 steps unless `cyclic`), lambda_G 0.1; the sweep varies delta, lambda_D, kappa, the "
             "annealing and the prior pseudo-count alpha_p (`nvformer_studies.nvae.study.SWEEP`). Kept = token components with "
             f"pseudo-count above {res['threshold']} (the authors' threshold), pruned at evaluation; pseudo-counts per token = total "
             "token pseudo-count / tokens; effective vectors = exp(entropy of the pseudo-counts normalised to sum 1) per test "
             "sentence as a share of its tokens, averaged (100%: mass spread evenly; needs no threshold).", "",
             table(rows, [("model", "{model}"), ("delta", opt("g", "delta")), ("lambda_D", opt("g", "lambda_d")), ("kappa", opt("d", "kappa")),
                          ("alpha_p", opt("g", "prior_alpha")), ("annealing", lambda r: r["schedule"] or "-"), ("test BLEU", "{test_bleu:.1f}"),
                          ("kept", _percent("kept", ".0f")), ("vectors / tokens", "{vectors:.1f} / {tokens:.1f}"),
                          ("pseudo-count per token", opt(".3f", "pseudo_count_per_token")), ("median pseudo-count", opt(".3f", "median_pseudo_count")),
                          ("effective vectors", _percent("effective_share", ".0f")),
                          ("KL_G", "{kl_g:.3f}"), ("KL_D", "{kl_d:.3f}"), ("OOD BLEU", "{ood_bleu:.1f}"), ("OOD kept", _percent("ood_kept", ".0f")),
                          ("training", "{train_minutes:.0f} min")], csv_dir, "nvae_sweep")]
    for f in sweep_figures(res, rows, fig_dir):
        lines += ["", f"![{f}](figures/{f})"]
    lines += ["", sweep_reading(res, rows)]
    return "\n".join(lines) + "\n"

"""Causal language-model perplexity across domains, and NV post-training regularisation of it.

Text units (a WikiText paragraph, a sentence of the MT corpora, a review) are tokenised once,
truncated to ``max_tokens``, prefixed with the tokenizer's BOS token and evaluated in
length-sorted batches; every text token is predicted. Perplexity is ``exp(sum NLL / sum
tokens)`` over the units, and its confidence intervals come from a paired bootstrap over units
(the ratio of sums is recomputed per resample).

Domains (:data:`LM_DOMAINS`): ``wikitext`` (the general-domain source: its prior and source
validation text come from ``valid.txt``, disjoint seeded halves, its test text from ``test.txt``),
``koran``, ``it``, ``law``, ``medical`` (English sides of ``mt-domains``: ``dev.en`` validation,
``test.en`` test) and ``reviews`` (``dvd`` Amazon reviews, the :func:`nvformer.sentiment.domain_splits`
validation / test splits).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nvformer.tasks import lm_batches, lm_nll

from ..common.data import read_parallel, read_wikitext

__all__ = ["LM_DOMAINS", "lm_texts", "perplexity", "bootstrap_log_ppl", "LMStudyConfig", "run_lm_study"]

LM_DOMAINS = ("wikitext", "koran", "it", "law", "medical", "reviews")


def lm_texts(domain: str, split: str, data_dir=None, seed: int = 0) -> list[str]:
    """Text units of ``domain`` for ``split`` in ``{"prior", "validation", "test"}``.

    ``prior`` exists only for the source ``wikitext`` (the first seeded half of the distinct
    paragraphs of ``valid.txt``; ``validation`` is the second half).
    """
    if domain not in LM_DOMAINS:
        raise ValueError(f"lm_texts: unknown domain {domain!r}; domains are {LM_DOMAINS}")
    if split not in ("prior", "validation", "test"):
        raise ValueError(f"lm_texts: split must be 'prior', 'validation' or 'test', got {split!r}")
    if split == "prior" and domain != "wikitext":
        raise ValueError("lm_texts: only the source domain 'wikitext' has a 'prior' split")
    if domain == "wikitext":
        if split == "test":
            return read_wikitext("test", data_dir)
        paras = list(dict.fromkeys(read_wikitext("valid", data_dir)))  # a few paragraphs repeat verbatim
        perm = torch.randperm(len(paras), generator=torch.Generator().manual_seed(seed)).tolist()
        half = perm[: len(perm) // 2] if split == "prior" else perm[len(perm) // 2:]
        return [paras[i] for i in half]
    if domain == "reviews":
        from ..sentiment.data import domain_splits

        return domain_splits("dvd", seed, data_dir)[split][0]
    return read_parallel(domain, "dev" if split == "validation" else "test", data_dir).en


def subset(texts: list[str], n: int | None, seed: int) -> list[str]:
    """A seeded random subset of ``n`` units (all if ``n`` is None or larger)."""
    if n is None or n >= len(texts):
        return list(texts)
    idx = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return [texts[i] for i in sorted(idx)]


def perplexity(nll: Tensor, n_tokens: Tensor) -> float:
    """``exp(sum nll / sum n_tokens)``."""
    return math.exp(float(nll.sum() / n_tokens.sum()))


def bootstrap_log_ppl(nll_a: Tensor, nll_b: Tensor, n_tokens: Tensor, n_resamples: int = 1000, confidence: float = 0.95,
                      seed: int = 0) -> dict[str, float]:
    """Paired bootstrap over units of ``log ppl(b) - log ppl(a)`` (negative: ``b`` is better).

    Returns ``{"diff", "low", "high"}`` in nats per token; ``exp`` of them is the perplexity ratio.
    """
    if not (nll_a.shape == nll_b.shape == n_tokens.shape) or nll_a.dim() != 1:
        raise ValueError(f"bootstrap_log_ppl: shapes differ: {tuple(nll_a.shape)}, {tuple(nll_b.shape)}, {tuple(n_tokens.shape)}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, nll_a.numel(), (n_resamples, nll_a.numel()), generator=g)
    tok = n_tokens.double()[idx].sum(1)
    d = (nll_b.double() - nll_a.double())[idx].sum(1) / tok
    alpha = (1.0 - confidence) / 2
    return {"diff": float((nll_b.double() - nll_a.double()).sum() / n_tokens.double().sum()),
            "low": float(torch.quantile(d, alpha)), "high": float(torch.quantile(d, 1 - alpha))}


# ---------------------------------------------------------------------------------------------
# the study


@dataclass
class LMStudyConfig:
    """Settings of :func:`run_lm_study` (defaults: the docs/RESULTS.md budget).

    Args:
        targets: target domains (the source is ``wikitext``).
        n_prior, n_val, n_test: text units for the prior, each validation and each test set.
        max_tokens: tokens per unit (after BOS).
        trials: Optuna trials per search (identity corner first).
        alpha_tau: log-scale range of ``alpha_tau`` (SmolLM2's pseudo-count scale is small).
        stdev_tau: range of ``stdev_tau``.
        identity_alpha: the ``alpha_tau`` of the conversion (identity).
        samples: prompts continued with ``generate()`` under the chosen knobs.
    """

    targets: tuple[str, ...] = ("koran", "it", "law", "medical", "reviews")
    n_prior: int = 96
    n_val: int = 48
    n_test: int = 192
    max_tokens: int = 64
    batch_size: int = 16
    trials: int = 16
    alpha_tau: tuple[float, float] = (0.3, 1e4)
    stdev_tau: tuple[float, float] = (0.0, 0.5)
    identity_alpha: float = 1e4
    seed: int = 0
    bootstrap: int = 1000
    samples: tuple[str, ...] = ("The history of the city", "In the name of God,", "The software update")
    max_new_tokens: int = 24
    data_dir: str | None = None

    def __post_init__(self) -> None:
        bad = [d for d in self.targets if d not in LM_DOMAINS or d == "wikitext"]
        if bad:
            raise ValueError(f"LMStudyConfig: targets must be among {LM_DOMAINS[1:]}, got {bad}")


@dataclass
class LMStudyResult:
    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, str]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(asdict(self), indent=1, default=str))


def run_lm_study(cfg: LMStudyConfig, out_dir: str | Path | None = None, model=None, tok=None,
                 show_progress: bool = True) -> LMStudyResult:
    """Decoder knobs of a causal LM tuned per target domain on its validation text (minimising
    perplexity), and once on the source's validation text; test perplexity of each with paired
    bootstrap CIs against the unregularised model; ``generate()`` samples under the choices.

    ``model, tok`` default to SmolLM2-135M-Instruct (:func:`nvformer.hf.checkpoints.load_smollm2`).
    """
    from nvformer import KnobSpace, convert, estimate_prior, set_knobs, tune
    from nvformer._progress import progress
    from nvformer.tuning.space import apply_knobs

    t0 = time.time()
    if model is None:
        from ..common.checkpoints import load_smollm2

        model, tok = load_smollm2()
    result = LMStudyResult(config=asdict(cfg))
    sets = {}
    domains = ("wikitext", *cfg.targets)
    for d in domains:
        for split, n in (("validation", cfg.n_val), ("test", cfg.n_test)):
            sets[(d, split)] = lm_batches(tok, subset(lm_texts(d, split, cfg.data_dir, cfg.seed), n, cfg.seed),
                                             max_tokens=cfg.max_tokens, batch_size=cfg.batch_size)
    prior_set = lm_batches(tok, subset(lm_texts("wikitext", "prior", cfg.data_dir, cfg.seed), cfg.n_prior, cfg.seed),
                              max_tokens=cfg.max_tokens, batch_size=cfg.batch_size)
    original = {d: lm_nll(model, sets[(d, "test")]) for d in domains}
    prompts = [{k: v for k, v in tok(p, return_tensors="pt").items() if k in ("input_ids", "attention_mask")} for p in cfg.samples]

    def generate_all() -> list[str]:
        outs = []
        for p in prompts:
            with torch.no_grad():
                g = model.generate(**p, max_new_tokens=cfg.max_new_tokens, do_sample=False, pad_token_id=tok.eos_token_id)
            outs.append(tok.decode(g[0, p["input_ids"].shape[1]:], skip_special_tokens=True))
        return outs

    original_samples = generate_all()
    convert(model, prior=estimate_prior(model, prior_set.batches, show_progress=False), alpha_tau=cfg.identity_alpha)
    identity = {d: lm_nll(model, sets[(d, "test")]) for d in domains}
    result.info["identity_max_abs_nll_diff"] = max(float((identity[d] - original[d]).abs().max()) for d in domains)
    result.info["identity_samples_equal"] = generate_all() == original_samples
    space = KnobSpace(alpha_tau=cfg.alpha_tau, stdev_tau=cfg.stdev_tau, log_alpha=True)

    def reset() -> None:
        set_knobs(model, alpha_tau=cfg.identity_alpha, stdev_tau=0.0, mu_tau=1.0)

    def objective(domain: str):
        data = sets[(domain, "validation")]
        return lambda m: perplexity(lm_nll(m, data), data.n_tokens)

    choices = {}
    for d in progress(domains, "LM study", show_progress):
        reset()
        res = tune(model, objective(d), space=space, n_trials=cfg.trials, direction="minimize", seed=cfg.seed, show_progress=False)
        choices[d] = (dict(res.best_params), res.best_value, res.identity_value)
    for d in domains:
        test = sets[(d, "test")]
        for method, chosen_on in (("target", d), ("source", "wikitext")):
            if method == "target" and d == "wikitext":
                continue
            params, val, val_id = choices[chosen_on]
            reset()
            apply_knobs(model, space, params)
            nll = lm_nll(model, test)
            ci = bootstrap_log_ppl(identity[d], nll, test.n_tokens, cfg.bootstrap, seed=cfg.seed)
            result.rows.append({"domain": d, "method": method, "params": params, "val_ppl": val, "val_ppl_identity": val_id,
                                "test_ppl_original": perplexity(original[d], test.n_tokens),
                                "test_ppl_identity": perplexity(identity[d], test.n_tokens), "test_ppl": perplexity(nll, test.n_tokens),
                                "ratio": math.exp(ci["diff"]), "ratio_low": math.exp(ci["low"]), "ratio_high": math.exp(ci["high"]),
                                "test_tokens": int(test.n_tokens.sum()), "test_units": len(test)})
            if method == "target" or d == "wikitext":
                result.samples += [{"domain": d, "knobs": json.dumps({k: round(v, 3) for k, v in params.items()}),
                                    "prompt": p, "original": o, "regularised": r}
                                   for p, o, r in zip(cfg.samples, original_samples, generate_all())]
    reset()
    result.info["seconds"] = time.time() - t0
    if out_dir is not None:
        result.save(Path(out_dir))
    return result


def lm_markdown(result: LMStudyResult) -> str:
    """The perplexity table and the generation samples."""
    lines = ["| domain | units / tokens (test) | original | identity NV | tuned on target | ratio [95% CI] | tuned on source (wikitext) | ratio [95% CI] | target choice |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    domains = list(dict.fromkeys(r["domain"] for r in result.rows))
    for d in domains:
        t = next((r for r in result.rows if r["domain"] == d and r["method"] == "target"), None)
        s = next(r for r in result.rows if r["domain"] == d and r["method"] == "source")
        def cell(r):
            return "-" if r is None else f"{r['test_ppl']:.2f}"

        def ratio(r):
            return "-" if r is None else f"{r['ratio']:.3f} [{r['ratio_low']:.3f}, {r['ratio_high']:.3f}]"

        choice = s if t is None else t
        knobs = ", ".join(f"{k.split('/')[1][0]}={v:.3g}" for k, v in choice["params"].items())
        lines.append(f"| {d} | {s['test_units']} / {s['test_tokens']} | {s['test_ppl_original']:.2f} | {s['test_ppl_identity']:.2f} | "
                     f"{cell(t)} | {ratio(t)} | {cell(s)} | {ratio(s)} | {knobs} |")
    return "\n".join(lines) + "\n"

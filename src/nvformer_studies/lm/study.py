"""Causal language-model perplexity across domains, and NV post-training regularisation of it.

Text units (a WikiText paragraph, a sentence of the MT corpora, a review) are tokenised once,
truncated to ``max_tokens``, prefixed with the tokenizer's BOS token and evaluated in
length-sorted batches; every text token is predicted. Perplexity is ``exp(sum NLL / sum
tokens)`` over the units, and its confidence intervals come from a paired bootstrap over units
(the ratio of sums is recomputed per resample: :meth:`nvformer.tasks.Metric.compare` of the
``nll`` metric of the ``causal-lm`` task). The conversion and the searches follow the shared
protocol (:mod:`nvformer_studies.common.protocol`); tables, figure and doc section:
:mod:`nvformer_studies.lm.report`.

Domains (:data:`LM_DOMAINS`): ``wikitext`` (the general-domain source: its prior and source
validation text come from ``valid.txt``, disjoint seeded halves, its test text from ``test.txt``),
``koran``, ``it``, ``law``, ``medical`` (English sides of ``mt-domains``: ``dev.en`` validation,
``test.en`` test) and ``reviews`` (``dvd`` Amazon reviews, the :func:`nvformer_studies.sentiment.data.domain_splits`
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

from nvformer import IDENTITY, KnobSpace
from nvformer._progress import progress
from nvformer.tasks import TextBatches, get_task, lm_batches, lm_nll

from ..common.data import read_parallel, read_wikitext
from ..common.protocol import Choice, Protocol, convert_at_identity
from ..common.subsets import seeded_subset

__all__ = ["LM_DOMAINS", "LMStudyConfig", "LMStudyResult", "lm_texts", "perplexity", "run_lm_study", "unit_stats"]

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
        perm = seeded_subset(len(paras), None, seed, sort=False)
        half = perm[: len(perm) // 2] if split == "prior" else perm[len(perm) // 2:]
        return [paras[i] for i in half]
    if domain == "reviews":
        from ..sentiment.data import domain_splits

        return domain_splits("dvd", seed, data_dir)[split][0]
    return read_parallel(domain, "dev" if split == "validation" else "test", data_dir).en


def perplexity(nll: Tensor, n_tokens: Tensor) -> float:
    """``exp(sum nll / sum n_tokens)``."""
    return math.exp(float(nll.sum() / n_tokens.sum()))


def unit_stats(nll: Tensor, data: TextBatches) -> Tensor:
    """``[N, 2]`` float64 per-unit statistics of the ``causal-lm`` task: summed NLL ``nll [N]`` and
    the number of predicted tokens of each unit of ``data`` (its ``nll`` / ``perplexity`` metrics
    are ratios of their sums)."""
    return torch.stack([nll, data.n_tokens.double()], 1)


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
    identity_alpha: float = IDENTITY.alpha_tau
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
    """What :func:`run_lm_study` measured (``results.json``): its config, the test rows, the generation samples, timing and checks."""

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

    ``model, tok`` default to SmolLM2-135M-Instruct (:func:`nvformer_studies.common.checkpoints.load_smollm2`).
    """
    t0 = time.time()
    if model is None:
        from ..common.checkpoints import load_smollm2

        model, tok = load_smollm2()
    result = LMStudyResult(config=asdict(cfg))
    sets = {}
    domains = ("wikitext", *cfg.targets)

    def units(domain: str, split: str, n: int) -> TextBatches:
        texts = lm_texts(domain, split, cfg.data_dir, cfg.seed)
        return lm_batches(tok, [texts[i] for i in seeded_subset(len(texts), n, cfg.seed)], max_tokens=cfg.max_tokens, batch_size=cfg.batch_size)

    for d in domains:
        for split, n in (("validation", cfg.n_val), ("test", cfg.n_test)):
            sets[(d, split)] = units(d, split, n)
    prior_set = units("wikitext", "prior", cfg.n_prior)
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
    protocol = Protocol(model, identity=IDENTITY.replace(alpha_tau=cfg.identity_alpha), seed=cfg.seed)
    convert_at_identity(model, prior_set.batches, protocol.identity)
    identity = {d: lm_nll(model, sets[(d, "test")]) for d in domains}
    result.info["identity_max_abs_nll_diff"] = max(float((identity[d] - original[d]).abs().max()) for d in domains)
    result.info["identity_samples_equal"] = generate_all() == original_samples
    space = KnobSpace(alpha_tau=cfg.alpha_tau, stdev_tau=cfg.stdev_tau, log_alpha=True)

    def objective(domain: str):
        data = sets[(domain, "validation")]
        return lambda m: perplexity(lm_nll(m, data), data.n_tokens)

    choices = {d: protocol.search(Choice("target", d), space, objective(d), cfg.trials, direction="minimize")
               for d in progress(domains, "LM study", show_progress)}
    log_ppl = get_task("causal-lm").metric("nll")
    for d in domains:
        test = sets[(d, "test")]
        for method, chosen_on in (("target", d), ("source", "wikitext")):
            if method == "target" and d == "wikitext":
                continue
            choice = choices[chosen_on]
            protocol.apply(choice)
            nll = lm_nll(model, test)
            ci = log_ppl.compare(unit_stats(identity[d], test), unit_stats(nll, test), n_resamples=cfg.bootstrap, seed=cfg.seed)
            result.rows.append({"domain": d, "method": method, "params": choice.params, "val_ppl": choice.value,
                                "val_ppl_identity": choice.identity_value, "test_ppl_original": perplexity(original[d], test.n_tokens),
                                "test_ppl_identity": perplexity(identity[d], test.n_tokens), "test_ppl": perplexity(nll, test.n_tokens),
                                "ratio": math.exp(ci["diff"]), "ratio_low": math.exp(ci["low"]), "ratio_high": math.exp(ci["high"]),
                                "test_tokens": int(test.n_tokens.sum()), "test_units": len(test)})
            if method == "target" or d == "wikitext":
                result.samples += [{"domain": d, "knobs": json.dumps({k: round(v, 3) for k, v in choice.params.items()}),
                                    "prompt": p, "original": o, "regularised": r}
                                   for p, o, r in zip(cfg.samples, original_samples, generate_all())]
    protocol.reset()
    result.info["seconds"] = time.time() - t0
    if out_dir is not None:
        result.save(Path(out_dir))
    return result

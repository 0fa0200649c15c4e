"""The causal-LM part of the fitted-knobs study (model ``"smollm2"``): SmolLM2-135M-Instruct, its
decoder knobs fitted by gradient on *unlabelled* target text (the NLL of the text itself), against
the unregularised model and today's search (the LM study's: Optuna on the validation perplexity,
``alpha_tau`` on a log scale). Data, prior and splits are the LM study's
(:mod:`nvformer_studies.lm.study`): the prior from WikiText-2 paragraphs, per target domain its
validation units (what a method may see; fitting holds out ``holdout`` of them to choose the step)
and its test units (perplexity ratio against the unregularised model, paired bootstrap over units).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

import nvformer as nv
from nvformer import IDENTITY, KnobSpace
from nvformer.tasks import TextBatches, get_task, holdout_split, labelled_batches, lm_batches, lm_nll
from nvformer.tuning.space import apply_knobs

from ..common.protocol import Choice, Protocol, convert_at_identity
from ..common.subsets import seeded_subset
from ..lm.study import lm_texts, perplexity, unit_stats
from .study import fit_cost

__all__ = ["FitLMConfig", "SOURCE", "run_fit_lm", "run_lm_transfer"]

SOURCE = "wikitext"  # where the prior comes from: the LM's in-domain text


@dataclass
class FitLMConfig:
    """Sizes of the LM part (the LM study's data sizes; ``steps``, ``lr``, ``patience``, ``holdout``:
    :func:`nvformer.fit_knobs`; ``trials``: the search's)."""

    targets: tuple[str, ...] = ("koran", "it", "law", "medical", "reviews")
    n_prior: int = 96
    n_val: int = 48
    n_test: int = 192
    max_tokens: int = 64
    batch_size: int = 8
    trials: int = 16
    steps: int = 50
    lr: float = 0.3
    patience: int = 3
    holdout: float = 0.25
    seed: int = 0
    bootstrap: int = 1000

    @classmethod
    def smoke(cls, **kw) -> FitLMConfig:
        return cls(**{**dict(targets=("koran", "law"), n_prior=8, n_val=8, n_test=8, max_tokens=16, batch_size=4, trials=2, steps=2,
                             bootstrap=50), **kw})


def _space() -> KnobSpace:
    """The search's space (the LM study's: ``alpha_tau`` on a log scale)."""
    return KnobSpace(alpha_tau=(0.3, 1e4), stdev_tau=(0.0, 0.5), log_alpha=True)


def _converted(cfg: FitLMConfig, model, tok) -> tuple:
    """``(model, tok, units, protocol)``: SmolLM2 (unless given) converted at the identity with the empirical
    prior of ``n_prior`` WikiText-2 paragraphs; ``units(domain, split, n)`` gives ``(texts, batches)`` of a
    seeded subset."""
    if model is None:
        from ..common.checkpoints import load_smollm2

        model, tok = load_smollm2()

    def units(domain: str, split: str, n: int) -> tuple[list[str], TextBatches]:
        texts = lm_texts(domain, split, None, cfg.seed)
        picked = [texts[i] for i in seeded_subset(len(texts), n, cfg.seed)]
        return picked, lm_batches(tok, picked, max_tokens=cfg.max_tokens, batch_size=cfg.batch_size)

    proto = Protocol(model, seed=cfg.seed)
    convert_at_identity(model, units(SOURCE, "prior", cfg.n_prior)[1].batches)
    return model, tok, units, proto


def run_fit_lm(cfg: FitLMConfig, model=None, tok=None, show_progress: bool = True) -> dict[str, Any]:
    """Per target: the search and ``fit-lm-unlabelled`` (one setting per layer); returns
    ``{"config", "rows", "info"}`` with per-unit statistics for the bootstrap."""
    t0 = time.time()
    model, tok, units, proto = _converted(cfg, model, tok)
    log_ppl = get_task("causal-lm").metric("nll")
    space = _space()
    rows = []
    from tqdm.auto import tqdm

    for d in tqdm(cfg.targets, desc="fit-knobs LM", disable=not show_progress):
        texts, val = units(d, "validation", cfg.n_val)
        _, test = units(d, "test", cfg.n_test)
        held_idx, fit_idx = holdout_split(len(texts), cfg.holdout, cfg.seed)
        held = lm_batches(tok, [texts[i] for i in held_idx], max_tokens=cfg.max_tokens, batch_size=cfg.batch_size)
        fit_on = lm_batches(tok, [texts[i] for i in fit_idx], max_tokens=cfg.max_tokens, batch_size=cfg.batch_size)
        proto.reset()
        base = lm_nll(model, test)

        def row(method: str, cost: float, seconds: float, extra: dict | None = None) -> None:
            nll = lm_nll(model, test)
            ci = log_ppl.compare(unit_stats(base, test), unit_stats(nll, test), n_resamples=cfg.bootstrap, seed=cfg.seed)
            rows.append({"model": "smollm2", "target": d, "method": method, "metric": "perplexity", "unit": "relative",
                         "baseline": perplexity(base, test.n_tokens), "value": perplexity(nll, test.n_tokens),
                         "gain": math.exp(ci["diff"]) - 1.0, "ci_low": math.exp(ci["low"]) - 1.0, "ci_high": math.exp(ci["high"]) - 1.0,
                         "forward_equivalents": cost, "seconds": seconds, "in_domain_gain": None, "label_free": method != "search",
                         **(extra or {})})

        row("baseline", 0.0, 0.0)
        s0 = time.perf_counter()
        choice = proto.search(Choice("search", d), space, lambda m: perplexity(lm_nll(m, val), val.n_tokens), cfg.trials, direction="minimize")
        row("search", float(choice.trials * len(texts)), time.perf_counter() - s0, {"knobs": choice.params})
        proto.reset()
        train_b, held_b = labelled_batches(fit_on, "causal-lm"), labelled_batches(held, "causal-lm")
        res = nv.fit_knobs(model, train_b, "nll", groups="layer", steps=cfg.steps, lr=cfg.lr, validation=held_b, patience=cfg.patience,
                           show_progress=False)
        cost = fit_cost(res.steps, 1 + len(res.history), [int(b["input_ids"].shape[0]) for b in train_b], [len(held)])
        row("fit-lm-unlabelled", cost, res.seconds, {"knobs": {k: v.as_dict() for k, v in res.knobs.items()}, "nats": res.nats,
                                                     "best_step": res.best_step, "steps": res.steps})
        proto.reset()
    return {"config": asdict(cfg), "rows": rows, "info": {"seconds": time.time() - t0, "threads": torch.get_num_threads(),
                                                          "identity": IDENTITY.as_dict()}}


def run_lm_transfer(cfg: FitLMConfig, lm: dict[str, Any], model=None, tok=None, show_progress: bool = True) -> dict[str, Any]:
    """Where the LM part's choices carry over (issue 18's transfer and in-domain cost): the
    ``fit-lm-unlabelled`` knobs of each target (the rows of :func:`run_fit_lm`'s result ``lm``) on every
    target's test units and on WikiText-2's (the source, whose text gave the prior: the in-domain cost),
    and the search's choice of each target on WikiText-2. Same model, prior, units and bootstrap as
    :func:`run_fit_lm`; returns ``{"config", "rows", "info"}``, a row per (method, fitted_on, target) with
    the relative test-perplexity change against the unregularised model and its paired 95% interval."""
    t0 = time.time()
    model, tok, units, proto = _converted(cfg, model, tok)
    log_ppl = get_task("causal-lm").metric("nll")
    domains = [*cfg.targets, SOURCE]
    proto.reset()
    from tqdm.auto import tqdm

    bar = tqdm(total=2 * len(domains) + len(cfg.targets) * len(domains), desc="LM transfer", disable=not show_progress)
    test, base = {}, {}
    for d in domains:
        test[d] = units(d, "test", cfg.n_test)[1]
        base[d] = lm_nll(model, test[d])
        bar.update(1)
    rows = []

    def measure(method: str, fitted_on: str, d: str) -> None:
        nll = lm_nll(model, test[d])
        ci = log_ppl.compare(unit_stats(base[d], test[d]), unit_stats(nll, test[d]), n_resamples=cfg.bootstrap, seed=cfg.seed)
        rows.append({"model": "smollm2", "method": method, "fitted_on": fitted_on, "target": d, "unit": "relative",
                     "gain": math.exp(ci["diff"]) - 1.0, "ci_low": math.exp(ci["low"]) - 1.0, "ci_high": math.exp(ci["high"]) - 1.0,
                     "own": fitted_on == d})
        bar.update(1)

    for r in lm["rows"]:
        if r["method"] == "fit-lm-unlabelled" and r["target"] in cfg.targets:
            proto.reset()
            nv.set_knobs(model, r["knobs"])
            for d in domains:
                measure("fit-lm-unlabelled", r["target"], d)
        elif r["method"] == "search" and r["target"] in cfg.targets:
            proto.reset()
            apply_knobs(model, _space(), r["knobs"])
            measure("search", r["target"], SOURCE)
    proto.reset()
    bar.close()
    return {"config": asdict(cfg), "rows": rows, "info": {"seconds": time.time() - t0, "threads": torch.get_num_threads()}}

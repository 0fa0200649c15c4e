"""Translation across domains with NV post-training regularisation (issue 6, translation half).

The model is the koran German-to-English Marian model of :mod:`nvformer_studies.translation.model`
(trained once, cached). The study (:func:`run_translation_study`) follows the shared protocol
(:mod:`nvformer_studies.common.protocol`):

1. estimates the empirical prior of every attention site on koran training pairs,
2. converts the model at the identity (``alpha_tau = identity_alpha``) and checks that its greedy
   translations equal the original model's (BLEU of one against the other must be 100),
3. for every target domain (koran in-domain, law, medical, it) and every site separately
   (encoder, cross, decoder) searches ``alpha_tau`` / ``stdev_tau`` with :func:`nvformer.tune`,
   maximising greedy BLEU on a seeded subset of the domain's dev split,
4. reports test BLEU and chrF (sacrebleu) of the chosen knobs against the unregularised model,
   with paired bootstrap confidence intervals of the differences (:meth:`nvformer.tasks.Metric.compare`
   of the ``bleu`` / ``chrf`` metrics of the ``seq2seq`` task on sacrebleu's per-sentence
   sufficient statistics, :func:`nvformer.tasks.sentence_stats`).

Splits: the model's own checkpoint selection uses ``val_size`` koran dev pairs (a seeded
permutation of the dev split, ``split_seed``); the study's koran dev subset is drawn from the
*other* dev pairs, so knob search and checkpoint selection never share a sentence. The other
domains have no training split. ``it/`` has double-encoded UTF-8 lines;
:func:`nvformer_studies.common.data.read_parallel` repairs them and the study reports how many.
Tables, figure and doc section: :mod:`nvformer_studies.translation.report`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nvformer import IDENTITY, KnobSpace, get_knobs
from nvformer._progress import progress
from nvformer.api import nv_modules, site_of
from nvformer.tasks import generate_texts, get_task, sentence_stats

from ..common.data import MT_DOMAINS, read_parallel
from ..common.protocol import Choice, Protocol, convert_at_identity
from ..common.subsets import seeded_subset
from .model import TranslationConfig, corpus_scores, koran_splits, load_or_train, selection_indices, to_device, training_batches
from .report import study_markdown

__all__ = ["SITES_ORDER", "SMOKE_STUDY", "SMOKE_TRAIN", "TranslationStudyConfig", "Translator", "domain_sets", "prior_batches", "run_translation_study",
           "site_alpha_ranges", "with_train"]

SITES_ORDER = ("encoder", "cross", "decoder")
# a tiny model and study: seconds, to check a command end to end
SMOKE_TRAIN = dict(vocab_size=1000, d_model=32, layers=1, heads=2, ffn=64, max_length=64, batch_tokens=512, epochs=4, lr=5e-3, warmup=10,
                   val_size=16, train_pairs=300, eval_batch_size=16)
SMOKE_STUDY = dict(n_dev=6, n_test=8, n_prior=16, trials=2, n_bootstrap=50, max_new_tokens=24, max_length=48, batch_size=8)


@dataclass(frozen=True)
class TranslationStudyConfig:
    """Settings of :func:`run_translation_study` (sizes chosen for about 30 min on 2 cores).

    ``n_dev`` / ``n_test`` sentence pairs per domain (seeded subsets, ``subset_seed``; koran's
    dev subset avoids the checkpoint-selection pairs), ``n_prior`` koran training pairs for the
    prior (``prior_seed``), ``trials`` Optuna trials per (domain, site) search (TPE,
    ``tune_seed``; the identity corner first), greedy decoding for the objective and the test
    scores (``num_beams``), ``n_bootstrap`` paired resamples.

    ``alpha_range`` is the authors' ``[-15, 10]``. The prior's weight relative to a token is
    about ``exp(-alpha_tau * s_alpha)``, and ``s_alpha`` (the spread of the empirical log
    pseudo-counts) differs a lot between sites (a small model's cross site can have
    ``s_alpha`` ~ 0.01, where ``alpha_tau = 10`` is far from the identity). With
    ``alpha_scale="s_alpha"`` each site's range is divided by the smallest ``s_alpha`` of its
    modules, so the search is over ``alpha_tau * s_alpha`` in ``alpha_range`` and its top corner
    (``exp(-10)`` relative prior weight) is the identity for every site; ``"none"`` uses the range as is.
    """

    train: TranslationConfig = TranslationConfig()
    domains: tuple[str, ...] = ("koran", "law", "medical", "it")
    sites: tuple[str, ...] = SITES_ORDER
    n_dev: int | None = 100
    n_test: int | None = 500
    subset_seed: int = 0
    n_prior: int = 2000
    prior_seed: int = 0
    trials: int = 12
    tune_seed: int = 0
    alpha_range: tuple[float, float] = (-15.0, 10.0)
    alpha_scale: str = "s_alpha"
    stdev_range: tuple[float, float] = (0.0, 0.5)
    identity_alpha: float = IDENTITY.alpha_tau
    batch_size: int = 64
    num_beams: int = 1
    max_new_tokens: int = 128
    max_length: int = 128
    n_bootstrap: int = 1000

    def __post_init__(self) -> None:
        bad = [d for d in self.domains if d not in MT_DOMAINS]
        if bad or not self.domains:
            raise ValueError(f"TranslationStudyConfig: unknown or no domain(s) {bad}; domains are {MT_DOMAINS}")
        bad = [s for s in self.sites if s not in SITES_ORDER]
        if bad or not self.sites:
            raise ValueError(f"TranslationStudyConfig: unknown or no site(s) {bad}; sites are {SITES_ORDER}")
        if self.alpha_scale not in ("s_alpha", "none"):
            raise ValueError(f"TranslationStudyConfig: alpha_scale must be 's_alpha' or 'none', got {self.alpha_scale!r}")
        if self.trials < 1 or self.n_prior < 1 or self.n_bootstrap < 1:
            raise ValueError("TranslationStudyConfig: trials, n_prior and n_bootstrap must be >= 1")

    def key(self) -> str:
        """A short hash of the settings (names the Optuna studies, so stale ones are not resumed)."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:10]


def _knob_state(model: nn.Module) -> tuple:
    return tuple(sorted(get_knobs(model).items()))


class Translator:
    """Memoised translations of fixed sentence sets under the model's current knobs."""

    def __init__(self, model, tok, cfg: TranslationStudyConfig) -> None:
        self.model, self.tok, self.cfg = model, tok, cfg
        self.memo: dict[tuple, list[str]] = {}
        self.calls = {"memo": 0, "decoded": 0}

    def __call__(self, name: str, sentences: list[str]) -> list[str]:
        key = (name, _knob_state(self.model) if nv_modules(self.model) else None)
        if key in self.memo:
            self.calls["memo"] += 1
            return self.memo[key]
        self.calls["decoded"] += 1
        hyps = generate_texts(self.model, self.tok, sentences, batch_size=self.cfg.batch_size, num_beams=self.cfg.num_beams,
                              max_new_tokens=self.cfg.max_new_tokens, max_length=self.cfg.max_length)
        self.memo[key] = hyps
        return hyps


def domain_sets(cfg: TranslationStudyConfig, data_dir) -> dict[str, dict[str, Any]]:
    sets = {}
    for d in cfg.domains:
        dev, test = read_parallel(d, "dev", data_dir), read_parallel(d, "test", data_dir)
        exclude = selection_indices(len(dev), cfg.train) if d == "koran" else []
        di = seeded_subset(len(dev), cfg.n_dev, cfg.subset_seed, exclude=exclude)
        ti = seeded_subset(len(test), cfg.n_test, cfg.subset_seed)
        sets[d] = {
            "dev": ([dev.de[i] for i in di], [dev.en[i] for i in di]),
            "test": ([test.de[i] for i in ti], [test.en[i] for i in ti]),
            "indices": {"dev": di, "test": ti},
            "info": {"dev_pairs": len(di), "test_pairs": len(ti), "dev_total": len(dev), "test_total": len(test),
                     "repaired_lines_dev": dev.repaired, "repaired_lines_test": test.repaired,
                     "dev_excluded_for_checkpoint_selection": len(exclude)},
        }
    return sets


def prior_batches(tok, cfg: TranslationStudyConfig, data_dir) -> list[dict[str, Tensor]]:
    sp = koran_splits(cfg.train, data_dir)
    idx = seeded_subset(len(sp["train_de"]), cfg.n_prior, cfg.prior_seed)
    batches, _ = training_batches(tok, [sp["train_de"][i] for i in idx], [sp["train_en"][i] for i in idx], cfg.train)
    return [{k: v for k, v in b.items() if k != "labels"} for b in batches]  # no loss needed


def site_alpha_ranges(model: nn.Module, priors: dict, cfg: TranslationStudyConfig) -> tuple[dict[str, tuple[tuple[float, float], float]], dict[str, float]]:
    """``({site: (alpha_tau range, scale)}, {site: smallest s_alpha})``: each site's search range of
    ``alpha_tau``, ``cfg.alpha_range`` divided by the smallest ``s_alpha`` of the site's NV modules
    (``alpha_scale="s_alpha"``; scale 1 for ``"none"``); ``priors``: :func:`convert_at_identity`'s."""
    site_by_name = {name: site_of(model, name, m).site for name, m in nv_modules(model)}
    s_min = {site: min(float(p.log_alpha_std) for name, p in priors.items() if site_by_name.get(name) == site) for site in cfg.sites}
    ranges = {}
    for site in cfg.sites:
        scale = s_min[site] if cfg.alpha_scale == "s_alpha" else 1.0
        if not scale > 0:
            raise ValueError(f"translation study: the {site} prior has s_alpha {scale}; use alpha_scale='none'")
        ranges[site] = ((cfg.alpha_range[0] / scale, cfg.alpha_range[1] / scale), scale)
    return ranges, s_min


def run_translation_study(cfg: TranslationStudyConfig = TranslationStudyConfig(), out_dir: str | Path | None = None, *,
                          model_dir: str | Path = "runs/marian-koran", data_dir=None, show_progress: bool = True) -> dict[str, Any]:
    """The translation study (module docstring); returns the results dict (also ``results.json``
    and ``summary.md`` in ``out_dir`` if given).

    The model comes from :func:`load_or_train` (``model_dir``, ``cfg.train``: trained if no
    matching checkpoint is cached there).
    """
    t0 = time.time()
    model, tok, train_info = load_or_train(model_dir, cfg.train, data_dir=data_dir, show_progress=show_progress)
    # names the Optuna studies: a retrained checkpoint or other settings never resume stale trials
    run_key = hashlib.sha1((cfg.key() + json.dumps(train_info["history"], sort_keys=True)).encode()).hexdigest()[:10]
    device = next(model.parameters()).device
    sets = domain_sets(cfg, data_dir)
    res: dict[str, Any] = {
        "config": asdict(cfg), "key": run_key, "model_dir": str(model_dir),
        "model": {"parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tok),
                  "best_epoch": train_info["history"]["best_epoch"], "val_bleu": train_info["history"]["val_bleu"],
                  "train_seconds": train_info.get("seconds"), "train_pairs": train_info.get("train_pairs")},
        "data": {d: s["info"] for d, s in sets.items()},
        "subset_indices": {d: s["indices"] for d, s in sets.items()},
        "baseline": {}, "identity": {}, "tuned": {},
    }
    tr = Translator(model, tok, cfg)
    # 1. the original model's translations (the unregularised baseline)
    base = {}
    for d, s in sets.items():
        for split in ("dev", "test"):
            base[(d, split)] = tr(f"{d}/{split}", s[split][0])
        res["baseline"][d] = {split: corpus_scores(base[(d, split)], s[split][1]) for split in ("dev", "test")}
    # 2. empirical prior on koran training pairs, conversion at identity, equivalence check
    protocol = Protocol(model, identity=IDENTITY.replace(alpha_tau=cfg.identity_alpha), seed=cfg.tune_seed)
    priors = convert_at_identity(model, [to_device(b, device) for b in prior_batches(tok, cfg, data_dir)], protocol.identity)
    res["prior"] = {"pairs": cfg.n_prior, "seed": cfg.prior_seed,
                    "s_alpha": {name: float(p.log_alpha_std) for name, p in priors.items()}}
    ranges, s_min = site_alpha_ranges(model, priors, cfg)
    res["prior"]["s_alpha_min"] = s_min
    tr.memo.clear()
    for d, s in sets.items():
        nv_test = tr(f"{d}/test", s["test"][0])
        res["identity"][d] = {"bleu_vs_original": corpus_scores(nv_test, base[(d, "test")])["bleu"],
                              "identical_fraction": sum(a == b for a, b in zip(nv_test, base[(d, "test")])) / len(nv_test),
                              "sentences": len(nv_test)}
    # 3. per target domain and site: search on dev, score on test
    bar = progress(range(len(cfg.domains) * len(cfg.sites)), "translation study", show_progress)
    steps = iter(bar)
    seq2seq = get_task("seq2seq")
    for d, s in sets.items():
        res["tuned"][d] = {}
        for site in cfg.sites:
            dev_src, dev_ref = s["dev"]

            def objective(m, d=d, dev_src=dev_src, dev_ref=dev_ref) -> float:
                return corpus_scores(tr(f"{d}/dev", dev_src), dev_ref)["bleu"]

            alpha_range, scale = ranges[site]
            space = KnobSpace(sites=(site,), alpha_tau=alpha_range, stdev_tau=tuple(cfg.stdev_range))
            choice = protocol.search(Choice(site, d), space, objective, cfg.trials, study_name=f"{d}-{site}-{run_key}",
                                     out_dir=None if out_dir is None else Path(out_dir) / "tune" / f"{d}-{site}")
            hyps, refs = tr(f"{d}/test", s["test"][0]), s["test"][1]  # the model is at the chosen knobs
            boot = {name: seq2seq.metric(name).compare(sentence_stats(name, base[(d, "test")], refs), sentence_stats(name, hyps, refs),
                                                       n_resamples=cfg.n_bootstrap, seed=cfg.subset_seed) for name in ("bleu", "chrf")}
            res["tuned"][d][site] = {
                "alpha_range": alpha_range, "alpha_scale": scale,
                "best_params": choice.params, "identity_corner_dev_bleu": choice.identity_value,
                "best_dev_bleu": choice.value, "trials": choice.trials,
                "test": {"bleu": boot["bleu"]["b"], "chrf": boot["chrf"]["b"]},
                "bootstrap": {k: {kk: v[kk] for kk in ("diff", "low", "high")} for k, v in boot.items()},
            }
            next(steps, None)
    protocol.reset()
    res["translator_calls"] = dict(tr.calls)
    res["seconds"] = time.time() - t0
    res["threads"] = torch.get_num_threads()
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
        (out / "summary.md").write_text(study_markdown(res))
    return res


def with_train(cfg: TranslationStudyConfig, **train_overrides) -> TranslationStudyConfig:
    """``cfg`` with some :class:`TranslationConfig` fields replaced."""
    return replace(cfg, train=replace(cfg.train, **train_overrides))

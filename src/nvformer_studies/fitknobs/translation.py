"""The translation part of the fitted-knobs study (model ``"marian"``): the koran German-to-English
Marian model of the translation study (:mod:`nvformer_studies.translation.model`, trained once and
cached), its three attention sites (encoder, cross, decoder) regularised for the target domains law,
medical and it.

Data, prior and splits are the translation study's (:func:`~nvformer_studies.translation.study.domain_sets`):
the empirical prior of ``n_prior`` koran training pairs; per target its dev subset (what a method
may see; fitting methods fit on ``1 - holdout`` of it and choose the step on the rest) and its test
subset (greedy test BLEU against the unregularised model, paired bootstrap over sentences); the
koran test subset measures the in-domain cost of each target's choice.

==================  ==========================================================================
``baseline``        the trained model
``search``          the translation study's search: per site, Optuna TPE on the dev BLEU (``trials``
                    trials, ``alpha_tau`` scaled by the site's smallest ``s_alpha``); the site whose
                    search reached the highest dev BLEU is kept
``fit-site``        :func:`nvformer.fit_knobs` on the dev references' NLL (teacher forcing), one
                    setting per site (three settings)
``fit-layer``       the same with one setting per layer and site
``fit-head``        the same with one ``alpha_tau`` and ``stdev_tau`` per head
``fit-entropy``     ``fit-layer``, label-free: the mean per-token entropy of the model's predictions along
                    its own greedy translations of the dev sources (no reference is read)
``tent``            TENT: the LayerNorm affine parameters adapted by the same entropy on the same text,
                    same steps and held-out rule
==================  ==========================================================================

Cost: forwards over one example, where a greedy decode of a sentence counts as one (an encoder pass
and one cached decoder step per output token, about the work of a teacher-forced forward) and a
training step 3 per example; and seconds on this machine.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import nvformer as nv
from nvformer import IDENTITY, KnobSpace
from nvformer.tasks import TextBatches, get_task, holdout_split, sentence_stats, seq2seq_batches
from nvformer.tuning.objectives import entropy

from ..common.docs import markdown_table
from ..common.protocol import Choice, Protocol, convert_at_identity
from ..common.tent import restore, tent
from ..translation.model import corpus_scores, load_or_train, to_device
from ..translation.study import (
    SMOKE_STUDY,
    SMOKE_TRAIN,
    TranslationStudyConfig,
    Translator,
    domain_sets,
    prior_batches,
    site_alpha_ranges,
)
from .study import fit_cost

__all__ = ["MT_METHODS", "FitMTConfig", "decoder_entropy", "run_fit_translation", "translation_lines"]

MT_METHODS = ("baseline", "search", "fit-site", "fit-layer", "fit-head", "fit-entropy", "tent")
MT_LABEL_FREE = ("fit-entropy", "tent")
FLOOR_BLEU = 2.0  # _reading: targets whose unregularised BLEU stays below this leave no room to measure a gain


@dataclass
class FitMTConfig:
    """Settings of the translation part: ``study`` holds the translation study's model, data and search
    settings (its ``domains``: the source first, then the targets); ``batch_size``, ``steps``, ``lr``,
    ``patience``, ``holdout``: :func:`nvformer.fit_knobs` (and TENT's steps, at ``tent_lr``)."""

    study: TranslationStudyConfig = field(default_factory=TranslationStudyConfig)
    model_dir: str = "runs/marian-koran"
    batch_size: int = 16
    steps: int = 50
    lr: float = 0.3
    patience: int = 3
    holdout: float = 0.25
    tent_lr: float = 1e-3
    seed: int = 0

    @classmethod
    def smoke(cls, **kw) -> FitMTConfig:
        from ..translation.model import TranslationConfig

        study = TranslationStudyConfig(train=TranslationConfig(**SMOKE_TRAIN), domains=("koran", "law"), **SMOKE_STUDY)
        return cls(**{**dict(study=study, steps=3, batch_size=4), **kw})


def decoder_entropy(outputs: Any, batch: dict[str, Tensor]) -> Tensor:
    """Mean entropy of a seq2seq model's next-token predictions over the decoder positions of
    ``batch["labels"]`` (those not -100): label-free when the labels are the model's own output."""
    return entropy(outputs.logits, batch["labels"] != -100)


def _rows(batches: list[dict[str, Tensor]]) -> list[int]:
    return [int(b["input_ids"].shape[0]) for b in batches]


PARTIAL_FILE = "marian.partial.json"  # run_fit_translation's rows after every finished target, while it runs


def run_fit_translation(cfg: FitMTConfig, *, data_dir=None, show_progress: bool = True, partial_dir: str | Path | None = None) -> dict[str, Any]:
    """Every method on every target (module docstring); returns ``{"config", "rows", "info"}`` (rows
    as in ``docs/results/fit_knobs.csv``: BLEU, gain in BLEU points, paired bootstrap interval).

    With ``partial_dir``, the rows of every finished target are kept in ``partial_dir/marian.partial.json``
    until the run ends; a run stopped in between resumes from it (same settings) with the next target.
    Every target starts from the reset model and seeded searches, so the rows are the uninterrupted run's."""
    t0 = time.time()
    partial = Path(partial_dir) / PARTIAL_FILE if partial_dir is not None else None
    config = json.loads(json.dumps(asdict(cfg), default=str))
    saved = json.loads(partial.read_text()) if partial is not None and partial.exists() else {}
    if saved.get("config") != config:
        saved = {}
    done: list[str] = list(saved.get("done", []))
    seconds_before = float(saved.get("seconds", 0.0))
    if done and show_progress:
        print(f"resumed from {partial} after {', '.join(done)}", flush=True)
    sc = cfg.study
    model, tok, train_info = load_or_train(cfg.model_dir, sc.train, data_dir=data_dir, show_progress=show_progress)
    device = next(model.parameters()).device
    sets = domain_sets(sc, data_dir)
    source, targets = sc.domains[0], list(sc.domains[1:])
    tr = Translator(model, tok, sc)
    proto = Protocol(model, identity=IDENTITY.replace(alpha_tau=sc.identity_alpha), seed=cfg.seed)
    priors = convert_at_identity(model, [to_device(b, device) for b in prior_batches(tok, sc, data_dir)], proto.identity)
    ranges, s_min = site_alpha_ranges(model, priors, sc)
    seq2seq = get_task("seq2seq")
    base = {d: tr(f"{d}/test", sets[d]["test"][0]) for d in (source, *targets)}

    def pairs(src: list[str], tgt: list[str]) -> list[dict[str, Tensor]]:
        data: TextBatches = seq2seq_batches(tok, src, tgt, batch_size=cfg.batch_size, max_length=sc.max_length)
        return [to_device(b, device) for b in data.batches]

    rows: list[dict[str, Any]] = list(saved.get("rows", []))

    def record(method: str, t: str, cost: float, seconds: float, extra: dict | None = None) -> None:
        hyps = {d: tr(f"{d}/test", sets[d]["test"][0]) for d in (t, source)}
        cmp = {d: seq2seq.metric("bleu").compare(sentence_stats("bleu", base[d], sets[d]["test"][1]),
                                                 sentence_stats("bleu", hyps[d], sets[d]["test"][1]), n_resamples=sc.n_bootstrap,
                                                 seed=sc.subset_seed) for d in (t, source)}
        c = cmp[t]
        rows.append({"model": "marian", "target": t, "method": method, "metric": "bleu", "unit": "BLEU", "baseline": c["a"],
                     "value": c["b"], "gain": c["diff"], "ci_low": c["low"], "ci_high": c["high"],
                     "in_domain_gain": cmp[source]["diff"], "label_free": method in MT_LABEL_FREE, "forward_equivalents": cost,
                     "seconds": seconds, "chrf": corpus_scores(hyps[t], sets[t]["test"][1])["chrf"], **(extra or {})})

    from tqdm.auto import tqdm

    bar = tqdm(total=len(targets) * len(MT_METHODS), initial=len(done) * len(MT_METHODS), desc="fit-knobs translation",
               disable=not show_progress)
    for t in targets:
        if t in done:
            continue
        src, ref = sets[t]["dev"]
        held, fit = holdout_split(len(src), cfg.holdout, cfg.seed)
        proto.reset()
        record("baseline", t, 0.0, 0.0)
        bar.update(1)
        # the translation study's search, per site; the site with the best dev BLEU is kept
        s0 = time.perf_counter()
        found = []
        for site in sc.sites:
            proto.reset()
            space = KnobSpace(sites=(site,), alpha_tau=ranges[site][0], stdev_tau=tuple(sc.stdev_range))
            found.append(proto.search(Choice(site, t), space, lambda m: corpus_scores(tr(f"{t}/dev", src), ref)["bleu"], sc.trials))
        best = max(found, key=lambda c: c.value)
        proto.apply(best)
        record("search", t, float(sum(c.trials for c in found) * len(src)), time.perf_counter() - s0,
               {"site": best.method, "knobs": best.params})
        bar.update(1)
        # knobs fitted by gradient on the dev references, then label-free on the model's own translations
        proto.reset()
        own = tr(f"{t}/dev", src)  # the unregularised model's greedy translations: pseudo-targets
        labelled = {"train": pairs([src[i] for i in fit], [ref[i] for i in fit]), "held": pairs([src[i] for i in held], [ref[i] for i in held])}
        unlabelled = {"train": pairs([src[i] for i in fit], [own[i] for i in fit]), "held": pairs([src[i] for i in held], [own[i] for i in held])}
        decode_cost = float(len(src))
        for method, groups, data, objective in (("fit-site", "site", labelled, "nll"), ("fit-layer", "layer", labelled, "nll"),
                                                ("fit-head", "head", labelled, "nll"), ("fit-entropy", "layer", unlabelled, decoder_entropy)):
            proto.reset()
            res = nv.fit_knobs(model, data["train"], objective, groups=groups, steps=cfg.steps, lr=cfg.lr, validation=data["held"],
                               patience=cfg.patience, show_progress=False)
            cost = fit_cost(res.steps, 1 + len(res.history), _rows(data["train"]), _rows(data["held"]))
            cost += decode_cost if data is unlabelled else 0.0
            record(method, t, cost, res.seconds, {"knobs": {k: v.as_dict() for k, v in res.knobs.items()}, "nats": res.nats,
                                                  "best_step": res.best_step, "steps": res.steps})
            bar.update(1)
        proto.reset()
        info = tent(model, unlabelled["train"], steps=cfg.steps, lr=cfg.tent_lr, validation=unlabelled["held"], patience=cfg.patience,
                    loss=decoder_entropy)
        record("tent", t, fit_cost(info["steps"], info["measurements"], _rows(unlabelled["train"]), _rows(unlabelled["held"])) + decode_cost,
               info["seconds"], {"best_step": info["best_step"], "steps": info["steps"]})
        restore(model, info["state"])
        bar.update(1)
        if partial is not None:
            done.append(t)
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps({"config": config, "rows": rows, "done": done, "seconds": seconds_before + time.time() - t0},
                                          indent=1, default=str))
    bar.close()
    proto.reset()
    if partial is not None:
        partial.unlink(missing_ok=True)
    return {"config": asdict(cfg), "rows": rows,
            "info": {"seconds": seconds_before + time.time() - t0, "threads": torch.get_num_threads(), "s_alpha_min": s_min,
                     "resumed_after": [t for t in saved.get("done", [])],
                     "model": {"best_epoch": train_info["history"]["best_epoch"], "train_seconds": train_info.get("seconds")},
                     "data": {d: sets[d]["info"] for d in sets}}}


_MT_COLUMNS = [("target", "{target}"), ("method", "{method}"), ("BLEU", "{value:.2f}"), ("gain", "{gain:+.2f}"),
               ("95% CI", "[{ci_low:+.2f}, {ci_high:+.2f}]"), ("koran (in-domain)", "{in_domain_gain:+.2f}"),
               ("forward equivalents", "{forward_equivalents:.0f}"), ("seconds", "{seconds:.1f}")]


def _reading(rows: list[dict]) -> str:
    methods = [m for m in MT_METHODS if m != "baseline" and any(r["method"] == m for r in rows)]
    if not methods:
        return ""
    mean = {m: sum(r["gain"] for r in rows if r["method"] == m) / sum(r["method"] == m for r in rows) for m in methods}
    sig = {m: [r["target"] for r in rows if r["method"] == m and r["ci_low"] > 0] for m in methods}
    worse = {m: [r["target"] for r in rows if r["method"] == m and r["ci_high"] < 0] for m in methods}
    best = max(methods, key=lambda m: mean[m])
    base = [r for r in rows if r["method"] == "baseline"]
    floor = ""
    if base and max(r["baseline"] for r in base) < FLOOR_BLEU:
        floor = (f" The unregularised model scores below {FLOOR_BLEU:g} BLEU on every target ("
                 + ", ".join(f"{r['target']} {r['baseline']:.2f}" for r in base)
                 + "): the koran model does not translate these domains, so a gain cannot show here, and the part does not "
                 "measure what NV regularisation does for a translation model that transfers at all.")
    return ("**Reading, `marian` (the recorded run).** Mean test BLEU gain over the targets: "
            + ", ".join(f"{m} {mean[m]:+.2f}" for m in methods) + f". The best is {best}; significant gains (interval above 0): "
            + "; ".join(f"{m}: {', '.join(sig[m]) or 'none'}" for m in methods) + ". Significant losses: "
            + "; ".join(f"{m}: {', '.join(worse[m])}" for m in methods if worse[m]) + ("." if any(worse.values()) else "none.") + floor)


def translation_lines(res: dict[str, Any], table_rows: list[dict]) -> list[str]:
    """The markdown lines of the translation part (``table_rows``: its rows as read back from the CSV)."""
    c = res["config"]
    sc = c["study"]
    return ["", f"Model `marian` (`.venv/bin/python experiments/fit_knobs.py --models marian`; {res['info']['seconds'] / 60:.0f} min, "
            f"{res['info']['threads']} torch threads): the translation study's koran German-to-English Marian model (epoch "
            f"{res['info']['model']['best_epoch']}), its three sites; prior of {sc['n_prior']} koran training pairs (seed {sc['prior_seed']}); "
            f"per target (law, medical, it; OPUS via Koehn & Knowles 2017) {sc['n_dev']} dev pairs, of which fitting methods fit on "
            f"{1 - c['holdout']:.0%} and choose the step on the rest ({c['steps']} steps at most, lr {c['lr']}, patience {c['patience']}; "
            f"TENT lr {c['tent_lr']}), and {sc['n_test']} test pairs (seed {sc['subset_seed']}; greedy decoding; gain in sacrebleu BLEU "
            f"points with a paired bootstrap 95% interval, {sc['n_bootstrap']} resamples); `koran (in-domain)`: the BLEU change of the "
            f"target's choice on {sc['n_test']} koran test pairs. `search`: {sc['trials']} Optuna trials per site, the best site on dev "
            "BLEU kept. Methods: `nvformer_studies.fitknobs.translation`.", "", markdown_table(table_rows, _MT_COLUMNS), "", _reading(table_rows)]

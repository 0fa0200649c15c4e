"""Knobs fitted by gradient against the alternatives a user would try (issue 18; docs/RESULTS.md
section "fit-knobs"; tables and text: :mod:`nvformer_studies.fitknobs.report`).

Models (``FitStudyConfig.setting``): ``"finetuned"``, all-MiniLM-L6-v2 + classification head
fine-tuned on ``books`` (the sentiment study's model, :func:`nvformer_studies.sentiment.data.load_classifier`);
``"frozen"``, the pretrained all-MiniLM-L6-v2 encoder as a frozen feature extractor (mean-pooled,
L2-normalised) with a logistic-regression head fitted on the ``books`` training split (the
sentiment study's frozen-feature setting, :class:`~nvformer_studies.sentiment.study.MeanPoolClassifier`;
no WiSE-FT rows: nothing was fine-tuned). Either is converted at the identity with the empirical
prior of 256 source training reviews. Targets: the six other
review domains. Per target, the validation split (200 reviews) is what every method may see; it is
divided (seed ``split_seed``) into a fitting part (150) and a held-out part (50) that chooses the
step and stops early. Test: the target's test split (400) and the source's (the in-domain cost).

==================  ==========================================================================
``baseline``        the fine-tuned model
``search``          one knob setting for all layers, Optuna TPE on the validation accuracy
                    (``trials`` trials, identity corner first; the sentiment study's ``nv-target``)
``fit-site``        :func:`nvformer.fit_knobs`, ``nll`` with the labels, one setting (in nats) for all layers
``fit-layer``       the same with one setting per layer
``fit-head``        the same with one ``alpha_tau`` and ``stdev_tau`` per head (``mu_tau`` stays 1)
``fit-layer-length`` ``fit-layer`` with the length-aware prior (``prior_scaling="length"``: the prior's
                    pseudo-count times the tokens each query sees), against short-input collapse
``fit-entropy``     ``fit-layer`` on the unlabelled validation text, mean prediction entropy (TENT's objective)
``fit-im``          the same with information maximisation (SHOT's objective)
``tent``            TENT: the LayerNorm affine parameters adapted by entropy on the same unlabelled text,
                    same steps and held-out rule (:func:`nvformer_studies.common.tent.tent`)
``wise``            WiSE-FT: encoder weights ``(1 - l) pretrained + l fine-tuned``, ``l`` chosen on the
                    validation accuracy
``control``         the non-variational control: the attention of the best set of layers (none, one,
                    or the last k, by validation accuracy) goes to the prior component only
==================  ==========================================================================

Transfer: the ``fit-layer`` knobs of every target applied to every other target's test split.
Cost: forwards over one example (a training step counts 3 per example: forward and backward) and
seconds on this machine, per method and target.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import nvformer as nv
from nvformer import KnobSpace
from nvformer.api import knob_groups
from nvformer.metrics import classification_metrics
from nvformer.tasks import TextBatches, classification_batches, holdout_split, labelled_batches

from ..common.protocol import Choice, Protocol, convert_at_identity
from ..common.subsets import seeded_subset
from ..common.tensorfiles import load_tensors, save_tensors
from ..common.tent import restore, tent
from ..sentiment.data import domain_splits
from ..sentiment.study import TARGETS, prior_only

__all__ = ["FIT_METHODS", "SETTINGS", "FitStudyConfig", "fit_cost", "load_fit_study", "run_fit_study", "time_fits", "with_labels"]

FIT_METHODS = ("baseline", "search", "fit-site", "fit-layer", "fit-head", "fit-layer-length", "fit-entropy", "fit-im", "tent", "wise",
               "control")
LABEL_FREE = ("fit-entropy", "fit-im", "tent")
SETTINGS = ("finetuned", "frozen")


@dataclass
class FitStudyConfig:
    """Settings of the study (the docs/RESULTS.md budget by default; :meth:`smoke` for a check).

    Args:
        setting: ``"finetuned"`` (the classifier of ``model_dir``) or ``"frozen"`` (the pretrained
            encoder's mean-pooled features and a head fitted on the source training split).
        model_dir: the fine-tuned source classifier (fine-tuned there if missing and it is the
            project's books model; any other folder is loaded as it is).
        pretrained_dir: the pretrained encoder for WiSE-FT (None: the all-MiniLM-L6-v2 package).
        n_val, n_test: cap on the validation / test examples per domain (None: all, 200 / 400).
        holdout: share of the validation examples held out to choose the step and stop early.
        trials: Optuna trials of ``search``; steps, lr, patience: :func:`nvformer.fit_knobs` (and TENT's steps).
        tent_lr: TENT's Adam learning rate (the paper's 1e-3).
        wise: WiSE weights tried besides 1 (empty: no WiSE rows).
    """

    setting: str = "finetuned"
    model_dir: str = "runs/minilm-books"
    pretrained_dir: str | None = None
    source: str = "books"
    targets: tuple[str, ...] = TARGETS
    split_seed: int = 0
    max_length: int = 128
    batch_size: int = 16
    n_val: int | None = None
    n_test: int | None = None
    holdout: float = 0.25
    prior_examples: int = 256
    trials: int = 10
    steps: int = 50
    lr: float = 0.3
    patience: int = 3
    tent_lr: float = 1e-3
    alpha_tau: tuple[float, float] = (-4.0, 4.0)
    stdev_tau: tuple[float, float] = (0.0, 0.5)
    wise: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    seed: int = 0
    bootstrap: int = 1000

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"FitStudyConfig: unknown setting {self.setting!r}; settings are {', '.join(SETTINGS)}")
        if self.setting == "frozen":
            self.wise = ()  # nothing was fine-tuned: no WiSE-FT end points

    @classmethod
    def smoke(cls, **kw) -> FitStudyConfig:
        return cls(**{**dict(targets=("dvd", "airline"), n_val=24, n_test=24, trials=2, steps=3, prior_examples=16, wise=(0.5,),
                             bootstrap=50), **kw})


def _examples(cfg: FitStudyConfig, domain: str, split: str, n: int | None) -> tuple[list[str], list[int]]:
    texts, labels = domain_splits(domain, cfg.split_seed)[split]
    idx = seeded_subset(len(labels), n, cfg.split_seed, labels=labels)
    return [texts[i] for i in idx], [labels[i] for i in idx]


def _batches(tok, texts, labels, cfg: FitStudyConfig) -> TextBatches:
    return classification_batches(tok, texts, labels, batch_size=cfg.batch_size, max_length=cfg.max_length)


def with_labels(data: TextBatches, labels: bool = True) -> list[dict[str, Tensor]]:
    """The batches of ``data`` as model inputs, with their ``labels`` in batch order (or none)."""
    return labelled_batches(data, "classification") if labels else [dict(b) for b in data.batches]


def _rows(batches: list[dict[str, Tensor]]) -> list[int]:
    return [int(b["input_ids"].shape[0]) for b in batches]


def fit_cost(steps: int, measurements: int, train_rows: list[int], held_rows: list[int]) -> float:
    """Forwards over one example: 3 per example of each training step, 1 per held-out example measured."""
    trained = sum(train_rows[(s - 1) % len(train_rows)] for s in range(1, steps + 1))
    return 3.0 * trained + measurements * sum(held_rows)


def _prior_scaling(model: nn.Module, scaling: str) -> None:
    """Every NVIB's prior scaling (``"constant"``, or ``"length"``: the length-aware prior of ``fit-layer-length``)."""
    for _, _, nvib in knob_groups(model):
        nvib.prior_scaling = scaling


def _logits(model: nn.Module, data: TextBatches) -> Tensor:
    with torch.no_grad():
        return data.unsort(torch.cat([model(**b).logits.float() for b in data.batches]))


def _source_model(cfg: FitStudyConfig, show_progress: bool) -> tuple[nn.Module, Any, dict | None]:
    """``(model, tokenizer, head info)``: the fine-tuned classifier (``"finetuned"``, head info None) or
    the pretrained encoder with a logistic-regression head fitted on the source training split
    (``"frozen"``; head info: the chosen L2 penalty and source validation accuracy)."""
    from ..sentiment.study import MeanPoolClassifier, StudyConfig, _load_pretrained_encoder

    if cfg.setting == "finetuned":
        from ..sentiment.data import load_classifier

        model, tok, _ = load_classifier(cfg.model_dir, cfg.source, cfg.split_seed, show_progress=show_progress)
        return model, tok, None
    enc, tok = _load_pretrained_encoder(StudyConfig(pretrained_dir=cfg.pretrained_dir, model_dir=cfg.model_dir))
    torch.manual_seed(cfg.seed)
    model = MeanPoolClassifier(enc).eval()
    train = domain_splits(cfg.source, cfg.split_seed)["train"]
    info = model.fit_head(_batches(tok, *train, cfg), _batches(tok, *_examples(cfg, cfg.source, "validation", cfg.n_val), cfg))
    return model, tok, info


def _converted(cfg: FitStudyConfig, show_progress: bool) -> tuple:
    """``(model, tokenizer, head info, nvm, protocol, forward)``: the source model (:func:`_source_model`)
    with the module that holds the NV attention (``nvm``: the frozen setting's encoder, else the model)
    converted at the identity with the empirical prior of ``prior_examples`` source training reviews,
    its :class:`Protocol`, and the ``forward`` that :func:`nvformer.fit_knobs` needs for the
    classifier's outputs (None when ``nvm`` is the classifier)."""
    model, tok, head_info = _source_model(cfg, show_progress)
    train_texts = domain_splits(cfg.source, cfg.split_seed)["train"][0][: cfg.prior_examples]
    nvm = model.encoder if cfg.setting == "frozen" else model
    convert_at_identity(nvm, classification_batches(tok, train_texts, batch_size=cfg.batch_size, max_length=cfg.max_length).batches)
    forward = None if nvm is model else (lambda _, b: model(**b))
    return model, tok, head_info, nvm, Protocol(nvm, seed=cfg.seed), forward


def _validation(cfg: FitStudyConfig, tok, target: str) -> tuple[list[str], list[int], TextBatches, TextBatches]:
    """``(texts, labels, fit part, held-out part)`` of ``target``'s validation subset, divided by
    :func:`nvformer.tasks.holdout_split` (seed ``split_seed``)."""
    texts, labels = _examples(cfg, target, "validation", cfg.n_val)
    held_idx, fit_idx = holdout_split(len(texts), cfg.holdout, cfg.split_seed)
    pick = lambda idx: _batches(tok, [texts[i] for i in idx], [labels[i] for i in idx], cfg)  # noqa: E731
    return texts, labels, pick(fit_idx), pick(held_idx)


PARTIAL_FILE = "partial.safetensors"  # run_fit_study's state after every finished target, while it runs


def _load_partial(path: Path, cfg: FitStudyConfig) -> tuple[list[dict], dict[str, Tensor], dict[tuple[str, str], dict], list[str], float]:
    """What :func:`run_fit_study` saved after its last finished target, if ``path`` holds it for the same
    settings (otherwise nothing: the run starts over)."""
    if not path.exists():
        return [], {}, {}, [], 0.0
    tensors, meta = load_tensors(path)
    if meta.get("config") != json.loads(json.dumps(asdict(cfg))):
        return [], {}, {}, [], 0.0
    knobs_of = {tuple(k.split("|", 1)): v for k, v in meta["knobs_of"].items()}
    return meta["rows"], dict(tensors.get("logits", {})), knobs_of, meta["done"], meta["seconds"]


def run_fit_study(cfg: FitStudyConfig, out: str | Path | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Run every method on every target (module docstring); returns ``{"config", "rows", "transfer",
    "info"}`` and saves it to ``out/results.json`` with the test logits (``out/logits.safetensors``).

    With ``out``, the state after every finished target is kept in ``out/partial.safetensors`` until
    the run ends; a run stopped in between resumes from it (same settings) with the next target, and
    ends with the rows of an uninterrupted run (every target starts from the same reset model)."""
    t0 = time.time()
    partial = Path(out) / PARTIAL_FILE if out is not None else None
    rows, logits, knobs_of, done, seconds_before = _load_partial(partial, cfg) if partial is not None else ([], {}, {}, [], 0.0)
    resumed = list(done)
    if done and show_progress:
        print(f"resumed from {partial} after {', '.join(done)}", flush=True)
    model, tok, head_info, nvm, proto, forward = _converted(cfg, show_progress)
    n_layers = len(nv.get_knobs(nvm))
    test = {d: _batches(tok, *_examples(cfg, d, "test", cfg.n_test), cfg) for d in (cfg.source, *cfg.targets)}

    def record(method: str, target: str, cost: float, seconds: float, extra: dict | None = None) -> None:
        for domain in (target, cfg.source):
            lg = _logits(model, test[domain])
            logits[f"{method}|{target}|{domain}"] = lg
            m = classification_metrics(lg, test[domain].labels)
            rows.append({"method": method, "target": target, "domain": domain, "accuracy": m["accuracy"], "nll": m["nll"],
                         "forward_equivalents": cost, "seconds": seconds, **(extra or {})})

    from tqdm.auto import tqdm

    bar = tqdm(total=len(cfg.targets) * len(FIT_METHODS), initial=len(done) * len(FIT_METHODS), desc="fit-knobs study",
               disable=not show_progress)
    pre = None
    if cfg.wise:
        from ..sentiment.study import StudyConfig, _load_pretrained_encoder, _wise_set

        pre_model, _ = _load_pretrained_encoder(StudyConfig(pretrained_dir=cfg.pretrained_dir, model_dir=cfg.model_dir))
        pre = {k: v.detach().clone() for k, v in pre_model.state_dict().items()}
        finetuned = {k: v.detach().clone() for k, v in model.base_model.named_parameters() if k in pre}
    for t in cfg.targets:
        if t in done:
            continue
        texts, labels, fit_data, held_data = _validation(cfg, tok, t)
        val = _batches(tok, texts, labels, cfg)
        proto.reset()
        record("baseline", t, 0.0, 0.0)
        bar.update(1)
        # the search of today's study, on the whole validation split
        s0 = time.perf_counter()
        choice = proto.search(Choice("search", t), KnobSpace(alpha_tau=cfg.alpha_tau, stdev_tau=cfg.stdev_tau),
                              lambda _: float((_logits(model, val).argmax(-1) == val.labels).double().mean()), cfg.trials)
        record("search", t, float(choice.trials * len(texts)), time.perf_counter() - s0, {"knobs": choice.params})
        bar.update(1)
        # knobs fitted by gradient
        for method, objective, groups, labelled in (("fit-site", "nll", "site", True), ("fit-layer", "nll", "layer", True),
                                                    ("fit-head", "nll", "head", True), ("fit-layer-length", "nll", "layer", True),
                                                    ("fit-entropy", "entropy", "layer", False), ("fit-im", "information_maximisation", "layer", False)):
            proto.reset()
            _prior_scaling(nvm, "length" if method.endswith("-length") else "constant")
            train_b, held_b = with_labels(fit_data, labelled), with_labels(held_data, labelled)
            res = nv.fit_knobs(nvm, train_b, objective, groups=groups, steps=cfg.steps, lr=cfg.lr, validation=held_b,
                               patience=cfg.patience, show_progress=False, forward=forward)
            cost = fit_cost(res.steps, 1 + len(res.history), _rows(train_b), _rows(held_b))
            knobs_of[(method, t)] = {k: v.as_dict() for k, v in res.knobs.items()}
            record(method, t, cost, res.seconds, {"knobs": knobs_of[(method, t)], "nats": res.nats, "head_knobs": res.head_knobs,
                                                  "best_step": res.best_step, "steps": res.steps})
            bar.update(1)
        proto.reset()
        _prior_scaling(nvm, "constant")
        # TENT, on the same unlabelled text and budget
        train_b, held_b = with_labels(fit_data, False), with_labels(held_data, False)
        info = tent(model, train_b, steps=cfg.steps, lr=cfg.tent_lr, validation=held_b, patience=cfg.patience)
        record("tent", t, fit_cost(info["steps"], info["measurements"], _rows(train_b), _rows(held_b)), info["seconds"],
               {"best_step": info["best_step"], "steps": info["steps"]})
        restore(model, info["state"])
        bar.update(1)
        # WiSE-FT, the weight chosen on the validation accuracy (ties: nearest the fine-tuned model)
        if pre is not None:
            s0 = time.perf_counter()
            acc = {}
            for lam in [1.0, *sorted(cfg.wise, reverse=True)]:
                _wise_set(model, pre, finetuned, lam)
                acc[lam] = float((_logits(model, val).argmax(-1) == val.labels).double().mean())
            lam = max(acc, key=lambda x: acc[x])
            _wise_set(model, pre, finetuned, lam)
            record("wise", t, float(len(acc) * len(texts)), time.perf_counter() - s0, {"lam": lam})
            _wise_set(model, pre, finetuned, 1.0)
        bar.update(1)
        # the prior-only control over the best set of layers
        s0 = time.perf_counter()
        candidates = [()] + [(i,) for i in range(n_layers)] + [tuple(range(n_layers - k, n_layers)) for k in range(2, n_layers + 1)]
        acc = {}
        for layers in candidates:
            proto.reset()
            if layers:
                prior_only(nvm, layers)
            acc[layers] = float((_logits(model, val).argmax(-1) == val.labels).double().mean())
        best = max(acc, key=lambda k: acc[k])
        proto.reset()
        if best:
            prior_only(nvm, best)
        record("control", t, float(len(candidates) * len(texts)), time.perf_counter() - s0, {"control": list(best)})
        proto.reset()
        bar.update(1)
        if partial is not None:
            done.append(t)
            partial.parent.mkdir(parents=True, exist_ok=True)
            save_tensors(partial, {"logits": logits}, {"config": asdict(cfg), "rows": rows, "done": done, "seconds": seconds_before + time.time() - t0,
                                                      "knobs_of": {f"{m}|{tt}": v for (m, tt), v in knobs_of.items()}})
    bar.close()
    # transfer: the fit-layer knobs of each target on the others
    transfer = []
    for src_t in cfg.targets:
        nv.set_knobs(nvm, knobs_of[("fit-layer", src_t)])
        for t in cfg.targets:
            lg = _logits(model, test[t])
            logits[f"transfer|{src_t}|{t}"] = lg
            transfer.append({"fitted_on": src_t, "target": t, "accuracy": classification_metrics(lg, test[t].labels)["accuracy"]})
        proto.reset()
    res = {"config": asdict(cfg), "rows": rows, "transfer": transfer, "n_layers": n_layers, "head": head_info,
           "lengths": {d: test[d].unsort(torch.cat([b["attention_mask"].sum(1) for b in test[d].batches])).tolist() for d in test},
           "info": {"seconds": seconds_before + time.time() - t0, "threads": torch.get_num_threads(), "resumed_after": resumed}}
    labels_ = {d: test[d].labels for d in test}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
        save_tensors(out / "logits.safetensors", {"logits": logits, "labels": labels_})
        partial.unlink(missing_ok=True)
    res["logits"], res["labels"] = logits, labels_
    return res


def time_fits(cfg: FitStudyConfig, groups: tuple[str, ...] = ("site", "layer", "head"), show_progress: bool = True) -> list[dict[str, Any]]:
    """The cost of labelled :func:`nvformer.fit_knobs` alone, as the study fits it (same model, prior,
    validation subsets, held-out split and budget) but with nothing else running in the process: one
    row per (target, groups) with the examples seen, the steps taken, forward equivalents and seconds
    (``FitResult.seconds``, the whole call including the held-out measurements)."""
    _, tok, _, nvm, proto, forward = _converted(cfg, show_progress)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(cfg.targets) * len(groups), desc="timed fits", disable=not show_progress)
    rows = []
    for t in cfg.targets:
        texts, _, fit_data, held_data = _validation(cfg, tok, t)
        train_b, held_b = with_labels(fit_data), with_labels(held_data)
        for g in groups:
            proto.reset()
            res = nv.fit_knobs(nvm, train_b, "nll", groups=g, steps=cfg.steps, lr=cfg.lr, validation=held_b, patience=cfg.patience,
                               show_progress=False, forward=forward)
            rows.append({"model": cfg.setting, "target": t, "groups": g, "examples": len(texts), "steps": res.steps,
                         "best_step": res.best_step, "forward_equivalents": fit_cost(res.steps, 1 + len(res.history), _rows(train_b), _rows(held_b)),
                         "seconds": res.seconds, "threads": torch.get_num_threads()})
            bar.update(1)
    bar.close()
    proto.reset()
    return rows


def load_fit_study(out: str | Path) -> dict[str, Any]:
    """What :func:`run_fit_study` saved in ``out``."""
    out = Path(out)
    res = json.loads((out / "results.json").read_text())
    tensors, _ = load_tensors(out / "logits.safetensors")
    res["logits"], res["labels"] = tensors["logits"], tensors["labels"]
    return res

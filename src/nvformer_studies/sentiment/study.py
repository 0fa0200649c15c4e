"""The out-of-domain sentiment study: NV post-training regularisation against what a user would
try instead (the project's main demo, ``nvformer-studies study``).

A classifier fine-tuned on the source domain (all-MiniLM-L6-v2 + head, books) is converted to an
NV model with an empirical prior from its source training text (identity knobs: outputs
unchanged) and evaluated on six target domains, with no training, under these *methods*:

==================  ==========================================================================
``baseline``        the fine-tuned model
``nv-target``       one knob setting for all layers, Optuna search on the target validation split
``nv-source``       the same search on the *source* validation split (no target data at all)
``nv-label-free``   the same search maximising the information-maximisation score
                    ``H(mean p) - mean H(p)`` of the predictions on the *unlabelled* target
                    validation text (confident yet not collapsed to one class; the criterion of
                    Liang et al. 2020, SHOT, used here for selection only)
``nv-layer-L``      the search restricted to layer ``L`` (other layers unchanged)
``nv-best-layer``   the ``nv-layer-L`` whose validation accuracy is best
``nv-per-layer``    separate knobs for every layer, searched jointly
``control-layer-L`` the non-variational control: layer ``L``'s attention goes entirely to the
                    prior component (``alpha_tau = -1e4``: the source mean's value vector)
``control-target``  the control over the best set of layers (none, one layer, or the last k)
                    by target validation accuracy
``wise-target``     WiSE-FT (Wortsman et al. 2022): encoder weights ``(1 - l) pretrained +
                    l fine-tuned``, ``l`` chosen on the target validation split
``wise-source``     the same with ``l`` chosen on the source validation split
``wise+nv-target``  ``nv-target`` on top of the ``wise-target`` model (prior re-estimated for it)
==================  ==========================================================================

Every search uses :func:`nvformer.tune` (Optuna TPE, seeded, identity corner first, so ties keep
the unregularised model) with forward passes through a :class:`nvformer.tuning.cache.KnobCache`
(tokenised once, length-batched, memoised, layers before the first changed one replayed).
The *frozen-feature* setting repeats the NV methods on the pretrained encoder with mean-pooled,
normalised sentence features and a logistic-regression head fitted on the source train split.

Every search and setting goes through the shared protocol (:mod:`nvformer_studies.common.protocol`):
the source prior, conversion at :data:`nvformer.IDENTITY`, searches from the identity.

Splits: every domain is split by :func:`nvformer_studies.sentiment.data.domain_splits` (stratified
0.7 / 0.1 / 0.2, ``split_seed``); ``n_val`` / ``n_test`` take seeded stratified subsets
(:func:`nvformer_studies.common.subsets.seeded_subset`). Tables, plots and the headline:
:mod:`nvformer_studies.sentiment.report`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nvformer import KnobSpace, estimate_prior, set_knobs
from nvformer.api import nv_modules
from nvformer.metrics import classification_metrics
from nvformer.tasks import TextBatches, classification_batches
from nvformer.tuning.cache import KnobCache

from ..common.protocol import Choice, Protocol, convert_at_identity
from ..common.subsets import seeded_subset
from ..common.tensorfiles import load_tensors, save_tensors
from .data import domain_splits

__all__ = ["TARGETS", "MeanPoolClassifier", "SentimentChoice", "StudyConfig", "StudyResult", "information_maximisation", "prior_only",
           "run_study"]

TARGETS = ("dvd", "electronics", "kitchen", "airline", "imdb", "blog")
LOGITS_FILE = "logits.safetensors"  # StudyResult's test logits and labels
CONTROL_ALPHA = -1e4  # token pseudo-counts exp(-1e4 * s_alpha) = 0: all attention on the prior component


@dataclass
class StudyConfig:
    """Settings of the study; :meth:`demo` and :meth:`full` are the two budgets used in the docs.

    Args:
        model_dir: the fine-tuned source classifier (fine-tuned there first if missing; see
            :func:`nvformer_studies.sentiment.data.load_or_finetune`).
        pretrained_dir: the pretrained encoder (WiSE-FT end point, frozen features); None = the
            all-MiniLM-L6-v2 package.
        max_length, batch_size: tokenisation and evaluation batches.
        n_val, n_test: cap on the examples per validation / test split (None: all: 200 / 400).
        prior_examples: source training reviews for the empirical prior.
        trials, layer_trials, joint_trials: Optuna trials of the all-layer, single-layer and
            per-layer searches (each includes the identity corner).
        alpha_tau, stdev_tau: the knob ranges searched.
        wise: the interpolation weights ``l`` tried besides 1 (the fine-tuned model).
        frozen: also run the frozen-feature setting.
        bootstrap: paired bootstrap resamples for the confidence intervals.
    """

    model_dir: str = "runs/minilm-books"
    pretrained_dir: str | None = None
    source: str = "books"
    targets: tuple[str, ...] = TARGETS
    split_seed: int = 0
    max_length: int = 128
    batch_size: int = 32
    n_val: int | None = None
    n_test: int | None = None
    prior_examples: int = 256
    trials: int = 12
    layer_trials: int = 6
    joint_trials: int = 24
    alpha_tau: tuple[float, float] = (-4.0, 4.0)
    stdev_tau: tuple[float, float] = (0.0, 0.5)
    wise: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)
    frozen: bool = True
    seed: int = 0
    bootstrap: int = 1000
    data_dir: str | None = None

    @classmethod
    def demo(cls, **kw) -> StudyConfig:
        """The README's small budget (minutes on 2 CPU cores once the model is fine-tuned)."""
        return cls(**{**dict(n_val=64, n_test=128, trials=4, layer_trials=3, joint_trials=6, wise=(0.6, 0.8), frozen=False,
                             prior_examples=128, bootstrap=500), **kw})

    @classmethod
    def full(cls, **kw) -> StudyConfig:
        """The budget of docs/RESULTS.md (about 1.5 h on 2 CPU cores)."""
        return cls(**{**dict(trials=10, layer_trials=5, joint_trials=15), **kw})

    def __post_init__(self) -> None:
        from ..common.data import REVIEW_DOMAINS

        bad = [d for d in (self.source, *self.targets) if d not in REVIEW_DOMAINS]
        if bad:
            raise ValueError(f"StudyConfig: unknown domain(s) {bad}; domains are {REVIEW_DOMAINS}")
        if self.source in self.targets:
            raise ValueError(f"StudyConfig: the source {self.source!r} cannot also be a target")
        if min(self.trials, self.layer_trials, self.joint_trials) < 1:
            raise ValueError("StudyConfig: trial counts must be >= 1")
        if any(not 0.0 <= w < 1.0 for w in self.wise):
            raise ValueError(f"StudyConfig: WiSE weights must lie in [0, 1), got {self.wise}")


# ---------------------------------------------------------------------------------------------
# small pieces


def information_maximisation(logits: Tensor) -> float:
    """``H(mean_i p_i) - mean_i H(p_i)`` of the predictive distributions (nats; label-free).

    High when every prediction is confident and the predicted classes are balanced over the set.
    """
    logp = torch.log_softmax(logits.double(), -1)
    p = logp.exp()
    marginal = p.mean(0)
    h_marginal = -(marginal * marginal.clamp_min(1e-300).log()).sum()
    h_each = -(p * logp).sum(-1).mean()
    return float(h_marginal - h_each)


def prior_only(model: nn.Module, layers) -> None:
    """The control: the NV attention of ``layers`` attends only to the prior component."""
    set_knobs(model, layers=layers, alpha_tau=CONTROL_ALPHA, stdev_tau=0.0, mu_tau=1.0)


class MeanPoolClassifier(nn.Module):
    """A frozen encoder with mean-pooled, L2-normalised features and a linear head.

    ``forward(**batch).logits`` is ``[B, C]``, so it evaluates like a Hugging Face classifier.
    """

    def __init__(self, encoder: nn.Module, num_labels: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)

    def features(self, input_ids: Tensor, attention_mask: Tensor, **kw) -> Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        m = attention_mask[..., None].to(h.dtype)
        return nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor | None = None, **kw):
        """``.logits [B, C]``; with ``labels [B]`` also ``.loss``, their mean cross-entropy."""
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.head(self.features(input_ids, attention_mask, **kw))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def fit_head(self, train: TextBatches, val: TextBatches, l2_grid=(1e-2, 1e-3, 1e-4)) -> dict[str, float]:
        """Logistic regression (L-BFGS, L2 penalty chosen on ``val`` accuracy) on the frozen features."""
        self.eval()

        def feats(data):
            return data.unsort(torch.cat([self.features(**b) for b in data.batches]))

        xt, xv = feats(train), feats(val)
        best = None
        for l2 in l2_grid:
            head = nn.Linear(xt.shape[1], self.head.out_features).to(xt)
            opt = torch.optim.LBFGS(head.parameters(), max_iter=300, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = nn.functional.cross_entropy(head(xt), train.labels) + l2 * head.weight.pow(2).sum()
                loss.backward()
                return loss

            with torch.enable_grad():
                opt.step(closure)
            acc = (head(xv).argmax(-1) == val.labels).float().mean().item()
            if best is None or acc > best[0]:
                best = (acc, l2, head)
        self.head.load_state_dict(best[2].state_dict())
        return {"val_accuracy": best[0], "l2": best[1]}


@dataclass
class SentimentChoice(Choice):
    """A configuration chosen by a method for a target: knobs (:class:`Choice`), and the WiSE
    weight ``lam`` of the encoder and the layers ``control`` sent to the prior component."""

    lam: float = 1.0
    control: tuple[int, ...] = ()


@dataclass
class StudyResult:
    """Everything the study measured: chosen configurations, metrics and test logits."""

    config: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    logits: dict[str, Tensor] = field(default_factory=dict)
    labels: dict[str, Tensor] = field(default_factory=dict)
    wise_curve: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, out: str | Path) -> StudyResult:
        """Read back what :meth:`save` wrote (tables and plots can be redrawn without rerunning)."""
        out = Path(out)
        meta = json.loads((out / "results.json").read_text())
        tensors, _ = load_tensors(out / LOGITS_FILE)
        return cls(config=meta["config"], rows=meta["rows"], logits=tensors.get("logits", {}), labels=tensors.get("labels", {}),
                   wise_curve=meta["wise_curve"], info=meta["info"])

    def save(self, out: Path) -> None:
        """Write ``results.json`` and the test logits and labels (``logits.safetensors``, bit-exact)."""
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"config": self.config, "rows": self.rows, "wise_curve": self.wise_curve,
                                                       "info": self.info}, indent=1, default=str))
        save_tensors(out / LOGITS_FILE, {"logits": self.logits, "labels": self.labels})


# ---------------------------------------------------------------------------------------------
# the runner


class _Runner(Protocol):
    """Searches and evaluations of one converted model over the study's data sets (the protocol
    with the study's memoised logits, control layers and result rows)."""

    def __init__(self, model: nn.Module, cfg: StudyConfig, sets: dict[tuple[str, str], TextBatches], setting: str,
                 result: StudyResult, bar) -> None:
        super().__init__(model, seed=cfg.seed)
        self.cfg, self.sets, self.setting, self.result, self.bar = cfg, sets, setting, result, bar
        self.reset()
        self.cache = KnobCache(model, max_bytes=6e9)
        self.cache.clear(tag=1.0)
        self.n_layers = len(self.cache.stack)

    def logits(self, domain: str, split: str) -> Tensor:
        return self.cache.logits(self.sets[(domain, split)])

    def accuracy(self, domain: str) -> Callable[[nn.Module], float]:
        data = self.sets[(domain, "validation")]
        return lambda model: float((self.cache.logits(data).argmax(-1) == data.labels).double().mean())

    def label_free(self, domain: str) -> Callable[[nn.Module], float]:
        data = self.sets[(domain, "validation")]
        return lambda model: information_maximisation(self.cache.logits(data))

    def space(self, **kw) -> KnobSpace:
        return KnobSpace(alpha_tau=self.cfg.alpha_tau, stdev_tau=self.cfg.stdev_tau, **kw)

    def tuned(self, method: str, target: str, space: KnobSpace, objective, n_trials: int, lam: float = 1.0) -> SentimentChoice:
        """The protocol's search for ``method`` on ``target`` (one step of the progress bar)."""
        choice = self.search(SentimentChoice(method, target, lam=lam), space, objective, n_trials)
        self.bar.update(1)
        return choice

    def apply(self, choice: SentimentChoice) -> None:
        """The protocol's :meth:`~Protocol.apply`, then the choice's control layers."""
        super().apply(choice)
        if choice.control:
            prior_only(self.model, choice.control)

    def control_candidates(self) -> list[tuple[int, ...]]:
        n = self.n_layers
        return [()] + [(layer,) for layer in range(n)] + [tuple(range(n - k, n)) for k in range(2, n + 1)]

    def choose_control(self, target: str) -> tuple[SentimentChoice, dict[tuple[int, ...], float]]:
        objective = self.accuracy(target)
        vals = {}
        for layers in self.control_candidates():
            self.apply(SentimentChoice("control", target, control=layers))
            vals[layers] = objective(self.model)
        best = max(vals, key=lambda k: vals[k])  # first maximum: "none" wins ties
        return SentimentChoice("control-target", target, control=best, value=vals[best]), vals

    def record(self, choice: SentimentChoice, *, test_domains, extra: dict | None = None) -> None:
        """Evaluate ``choice`` on the test split of ``test_domains`` and store rows + logits."""
        self.apply(choice)
        for domain in test_domains:
            data = self.sets[(domain, "test")]
            logits = self.cache.logits(data)
            key = f"{self.setting}|{choice.method}|{choice.target}|{domain}"
            self.result.logits[key] = logits
            self.result.labels[domain] = data.labels
            m = classification_metrics(logits, data.labels)
            self.result.rows.append({"setting": self.setting, "method": choice.method, "target": choice.target,
                                     "domain": domain, "lam": choice.lam, "val": choice.value,
                                     "params": choice.params, "control": list(choice.control), **m, **(extra or {})})
        self.reset()

    # -- the phases ---------------------------------------------------------------------------

    def knob_methods(self, targets, label_free: bool = True, per_layer: bool = True) -> dict[str, SentimentChoice]:
        """Every method that moves knobs of the unchanged weights; returns the ``nv-source`` choice."""
        cfg, src = self.cfg, self.cfg.source
        self.record(SentimentChoice("baseline", src), test_domains=[src, *targets])
        source = self.tuned("nv-source", src, self.space(), self.accuracy(src), cfg.trials)
        self.record(source, test_domains=[src, *targets])
        for t in targets:
            chosen = [self.tuned("nv-target", t, self.space(), self.accuracy(t), cfg.trials)]
            if label_free:
                chosen.append(self.tuned("nv-label-free", t, self.space(), self.label_free(t), cfg.trials))
            layers = [self.tuned(f"nv-layer-{layer}", t, self.space(layers=(layer,)), self.accuracy(t), cfg.layer_trials)
                      for layer in range(self.n_layers)]
            best = max(layers, key=lambda c: c.value)
            chosen.append(replace(best, method="nv-best-layer"))
            if per_layer:
                chosen.append(self.tuned("nv-per-layer", t, self.space(per_layer=True), self.accuracy(t), cfg.joint_trials))
            control, vals = self.choose_control(t)
            self.bar.update(1)
            chosen.append(control)
            for c in chosen:
                self.record(c, test_domains=[t, src])
            for c in layers:
                self.record(c, test_domains=[t])
            for layer in range(self.n_layers):
                self.record(SentimentChoice(f"control-layer-{layer}", t, control=(layer,), value=vals[(layer,)]), test_domains=[t])
        return {"nv-source": source}


def _load_pretrained_encoder(cfg: StudyConfig):
    from transformers import AutoModel, AutoTokenizer

    if cfg.pretrained_dir is None:
        from ..common.checkpoints import load_minilm

        return load_minilm()
    return AutoModel.from_pretrained(cfg.pretrained_dir).eval(), AutoTokenizer.from_pretrained(cfg.pretrained_dir)


def _wise_set(model: nn.Module, pretrained: dict[str, Tensor], finetuned: dict[str, Tensor], lam: float) -> None:
    """Encoder weights ``(1 - lam) pretrained + lam fine-tuned`` (in place)."""
    params = dict(model.base_model.named_parameters())
    with torch.no_grad():
        for name, ft in finetuned.items():
            params[name].copy_(torch.lerp(pretrained[name], ft, lam))


def _build_sets(cfg: StudyConfig, tok) -> tuple[dict[tuple[str, str], TextBatches], TextBatches, TextBatches]:
    sets = {}
    for domain in (cfg.source, *cfg.targets):
        s = domain_splits(domain, cfg.split_seed, cfg.data_dir)
        for split, n in (("validation", cfg.n_val), ("test", cfg.n_test)):
            texts, labels = s[split]
            idx = seeded_subset(len(labels), n, cfg.split_seed, labels=labels)
            sets[(domain, split)] = classification_batches(tok, [texts[i] for i in idx], [labels[i] for i in idx], batch_size=cfg.batch_size,
                                                           max_length=cfg.max_length)
    train = domain_splits(cfg.source, cfg.split_seed, cfg.data_dir)["train"]
    prior_set = classification_batches(tok, train[0][: cfg.prior_examples], batch_size=cfg.batch_size, max_length=cfg.max_length)
    train_set = classification_batches(tok, *train, batch_size=cfg.batch_size, max_length=cfg.max_length)
    return sets, prior_set, train_set


def run_study(cfg: StudyConfig, out_dir: str | Path | None = None, show_progress: bool = True) -> StudyResult:
    """Run every method of the study (see the module docstring); optionally save ``results.json``
    and ``logits.safetensors`` to ``out_dir`` (tables and plots: :func:`nvformer_studies.sentiment.report.write_outputs`)."""
    from .data import load_classifier

    t0 = time.time()
    model, tok, ft_info = load_classifier(cfg.model_dir, cfg.source, cfg.split_seed, data_dir=cfg.data_dir, show_progress=show_progress)
    sets, prior_set, train_set = _build_sets(cfg, tok)
    result = StudyResult(config=asdict(cfg), info={"finetune": ft_info})
    targets = list(cfg.targets)
    n_layers = model.config.num_hidden_layers
    per_target = 2 + n_layers + 2  # nv-target, label-free, layers, per-layer, control
    total = 1 + len(targets) * per_target + len(cfg.wise) + len(targets) + (
        (1 + len(targets) * (1 + n_layers + 1)) if cfg.frozen else 0)
    with _bar(total, show_progress) as bar:
        # --- the fine-tuned model, NV knobs --------------------------------------------------
        source_prior = convert_at_identity(model, prior_set.batches)
        run = _Runner(model, cfg, sets, "fine-tuned", result, bar)
        run.knob_methods(targets)
        # --- WiSE-FT and NV on top -----------------------------------------------------------
        pre_model, _ = _load_pretrained_encoder(cfg)
        pre = {k: v.detach().clone() for k, v in pre_model.state_dict().items()}
        finetuned = {k: v.detach().clone() for k, v in model.base_model.named_parameters() if k in pre}
        if not finetuned:
            raise ValueError("run_study: the pretrained encoder shares no parameter names with the fine-tuned model")

        def interpolate(lam: float) -> None:
            """WiSE weights ``lam`` with their own prior (the fine-tuned model's at 1); a fresh cache."""
            _wise_set(model, pre, finetuned, lam)
            if lam == 1.0:
                for name, m in nv_modules(model):
                    m.nvib.set_prior(source_prior[name])
            else:  # the prior of the interpolated model, estimated at the identity
                run.reset()
                estimate_prior(model, prior_set.batches, show_progress=False)
            run.cache.clear(tag=lam)

        domains = [cfg.source, *targets]
        curve = {1.0: {d: run.accuracy(d)(model) for d in domains}}
        for lam in sorted(cfg.wise):
            interpolate(lam)
            curve[lam] = {d: run.accuracy(d)(model) for d in domains}
            result.wise_curve += [{"lam": lam, "domain": d, "val_accuracy": curve[lam][d],
                                   "test_accuracy": classification_metrics(run.logits(d, "test"), sets[(d, "test")].labels)["accuracy"]}
                                  for d in domains]
            bar.update(1)
        base_test = {x["domain"]: x["accuracy"] for x in result.rows if x["setting"] == "fine-tuned" and x["method"] == "baseline"}
        result.wise_curve += [{"lam": 1.0, "domain": d, "val_accuracy": curve[1.0][d], "test_accuracy": base_test[d]} for d in domains]
        lams = [1.0, *sorted(cfg.wise, reverse=True)]  # ties keep the weight closest to the fine-tuned model
        pick = {d: max(lams, key=lambda lam: curve[lam][d]) for d in domains}
        for lam in sorted(set(pick.values())):
            interpolate(lam)
            if pick[cfg.source] == lam:
                run.record(SentimentChoice("wise-source", cfg.source, lam=lam, value=curve[lam][cfg.source]), test_domains=[cfg.source, *targets])
            for t in targets:
                if pick[t] != lam:
                    continue
                run.record(SentimentChoice("wise-target", t, lam=lam, value=curve[lam][t]), test_domains=[t, cfg.source])
                both = run.tuned("wise+nv-target", t, run.space(), run.accuracy(t), cfg.trials, lam=lam)
                run.record(both, test_domains=[t, cfg.source])
        interpolate(1.0)
        result.info["wise_pick"] = pick
        result.info["cache_calls"] = dict(run.cache.calls)
        # --- frozen features -----------------------------------------------------------------
        run.cache.clear()
        if cfg.frozen:
            enc, _ = _load_pretrained_encoder(cfg)
            frozen = MeanPoolClassifier(enc, model.config.num_labels).eval()
            src_val = sets[(cfg.source, "validation")]
            result.info["frozen_head"] = frozen.fit_head(train_set, src_val)
            convert_at_identity(frozen.encoder, prior_set.batches)
            fr = _Runner(frozen, cfg, sets, "frozen", result, bar)
            fr.knob_methods(targets, label_free=False, per_layer=False)
            result.info["frozen_cache_calls"] = dict(fr.cache.calls)
    result.info["seconds"] = time.time() - t0
    if out_dir is not None:
        result.save(Path(out_dir))
    return result


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def _bar(total: int, enabled: bool):
    from contextlib import nullcontext

    if not enabled:
        return nullcontext(_NoBar())
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="study")



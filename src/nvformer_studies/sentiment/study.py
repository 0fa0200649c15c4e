"""The out-of-domain sentiment study: NV post-training regularisation against what a user would
try instead (the project's main demo, ``nvformer study``).

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
the unregularised model) with forward passes through a :class:`nvformer.evaluate.KnobCache`
(tokenised once, length-batched, memoised, layers before the first changed one replayed).
The *frozen-feature* setting repeats the NV methods on the pretrained encoder with mean-pooled,
normalised sentence features and a logistic-regression head fitted on the source train split.

Splits: every domain is split by :func:`nvformer.sentiment.domain_splits` (stratified
0.7 / 0.1 / 0.2, ``split_seed``); ``n_val`` / ``n_test`` take seeded stratified subsets.
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

from nvformer import KnobSpace, tune
from nvformer.api import nv_modules, set_knobs
from nvformer.metrics import classification_metrics, paired_bootstrap
from nvformer.tasks import TextBatches, classification_batches
from nvformer.tuning.cache import KnobCache
from nvformer.tuning.space import apply_knobs

from ..common.data import stratified_split
from .data import domain_splits

__all__ = ["TARGETS", "MeanPoolClassifier", "StudyConfig", "StudyResult", "headline", "information_maximisation", "plot",
           "prior_only", "run_study", "summary_markdown"]

TARGETS = ("dvd", "electronics", "kitchen", "airline", "imdb", "blog")
REFERENCE = {"alpha_tau": 1e4, "stdev_tau": 0.0, "mu_tau": 1.0}  # the identity knobs the model is converted with
CONTROL_ALPHA = -1e4  # token pseudo-counts exp(-1e4 * s_alpha) = 0: all attention on the prior component
MAIN = ("baseline", "nv-target", "nv-source", "nv-label-free", "nv-best-layer", "nv-per-layer", "control-target",
        "wise-target", "wise-source", "wise+nv-target")


@dataclass
class StudyConfig:
    """Settings of the study; :meth:`demo` and :meth:`full` are the two budgets used in the docs.

    Args:
        model_dir: the fine-tuned source classifier (fine-tuned there first if missing; see
            :func:`nvformer.sentiment.load_or_finetune`).
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


def reset(model: nn.Module) -> None:
    set_knobs(model, **REFERENCE)


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

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **kw):
        from transformers.modeling_outputs import SequenceClassifierOutput

        return SequenceClassifierOutput(logits=self.head(self.features(input_ids, attention_mask, **kw)))

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


def _subset(texts: list[str], labels: list[int], n: int | None, seed: int) -> tuple[list[str], list[int]]:
    if n is None or n >= len(texts):
        return texts, labels
    idx = stratified_split(labels, (n / len(texts), 1 - n / len(texts)), seed)[0]
    return [texts[i] for i in idx], [labels[i] for i in idx]


@dataclass
class Choice:
    """A configuration chosen by a method for a target (``space`` + ``params``, or control layers)."""

    method: str
    target: str
    lam: float = 1.0
    space: KnobSpace | None = None
    params: dict[str, float] = field(default_factory=dict)
    control: tuple[int, ...] = ()
    val: float | None = None


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
        tensors = torch.load(out / "logits.pt")
        return cls(config=meta["config"], rows=meta["rows"], logits=tensors["logits"], labels=tensors["labels"],
                   wise_curve=meta["wise_curve"], info=meta["info"])

    def save(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"config": self.config, "rows": self.rows, "wise_curve": self.wise_curve,
                                                       "info": self.info}, indent=1, default=str))
        torch.save({"logits": self.logits, "labels": self.labels}, out / "logits.pt")


# ---------------------------------------------------------------------------------------------
# the runner


class _Runner:
    """Searches and evaluations of one converted model over the study's data sets."""

    def __init__(self, model: nn.Module, cfg: StudyConfig, sets: dict[tuple[str, str], TextBatches], setting: str,
                 result: StudyResult, bar) -> None:
        self.model, self.cfg, self.sets, self.setting, self.result, self.bar = model, cfg, sets, setting, result, bar
        reset(model)
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

    def search(self, method: str, target: str, space: KnobSpace, objective, n_trials: int, lam: float = 1.0) -> Choice:
        reset(self.model)
        res = tune(self.model, objective, space=space, n_trials=n_trials, seed=self.cfg.seed, show_progress=False)
        self.bar.update(1)
        return Choice(method, target, lam, space, dict(res.best_params), val=res.best_value)

    def apply(self, choice: Choice) -> None:
        reset(self.model)
        if choice.space is not None:
            apply_knobs(self.model, choice.space, choice.params)
        if choice.control:
            prior_only(self.model, choice.control)

    def control_candidates(self) -> list[tuple[int, ...]]:
        n = self.n_layers
        return [()] + [(layer,) for layer in range(n)] + [tuple(range(n - k, n)) for k in range(2, n + 1)]

    def choose_control(self, target: str) -> tuple[Choice, dict[tuple[int, ...], float]]:
        objective = self.accuracy(target)
        vals = {}
        for layers in self.control_candidates():
            self.apply(Choice("control", target, control=layers))
            vals[layers] = objective(self.model)
        best = max(vals, key=lambda k: vals[k])  # first maximum: "none" wins ties
        return Choice("control-target", target, control=best, val=vals[best]), vals

    def record(self, choice: Choice, *, test_domains, extra: dict | None = None) -> None:
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
                                     "domain": domain, "lam": choice.lam, "val": choice.val,
                                     "params": choice.params, "control": list(choice.control), **m, **(extra or {})})
        reset(self.model)

    # -- the phases ---------------------------------------------------------------------------

    def knob_methods(self, targets, label_free: bool = True, per_layer: bool = True) -> dict[str, Choice]:
        """Every method that moves knobs of the unchanged weights; returns the ``nv-source`` choice."""
        cfg, src = self.cfg, self.cfg.source
        self.record(Choice("baseline", src), test_domains=[src, *targets])
        source = self.search("nv-source", src, self.space(), self.accuracy(src), cfg.trials)
        self.record(source, test_domains=[src, *targets])
        for t in targets:
            chosen = [self.search("nv-target", t, self.space(), self.accuracy(t), cfg.trials)]
            if label_free:
                chosen.append(self.search("nv-label-free", t, self.space(), self.label_free(t), cfg.trials))
            layers = [self.search(f"nv-layer-{layer}", t, self.space(layers=(layer,)), self.accuracy(t), cfg.layer_trials)
                      for layer in range(self.n_layers)]
            best = max(layers, key=lambda c: c.val)
            chosen.append(replace(best, method="nv-best-layer"))
            if per_layer:
                chosen.append(self.search("nv-per-layer", t, self.space(per_layer=True), self.accuracy(t), cfg.joint_trials))
            control, vals = self.choose_control(t)
            self.bar.update(1)
            chosen.append(control)
            for c in chosen:
                self.record(c, test_domains=[t, src])
            for c in layers:
                self.record(c, test_domains=[t])
            for layer in range(self.n_layers):
                self.record(Choice(f"control-layer-{layer}", t, control=(layer,), val=vals[(layer,)]), test_domains=[t])
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


def _estimate_prior(model: nn.Module, data: TextBatches) -> None:
    from nvformer import estimate_prior

    reset(model)
    estimate_prior(model, data.batches, show_progress=False)


def _build_sets(cfg: StudyConfig, tok) -> tuple[dict[tuple[str, str], TextBatches], TextBatches, TextBatches]:
    sets = {}
    for domain in (cfg.source, *cfg.targets):
        s = domain_splits(domain, cfg.split_seed, cfg.data_dir)
        for split, n in (("validation", cfg.n_val), ("test", cfg.n_test)):
            texts, labels = _subset(*s[split], n, cfg.split_seed)
            sets[(domain, split)] = classification_batches(tok, texts, labels, batch_size=cfg.batch_size, max_length=cfg.max_length)
    train = domain_splits(cfg.source, cfg.split_seed, cfg.data_dir)["train"]
    prior_set = classification_batches(tok, train[0][: cfg.prior_examples], batch_size=cfg.batch_size, max_length=cfg.max_length)
    train_set = classification_batches(tok, *train, batch_size=cfg.batch_size, max_length=cfg.max_length)
    return sets, prior_set, train_set


def run_study(cfg: StudyConfig, out_dir: str | Path | None = None, show_progress: bool = True) -> StudyResult:
    """Run every method of the study (see the module docstring); optionally save to ``out_dir``."""
    from nvformer import convert, estimate_prior

    from .data import load_or_finetune

    t0 = time.time()
    given = Path(cfg.model_dir)
    if (given / "config.json").exists() and not (given / "nvformer_finetune.json").exists():  # a user's own classifier
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(given).eval()
        tok, ft_info = AutoTokenizer.from_pretrained(given), {"checkpoint": str(given)}
    else:
        model, tok, ft_info = load_or_finetune(given, cfg.source, cfg.split_seed, data_dir=cfg.data_dir,
                                               show_progress=show_progress)
    sets, prior_set, train_set = _build_sets(cfg, tok)
    result = StudyResult(config=asdict(cfg), info={"finetune": ft_info})
    targets = list(cfg.targets)
    n_layers = model.config.num_hidden_layers
    per_target = 2 + n_layers + 2  # nv-target, label-free, layers, per-layer, control
    total = 1 + len(targets) * per_target + len(cfg.wise) + len(targets) + (
        (1 + len(targets) * (1 + n_layers + 1)) if cfg.frozen else 0)
    with _bar(total, show_progress) as bar:
        # --- the fine-tuned model, NV knobs --------------------------------------------------
        source_prior = estimate_prior(model, prior_set.batches, show_progress=False)
        convert(model, prior=source_prior, **REFERENCE)
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
            else:
                _estimate_prior(model, prior_set)
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
                run.record(Choice("wise-source", cfg.source, lam, val=curve[lam][cfg.source]), test_domains=[cfg.source, *targets])
            for t in targets:
                if pick[t] != lam:
                    continue
                run.record(Choice("wise-target", t, lam, val=curve[lam][t]), test_domains=[t, cfg.source])
                both = run.search("wise+nv-target", t, run.space(), run.accuracy(t), cfg.trials, lam=lam)
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
            convert(frozen.encoder, prior=estimate_prior(frozen.encoder, prior_set.batches, show_progress=False), **REFERENCE)
            fr = _Runner(frozen, cfg, sets, "frozen", result, bar)
            fr.knob_methods(targets, label_free=False, per_layer=False)
            result.info["frozen_cache_calls"] = dict(fr.cache.calls)
    result.info["seconds"] = time.time() - t0
    if out_dir is not None:
        out = Path(out_dir)
        result.save(out)
        (out / "summary.md").write_text(summary_markdown(result))
        plot(result, out)
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


# ---------------------------------------------------------------------------------------------
# summaries


def _gain(result: StudyResult, setting: str, method: str, targets, metric: str = "accuracy", n: int = 1000):
    a, b = [], []
    for t in targets:
        base = result.logits.get(f"{setting}|baseline|{cfg_source(result)}|{t}")
        meth = result.logits.get(f"{setting}|{method}|{cfg_source(result) if _shared(method) else t}|{t}")
        if base is None or meth is None:
            return None
        y = result.labels[t]
        a.append(per_example_scores(base, y)[metric])
        b.append(per_example_scores(meth, y)[metric])
    return paired_bootstrap(a, b, n_resamples=n)


def per_example_scores(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """``{"accuracy": [N] 0/1 correct, "nll": [N] -log p(label)}`` (their means are the metrics)."""
    logp = torch.log_softmax(logits.double(), -1)
    return {"accuracy": (logits.argmax(-1) == labels).double(), "nll": -logp.gather(-1, labels[:, None]).squeeze(-1)}


def cfg_source(result: StudyResult) -> str:
    return result.config["source"]


def _fmt_ci(g: dict | None, scale: float = 100.0, digits: int = 1) -> str:
    if g is None:
        return "-"
    return f"{g['diff'] * scale:+.{digits}f} [{g['low'] * scale:+.{digits}f}, {g['high'] * scale:+.{digits}f}]"


def _shared(method: str) -> bool:
    """Methods with one configuration for every target (chosen without target data)."""
    return method == "baseline" or method.endswith("-source")


def method_rows(result: StudyResult, setting: str, method: str) -> dict[str, dict]:
    """``{target: row}``: a method's test metrics on each target (its own choice per target)."""
    out = {}
    for x in result.rows:
        if x["setting"] == setting and x["method"] == method and x["domain"] in result.config["targets"] \
                and (x["target"] == x["domain"] or _shared(method)):
            out.setdefault(x["domain"], x)
    return out


def describe(result: StudyResult, row: dict) -> str:
    """A short text for a row's configuration, omitting knob groups at the identity corner."""
    high, low = result.config["alpha_tau"][1], result.config["stdev_tau"][0]
    parts = [] if row["lam"] == 1.0 else [f"l={row['lam']:g}"]
    if row["control"]:
        parts.append("prior-only layers " + ",".join(map(str, row["control"])))
    groups: dict[str, dict[str, float]] = {}
    for k, v in row["params"].items():
        g, knob = k.split("/")
        groups.setdefault(g, {})[knob] = v
    for g, kn in groups.items():
        if kn.get("alpha_tau") == high and kn.get("stdev_tau") == low:
            continue
        name = "" if g == "all" else g.replace("encoder.", "layer ") + " "
        parts.append(f"{name}a={kn['alpha_tau']:.2f} s={kn['stdev_tau']:.2f}")
    return ", ".join(parts) or "identity"


def in_domain_change(result: StudyResult, setting: str, method: str) -> float | None:
    """Mean over targets of the source test accuracy change under each target's chosen configuration."""
    src = cfg_source(result)
    base = [x for x in result.rows if x["setting"] == setting and x["method"] == "baseline" and x["domain"] == src]
    rows = [x for x in result.rows if x["setting"] == setting and x["method"] == method and x["domain"] == src]
    if not base or not rows:
        return None
    return sum(x["accuracy"] for x in rows) / len(rows) - base[0]["accuracy"]


def methods_present(result: StudyResult, setting: str) -> list[str]:
    seen = []
    for x in result.rows:
        if x["setting"] == setting and x["method"] not in seen:
            seen.append(x["method"])
    return seen


def summary_markdown(result: StudyResult, setting: str = "fine-tuned") -> str:
    """Markdown tables: per-target test accuracy, averaged metrics with CIs, and per-layer gains."""
    targets = list(result.config["targets"])
    n = result.config["bootstrap"]
    present = methods_present(result, setting)
    main = [m for m in MAIN if m in present]
    lines = [f"**Test accuracy per target** ({setting} model; each method's own choice per target)", "",
             "| method | " + " | ".join(targets) + " | mean | gain [95% CI] (points) |",
             "| --- |" + " --- |" * (len(targets) + 2)]
    for m in main:
        rows = method_rows(result, setting, m)
        if len(rows) < len(targets):
            continue
        accs = [rows[t]["accuracy"] for t in targets]
        gain = None if m == "baseline" else _gain(result, setting, m, targets, n=n)
        lines.append(f"| {m} | " + " | ".join(f"{a:.3f}" for a in accs) + f" | {sum(accs) / len(accs):.3f} | {_fmt_ci(gain)} |")
    lines += ["", f"**Averaged over the {len(targets)} targets** (test; NLL gain < 0 is better) and in-domain cost "
              f"({result.config['source']} test accuracy change under the targets' choices)", "",
              "| method | accuracy | macro-F1 | NLL | ECE | NLL change [95% CI] | in-domain accuracy change (points) |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for m in main:
        rows = method_rows(result, setting, m)
        if len(rows) < len(targets):
            continue
        avg = {k: sum(rows[t][k] for t in targets) / len(targets) for k in ("accuracy", "macro_f1", "nll", "ece")}
        nll = None if m == "baseline" else _gain(result, setting, m, targets, metric="nll", n=n)
        dom = in_domain_change(result, setting, m)
        lines.append(f"| {m} | {avg['accuracy']:.3f} | {avg['macro_f1']:.3f} | {avg['nll']:.3f} | {avg['ece']:.3f} | "
                     f"{_fmt_ci(nll, 1.0, 3)} | {'-' if dom is None else f'{dom * 100:+.1f}'} |")
    layers = sorted({int(m.rsplit("-", 1)[1]) for m in present if m.startswith("nv-layer-")})
    if layers:
        lines += ["", "**Where the gain lives**: mean target test accuracy gain (points, 95% CI) of the knob search "
                  "restricted to one layer vs the prior-only control on that layer", "",
                  "| layer | NV knobs on this layer only | prior-only control on this layer |", "| --- | --- | --- |"]
        for layer in layers:
            lines.append(f"| {layer} | {_fmt_ci(_gain(result, setting, f'nv-layer-{layer}', targets, n=n))} | "
                         f"{_fmt_ci(_gain(result, setting, f'control-layer-{layer}', targets, n=n))} |")
    chosen = [f"- {t}: " + "; ".join(f"{m}: {describe(result, method_rows(result, setting, m)[t])}" for m in main
                                      if m != "baseline" and t in method_rows(result, setting, m)) for t in targets]
    lines += ["", "Chosen configurations (a = alpha_tau, s = stdev_tau, l = WiSE weight; knob groups left at the identity "
              "corner are not listed):", "", *chosen]
    return "\n".join(lines) + "\n"


def plot(result: StudyResult, out: Path) -> list[Path]:
    """``gains.png`` (mean OOD accuracy gain per method with CIs), ``layers.png`` (per-layer NV
    vs control), ``wise.png`` (validation accuracy against the WiSE weight)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(result.config["targets"])
    n = result.config["bootstrap"]
    paths = []
    settings = [s for s in ("fine-tuned", "frozen") if methods_present(result, s)]
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 3.6), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        ms = [m for m in MAIN if m != "baseline" and m in methods_present(result, setting)
              and len(method_rows(result, setting, m)) == len(targets)]
        gains = [_gain(result, setting, m, targets, n=n) for m in ms]
        y = range(len(ms))
        ax.errorbar([g["diff"] * 100 for g in gains], y, xerr=[[(g["diff"] - g["low"]) * 100 for g in gains],
                                                               [(g["high"] - g["diff"]) * 100 for g in gains]], fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(list(y), ms)
        ax.set(xlabel="mean target accuracy gain (points, 95% CI)", title=f"{setting} model")
    fig.tight_layout()
    paths.append(out / "gains.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, len(settings), figsize=(5.2 * len(settings), 3.4), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        layers = sorted({int(m.rsplit("-", 1)[1]) for m in methods_present(result, setting) if m.startswith("nv-layer-")})
        for k, (kind, label) in enumerate((("nv-layer", "NV knobs (this layer)"), ("control-layer", "prior-only control"))):
            gains = [_gain(result, setting, f"{kind}-{layer}", targets, n=n) for layer in layers]
            x = [layer + (k - 0.5) * 0.25 for layer in layers]
            ax.errorbar(x, [g["diff"] * 100 for g in gains], yerr=[[(g["diff"] - g["low"]) * 100 for g in gains],
                                                                  [(g["high"] - g["diff"]) * 100 for g in gains]],
                        fmt="o", capsize=3, label=label)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="layer", ylabel="mean target accuracy gain (points)", title=f"{setting} model")
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / "layers.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    if result.wise_curve:
        fig, ax = plt.subplots(figsize=(5.2, 3.4))
        domains = list(dict.fromkeys(r["domain"] for r in result.wise_curve))
        for d in domains:
            pts = sorted((r["lam"], r["val_accuracy"]) for r in result.wise_curve if r["domain"] == d)
            ax.plot(*zip(*pts), "o-", ms=3, label=d)
        ax.set(xlabel="WiSE weight l (1 = fine-tuned)", ylabel="validation accuracy", title="WiSE-FT interpolation")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths.append(out / "wise.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def mean_accuracy(result: StudyResult, setting: str, method: str) -> float | None:
    rows = method_rows(result, setting, method)
    targets = result.config["targets"]
    return sum(rows[t]["accuracy"] for t in targets) / len(targets) if len(rows) == len(targets) else None


def headline(result: StudyResult) -> str:
    """One paragraph: the goal (+2.0 points mean OOD accuracy, in-domain not lower, ahead of the
    control and WiSE-FT) checked against the measured numbers."""
    base = mean_accuracy(result, "fine-tuned", "baseline")
    nv = mean_accuracy(result, "fine-tuned", "nv-target")
    ctrl = mean_accuracy(result, "fine-tuned", "control-target")
    wise = mean_accuracy(result, "fine-tuned", "wise-target")
    dom = in_domain_change(result, "fine-tuned", "nv-target")
    if None in (base, nv, ctrl, wise) or dom is None:
        return "incomplete study"
    gain = (nv - base) * 100
    ok = gain >= 2.0 and dom >= 0 and nv > ctrl and nv > wise
    return (f"nv-target mean target accuracy {nv:.3f} vs baseline {base:.3f} ({gain:+.1f} points), control {ctrl:.3f}, "
            f"WiSE-FT {wise:.3f}; in-domain change {dom * 100:+.1f} points. Goal (>= +2.0, in-domain not lower, ahead of "
            f"control and WiSE-FT): {'reached' if ok else 'NOT reached'}.")

"""Fit the knobs of a converted model by gradient (docs/MATH.md section 4, "Fitting the knobs").

The knobs enter the forward pass smoothly, through the parameters the identity initialisation
gives them (:func:`nvformer.core.knobmap.identity_values`). :func:`fit_knobs` keeps every model
weight frozen and each NVIB in identity form: at every step it writes the current knobs into the
NVIBs (:meth:`nvformer.NVIB.set_knobs`), runs the evaluation form (deterministic, ``model.eval()``)
with gradients enabled for the NVIB parameters only, and carries those parameters' gradients back
to the knobs through ``identity_values`` (the chain rule, by autograd). Adam takes the step.

Parametrisation (chosen so that fitting can leave the identity corner, where the gradients vanish):

* ``alpha_tau`` is fitted as ``u = alpha_tau * s_alpha``, the shift of the tokens' log pseudo-counts
  in nats, the same unit for every layer; the prior's attention weight is about ``exp(c - u)``
  with ``c`` of a few nats under the empirical prior, so at ``alpha_tau = 1e4`` it is exactly 0 in
  floating point and so is its gradient. Fitting starts at ``u <= start_nats`` (default 5: a prior
  weight of about 1e-4 on MiniLM, whose outputs barely move).
* ``stdev_tau`` is fitted as ``log stdev_tau``: the token variance ``(stdev_tau sigma_p)^2`` has
  zero derivative at ``stdev_tau = 0`` (and the variance floor makes it exactly 0), so fitting
  starts at ``stdev_tau >= start_stdev``.
* ``mu_tau`` is fitted as it is (its gradient does not vanish at 1).

``groups``: ``"site"`` fits one setting per site (``u`` shared in nats: each layer's ``alpha_tau``
is ``u / s_alpha`` of its own prior), ``"layer"`` one per NVIB. The validation objective (on
``validation``) is measured at the model's knobs before fitting and every ``eval_every`` steps;
the best point is kept (the knobs before fitting if nothing beats them), and fitting stops after
``patience`` measurements without improvement.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._progress import progress
from ..api import get_knobs, knob_groups, model_kind
from ..config import KNOBS, Knobs
from ..core.checks import check_choice, check_int, check_real
from ..core.knobmap import identity_values
from ..nn.empirical import call_batch
from ..nn.nvib import NVIB
from .objectives import OBJECTIVES, objective_from_outputs

__all__ = ["FIT_GROUPS", "FitResult", "fit_knobs", "knob_gradients"]

FIT_GROUPS = ("site", "layer", "head")
_FWD_PER_STEP = 3.0  # a training step: one forward and a backward (about two forwards)


@dataclass
class FitResult:
    """What :func:`fit_knobs` did. ``knobs``: ``{group key: Knobs}`` the model is left at
    (:func:`nvformer.get_knobs`); ``nats``: ``alpha_tau * s_alpha`` per group; ``history``: one row per validation measurement (``step``,
    ``train``: mean training objective since the last row, ``validation``) and, without
    validation, per ``eval_every`` steps; ``best_step``: the step of the kept knobs (0 = the
    knobs before fitting); ``forward_equivalents``: forwards run, a training step counted as 3."""

    knobs: dict[str, Knobs]
    nats: dict[str, float] = field(default_factory=dict)  # per group: alpha_tau * s_alpha, the fitted coordinate
    head_knobs: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # per group with per-head knobs (groups="head")
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int = 0
    initial_value: float | None = None
    best_value: float | None = None
    steps: int = 0
    forward_equivalents: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["knobs"] = {k: v.as_dict() for k, v in self.knobs.items()}
        return d


class _Raw(nn.Module):
    """The fitted coordinates of one group: ``u`` (nats), ``log_stdev``, ``mu`` (only the fitted ones);
    ``u`` and ``log_stdev`` have one entry per key/value head with ``heads``, ``mu`` is per layer."""

    def __init__(self, u: float, log_stdev: float, mu: float, fit: Sequence[str], heads: int | None = None) -> None:
        super().__init__()
        shape = () if heads is None else (heads,)
        self.u = nn.Parameter(torch.full(shape, u, dtype=torch.float64), requires_grad="alpha_tau" in fit)
        self.log_stdev = nn.Parameter(torch.full(shape, log_stdev, dtype=torch.float64), requires_grad="stdev_tau" in fit)
        self.mu = nn.Parameter(torch.tensor(mu, dtype=torch.float64), requires_grad="mu_tau" in fit)

    def penalty(self) -> Tensor:
        """Distance from the identity corner: ``(mu_tau - 1)^2 + stdev_tau^2 + exp(-u)`` over the fitted knobs (heads averaged)."""
        terms = [p.mean() for p, on in ((torch.exp(-self.u), self.u.requires_grad), (torch.exp(2 * self.log_stdev), self.log_stdev.requires_grad),
                                        ((self.mu - 1.0) ** 2, self.mu.requires_grad)) if on]
        return sum(terms, torch.zeros((), dtype=torch.float64))


def _knob_params(nvib: NVIB) -> list[Tensor]:
    return [nvib.mu_proj.weight, nvib.mu_proj.bias, nvib.logvar_proj.bias, nvib.alpha_bias]


def _chain(nvib: NVIB, alpha_tau, stdev_tau, mu_tau) -> Tensor:
    """A scalar whose gradient with respect to the knobs (tensors) is the objective's, given the
    gradients the last backward left on ``nvib``'s parameters: ``sum_theta dL/dtheta . theta(knobs)``."""
    v = identity_values(alpha_tau, stdev_tau, mu_tau, nvib.prior.mean, nvib.prior.var, nvib.prior.log_alpha_std, nvib.min_var)
    g = [torch.zeros_like(x) if x.grad is None else x.grad for x in _knob_params(nvib)]
    return (v["mu_weight"] * g[0].diagonal().sum().double() + (v["mu_bias"] * g[1].double()).sum() + (v["logvar_bias"] * g[2].double()).sum()
            + v["alpha_bias"] * g[3].double())


def _head_chain(nvib: NVIB, alpha_tau: Tensor, stdev_tau: Tensor) -> Tensor:
    """:func:`_chain` for per-head knobs (``[H]`` each), from the gradients on the NVIB's per-head parameters."""
    alpha_tau = torch.as_tensor(alpha_tau, dtype=torch.float64).expand(nvib.kv_heads)
    stdev_tau = torch.as_tensor(stdev_tau, dtype=torch.float64).expand(nvib.kv_heads)
    v = identity_values(alpha_tau[:, None], stdev_tau[:, None], 1.0, nvib.prior.mean, nvib.prior.var, nvib.prior.log_alpha_std, nvib.min_var)
    ga, gl = nvib.head_alpha_bias.grad, nvib.head_logvar_bias.grad
    out = torch.zeros((), dtype=torch.float64)
    if ga is not None:
        out = out + (v["alpha_bias"][:, 0] * ga.double()).sum()
    if gl is not None:
        out = out + (v["logvar_bias"] * gl.double()).sum()
    return out


def _track_heads(nvib: NVIB) -> None:
    """Let the next backward leave gradients on the NVIB's per-head parameters (buffers rebuilt at every knob change)."""
    nvib.head_alpha_bias.requires_grad_(True)
    nvib.head_logvar_bias.requires_grad_(True)


def knob_gradients(model: nn.Module, batch: Any, objective: str | Callable[[Any, Any], Tensor] = "nll", *, heads: bool = False,
                   forward: Callable[[nn.Module, Any], Any] | None = None) -> dict[str, dict[str, Any]]:
    """``{group key: {knob: d objective / d knob}}`` at the model's current knobs, on one batch, in
    the evaluation form (the chain rule :func:`fit_knobs` uses; the model is left unchanged). With
    ``heads``, ``alpha_tau`` and ``stdev_tau`` are per key/value head (lists; the layer's values for
    every head where no per-head knobs are set).

    At the identity corner ``alpha_tau = 1e4, stdev_tau = 0`` both derivatives are exactly 0
    (docs/MATH.md section 4, "Fitting the knobs"); ``mu_tau``'s is not."""
    who = "nvformer.knob_gradients"
    layout = knob_groups(model, who)
    loss_of = objective if callable(objective) else objective_from_outputs(objective)
    flags = {p: p.requires_grad for p in model.parameters()}
    saved_heads = {id(nvib): nvib.head_knobs() for _, _, nvib in layout}
    was = model.training
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for _, _, nvib in layout:
            if heads and nvib.head_knobs() is None:
                nvib.set_head_knobs(nvib.alpha_tau, nvib.stdev_tau)
            if heads:
                _track_heads(nvib)
            for p in _knob_params(nvib):
                p.requires_grad_(True)
                p.grad = None
        with torch.enable_grad():
            loss_of((forward or call_batch)(model, batch), batch).backward()
            out = {}
            for key, _, nvib in layout:
                k = {name: torch.tensor(v, dtype=torch.float64, requires_grad=True) for name, v in nvib.knobs().as_dict().items()}
                _chain(nvib, k["alpha_tau"], k["stdev_tau"], k["mu_tau"]).backward()
                out[key] = {name: float(t.grad) for name, t in k.items()}
                if heads:
                    a = nvib.head_alpha_tau.clone().requires_grad_(True)
                    sd = nvib.head_stdev_tau.clone().requires_grad_(True)
                    _head_chain(nvib, a, sd).backward()
                    out[key].update({"alpha_tau": a.grad.tolist(), "stdev_tau": sd.grad.tolist()})
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        for _, _, nvib in layout:
            nvib.set_head_knobs(**(saved_heads[id(nvib)] or {}))
        model.train(was)
    return out


def fit_knobs(
    model: nn.Module,
    batches: Iterable[Any],
    objective: str | Callable[[Any, Any], Tensor] = "nll",
    *,
    groups: str = "layer",
    knobs: Sequence[str] = ("alpha_tau", "stdev_tau"),
    steps: int = 50,
    lr: float = 0.3,
    to_identity: float = 0.0,
    validation: Iterable[Any] | None = None,
    patience: int = 3,
    eval_every: int | None = None,
    start_nats: float = 5.0,
    start_stdev: float = 0.05,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    show_progress: bool = True,
) -> FitResult:
    """Fit the knobs of a converted model by gradient descent on ``objective``; every model weight
    stays frozen and the model is left at the kept knobs (save them with :func:`nvformer.save_adapter`).

    Args:
        model: a model converted with :func:`nvformer.convert` (its NVIBs in identity form).
        batches: the fitting data, an iterable of model inputs (a dict is passed as keyword
            arguments, a tuple or list as positional arguments), cycled over ``steps``.
        objective: ``"nll"`` (labels: ``outputs.loss``, or cross-entropy of ``[B, C]`` logits
            against ``batch["labels"]``), ``"entropy"`` or ``"information_maximisation"``
            (label-free; :mod:`nvformer.tuning.objectives`), or ``f(outputs, batch) -> scalar``
            to minimise.
        groups: ``"site"`` (one setting per site), ``"layer"`` (one per NVIB) or ``"head"`` (one
            ``alpha_tau`` and ``stdev_tau`` per key/value head of every NVIB, :meth:`nvformer.NVIB.set_head_knobs`;
            ``mu_tau`` per layer; converted Hugging Face models).
        knobs: which knobs to fit (the others keep their values), a subset of
            ``("alpha_tau", "stdev_tau", "mu_tau")``.
        steps: Adam steps (at most; see ``patience``); lr: Adam's learning rate, in the fitted
            coordinates (nats, log stdev_tau, mu_tau). Adam moves each about ``lr`` per step at
            first: the default 0.3 travels from the start (5 nats) to where the prior's weight is
            about 1% (0 nats) in about 17 steps, and ``stdev_tau`` from 0.05 to 0.5 in about 8.
        to_identity: weight of an L2-like pull towards the identity corner, added to the
            objective: ``to_identity * mean over groups of (mu_tau - 1)^2 + stdev_tau^2 + exp(-u)``.
        validation: held-out inputs; the objective on them chooses the kept knobs and stops early.
        patience: stop after this many validation measurements without improvement.
        eval_every: steps between validation measurements (default: one pass over ``batches``).
        start_nats, start_stdev: the start (module docstring): ``alpha_tau * s_alpha`` capped at
            ``start_nats``, ``stdev_tau`` raised to at least ``start_stdev``.
        forward: ``forward(model, batch) -> outputs`` instead of calling the model on the batch.
        show_progress: a progress bar.

    Returns:
        :class:`FitResult`.
    """
    who = "nvformer.fit_knobs"
    if not callable(objective):
        check_choice(objective, "objective", who, OBJECTIVES)
    check_choice(groups, "groups", who, FIT_GROUPS)
    fit = tuple(knobs) if not isinstance(knobs, str) else (knobs,)
    if not fit or any(k not in KNOBS for k in fit):
        raise ValueError(f"{who}: `knobs` must be a non-empty subset of {KNOBS}, got {knobs!r}")
    check_int(steps, "steps", who)
    check_int(patience, "patience", who)
    check_real(lr, "lr", who, above=0.0)
    check_real(to_identity, "to_identity", who, minimum=0.0)
    check_real(start_nats, "start_nats", who)
    check_real(start_stdev, "start_stdev", who, above=0.0)
    if eval_every is not None:
        check_int(eval_every, "eval_every", who)
    train = list(batches)
    if not train:
        raise ValueError(f"{who}: `batches` is empty")
    val = None if validation is None else list(validation)
    if val is not None and not val:
        raise ValueError(f"{who}: `validation` is empty")
    layout = knob_groups(model, who)  # raises for an unconverted model
    for key, _, nvib in layout:
        if not nvib.in_identity_form():
            raise ValueError(f"{who}: the NVIB of {key} was trained away from its identity form; knobs do not describe it")
    loss_of = objective if callable(objective) else objective_from_outputs(objective)
    call = forward or call_batch
    every = eval_every or len(train)

    per_head = groups == "head"
    if per_head and model_kind(model, who) != "hf":
        raise ValueError(f"{who}: groups='head' needs a converted Hugging Face model (per-head knobs)")
    t0 = time.perf_counter()

    def snapshot() -> dict[int, tuple[Knobs, dict | None]]:
        return {id(nvib): (nvib.knobs(), nvib.head_knobs()) for _, _, nvib in layout}

    initial = snapshot()
    raws: dict[str, _Raw] = {}
    members: list[tuple[NVIB, _Raw]] = []
    for key, info, nvib in layout:
        name = info.site if groups == "site" else key
        if name not in raws:
            k, h = initial[id(nvib)]
            u = min((max(h["alpha_tau"]) if h else k.alpha_tau) * float(nvib.prior.log_alpha_std), start_nats)
            raws[name] = _Raw(u, math.log(max(min(h["stdev_tau"]) if h else k.stdev_tau, start_stdev)), k.mu_tau, fit,
                              heads=nvib.kv_heads if per_head else None)
        members.append((nvib, raws[name]))

    def values(nvib: NVIB, raw: _Raw) -> tuple[Tensor | float, Tensor | float, Tensor | float]:
        """(alpha_tau, stdev_tau, mu_tau) of ``nvib`` (per head with ``groups="head"``): the fitted
        ones from ``raw``, the others as they were."""
        k, h = initial[id(nvib)]
        a0 = torch.tensor(h["alpha_tau"], dtype=torch.float64) if (per_head and h) else k.alpha_tau
        s0 = torch.tensor(h["stdev_tau"], dtype=torch.float64) if (per_head and h) else k.stdev_tau
        return (raw.u / nvib.prior.log_alpha_std.double() if "alpha_tau" in fit else a0,
                raw.log_stdev.exp() if "stdev_tau" in fit else s0, raw.mu if "mu_tau" in fit else k.mu_tau)

    def write() -> None:
        with torch.no_grad():
            for nvib, raw in members:
                a, s, m = values(nvib, raw)
                if per_head:
                    nvib.set_knobs(mu_tau=float(m))
                    nvib.set_head_knobs(torch.as_tensor(a, dtype=torch.float64).detach(), torch.as_tensor(s, dtype=torch.float64).detach())
                    _track_heads(nvib)
                else:
                    nvib.set_knobs(alpha_tau=float(a), stdev_tau=float(s), mu_tau=float(m))

    def restore(saved: dict[int, tuple[Knobs, dict | None]]) -> None:
        for _, _, nvib in layout:
            k, h = saved[id(nvib)]
            nvib.set_knobs(**k.as_dict())
            nvib.set_head_knobs(**(h or {}))

    def evaluate() -> float:
        with torch.no_grad():
            return sum(float(loss_of(call(model, b), b)) for b in val) / len(val)

    params = [p for r in raws.values() for p in r.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, eps=1e-12)
    flags = {p: p.requires_grad for p in model.parameters()}
    modes = {id(m): (m, m.training) for m in model.modules()}
    predictions = {id(nvib): nvib.prediction for _, _, nvib in layout}
    result = FitResult(knobs={})
    fwd = 0.0
    try:
        model.eval()
        for _, _, nvib in layout:
            nvib.prediction = "mean"
        best_value = evaluate() if val is not None else None
        fwd += len(val) if val is not None else 0
        result.initial_value = best_value
        best_knobs, best_step, bad = dict(initial), 0, 0
        for p in model.parameters():
            p.requires_grad_(False)
        for nvib, _ in members:
            for p in _knob_params(nvib):
                p.requires_grad_(True)
        running, count = 0.0, 0
        bar = progress(range(1, steps + 1), "fitting knobs", show_progress)
        for step in bar:
            write()
            batch = train[(step - 1) % len(train)]
            for nvib, _ in members:
                for p in _knob_params(nvib):
                    p.grad = None
            with torch.enable_grad():
                loss = loss_of(call(model, batch), batch)
                if not isinstance(loss, Tensor) or loss.dim() != 0:
                    raise ValueError(f"{who}: the objective must return a scalar tensor, got {type(loss).__name__}")
                if not bool(torch.isfinite(loss)):
                    raise ValueError(f"{who}: the objective is not finite at step {step} ({float(loss.detach())}); lower `lr`")
                loss.backward()
                opt.zero_grad()
                surrogate = to_identity * sum(r.penalty() for r in raws.values()) / len(raws)
                for nvib, raw in members:
                    a, s, m = values(nvib, raw)
                    if per_head:
                        k = initial[id(nvib)][0]
                        surrogate = surrogate + _chain(nvib, k.alpha_tau, k.stdev_tau, m) + _head_chain(nvib, torch.as_tensor(a), torch.as_tensor(s))
                    else:
                        surrogate = surrogate + _chain(nvib, a, s, m)
                if surrogate.requires_grad:
                    surrogate.backward()
                opt.step()
            fwd += _FWD_PER_STEP
            running, count = running + float(loss.detach()), count + 1
            if step % every == 0 or step == steps:
                row: dict[str, Any] = {"step": step, "train": running / count}
                running, count = 0.0, 0
                if val is not None:
                    write()
                    value = evaluate()
                    fwd += len(val)
                    row["validation"] = value
                    if value < best_value:
                        best_value, best_step, bad = value, step, 0
                        best_knobs = snapshot()
                    else:
                        bad += 1
                result.history.append(row)
                if val is not None and bad >= patience:
                    break
        result.steps = step
        if val is None:
            write()
        else:
            restore(best_knobs)
        result.best_step, result.best_value = (best_step, best_value) if val is not None else (step, None)
    except BaseException:
        restore(initial)
        raise
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        for m, mode in modes.values():
            m.training = mode
        for _, _, nvib in layout:
            nvib.prediction = predictions[id(nvib)]
    result.knobs = get_knobs(model)
    result.nats = {key: nvib.alpha_tau * float(nvib.prior.log_alpha_std) for key, _, nvib in layout}
    result.head_knobs = {key: nvib.head_knobs() for key, _, nvib in layout if nvib.head_knobs() is not None}
    result.forward_equivalents = fwd
    result.seconds = time.perf_counter() - t0
    return result

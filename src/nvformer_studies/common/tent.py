"""TENT (Wang et al., ICLR 2021), the standard test-time adaptation baseline, for Transformers:
the affine parameters of every LayerNorm adapted by minimising the entropy of the predictions on
unlabelled target text; every other weight frozen. The same held-out choice of the step and early
stopping as :func:`nvformer.fit_knobs`, so the two are compared at equal budgets.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from nvformer.tuning.objectives import entropy

__all__ = ["layer_norm_parameters", "prediction_entropy", "restore", "tent"]


def layer_norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weight and bias of every ``nn.LayerNorm`` of ``model`` (TENT's parameters)."""
    return [p for m in model.modules() if isinstance(m, nn.LayerNorm) for p in (m.weight, m.bias) if p is not None]


def prediction_entropy(outputs: Any, batch: dict) -> torch.Tensor:
    """TENT's loss: the mean entropy of a classifier's ``[B, C]`` predictions (``batch`` unused)."""
    return entropy(outputs.logits)


def _mean_loss(model: nn.Module, batches: Sequence[dict], loss: Callable[[Any, dict], torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float(loss(model(**b), b)) for b in batches) / len(batches)


def tent(model: nn.Module, batches: Sequence[dict], *, steps: int = 50, lr: float = 1e-3, validation: Sequence[dict] | None = None,
         patience: int = 3, eval_every: int | None = None,
         loss: Callable[[Any, dict], torch.Tensor] = prediction_entropy) -> dict[str, Any]:
    """Adapt ``model``'s LayerNorm affine parameters by Adam on the mean prediction entropy of
    ``batches`` (classifier inputs without labels), in evaluation mode; keep the best step on the
    ``validation`` entropy (the unadapted model included) and stop after ``patience`` measurements
    without improvement. The model is left at the kept parameters; returns ``{"steps",
    "best_step", "initial_value", "best_value", "measurements", "seconds", "state"}``
    (``measurements``: held-out evaluations, the unadapted model's included; ``state``: the original
    LayerNorm parameters, to restore with :func:`restore`). ``loss(outputs, batch)``: the entropy
    minimised, by default :func:`prediction_entropy`; e.g. a seq2seq model's per-token entropy over
    its decoder positions."""
    if not batches:
        raise ValueError("tent: no batches")
    params = layer_norm_parameters(model)
    if not params:
        raise ValueError(f"tent: {type(model).__name__} has no nn.LayerNorm")
    t0 = time.perf_counter()
    original = [p.detach().clone() for p in params]
    flags = {p: p.requires_grad for p in model.parameters()}
    was = model.training
    every = eval_every or len(batches)
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=lr)
        best = _mean_loss(model, validation, loss) if validation else None
        measurements = 1 if validation else 0
        initial, best_state, best_step, bad, step = best, [p.detach().clone() for p in params], 0, 0, 0
        for step in range(1, steps + 1):
            opt.zero_grad()
            with torch.enable_grad():
                b = batches[(step - 1) % len(batches)]
                loss(model(**b), b).backward()
            opt.step()
            if validation and (step % every == 0 or step == steps):
                value = _mean_loss(model, validation, loss)
                measurements += 1
                if value < best:
                    best, best_step, bad, best_state = value, step, 0, [p.detach().clone() for p in params]
                else:
                    bad += 1
                if bad >= patience:
                    break
        if validation:
            with torch.no_grad():
                for p, v in zip(params, best_state):
                    p.copy_(v)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None
        model.train(was)
    return {"steps": step, "best_step": best_step if validation else step, "initial_value": initial, "best_value": best,
            "measurements": measurements, "seconds": time.perf_counter() - t0, "state": original}


def restore(model: nn.Module, state: Sequence[torch.Tensor]) -> None:
    """Put back the LayerNorm parameters :func:`tent` saved in its ``state``."""
    with torch.no_grad():
        for p, v in zip(layer_norm_parameters(model), state):
            p.copy_(v)

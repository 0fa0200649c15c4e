"""The protocol every post-training study follows (docs/RESULTS.md): estimate the empirical prior,
convert at the identity, search the knobs per target, compare with a paired bootstrap, tabulate.

1. :func:`convert_at_identity`: the empirical prior of the unchanged model on source text, then
   :func:`nvformer.convert` with the identity knobs (the outputs do not change);
2. :meth:`Protocol.search`: from the identity, :func:`nvformer.tune` of a
   :class:`~nvformer.KnobSpace` on a target's objective; the result is a :class:`Choice`;
   :meth:`Protocol.apply` puts a choice (and nothing else) on the model;
3. the paired bootstrap of a metric between two systems' per-example statistics on the same test
   examples: :meth:`nvformer.tasks.Metric.compare` (perplexity, BLEU, ...), or
   :func:`nvformer.metrics.paired_bootstrap` of per-example scores (accuracy, NLL);
4. the tables: :func:`nvformer_studies.common.docs.table`.

The studies supply what is theirs: data, objectives, metrics, and their own methods (WiSE-FT,
controls and frozen features for sentiment; generation samples for the language model; per-site
searches for translation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from nvformer import IDENTITY, Knobs, KnobSpace, Prior, convert, estimate_prior, set_knobs, tune
from nvformer.api import knob_groups
from nvformer.tuning.space import apply_knobs

__all__ = ["Choice", "Protocol", "convert_at_identity"]


def convert_at_identity(model: nn.Module, prior_batches: Iterable[Any], identity: Knobs = IDENTITY) -> dict[str, Prior]:
    """Estimate the empirical prior of ``model`` (unconverted) on ``prior_batches`` (model inputs,
    see :func:`nvformer.estimate_prior`) and convert it in place with the knobs ``identity``;
    returns the priors ``{module name: Prior}``."""
    priors = estimate_prior(model, prior_batches, show_progress=False)
    convert(model, prior=priors, **identity.as_dict())
    return priors


@dataclass
class Choice:
    """The knobs a method chose for a target.

    Attributes:
        method, target: who chose, and for which target (domain).
        space: the searched :class:`~nvformer.KnobSpace` (None: the identity).
        params: the chosen ``{"group/knob": value}`` (trial parameter names of the search).
        value: the objective at the chosen knobs (on the data the search saw).
        identity_value: the objective at the search's identity corner.
        trials: the number of trials in the search's Optuna study.
    """

    method: str
    target: str
    space: KnobSpace | None = None
    params: dict[str, float] = field(default_factory=dict)
    value: float | None = None
    identity_value: float | None = None
    trials: int | None = None


class Protocol:
    """Knob searches and settings of one converted model, always starting from the identity.

    Args:
        model: a converted model (see :func:`convert_at_identity`).
        identity: the knobs it was converted with; :meth:`reset` returns to them.
        seed: the seed of every search's sampler.
    """

    def __init__(self, model: nn.Module, *, identity: Knobs = IDENTITY, seed: int = 0) -> None:
        self.model, self.identity, self.seed = model, identity, seed

    def reset(self) -> None:
        """Every NV module back to the identity knobs (and no per-head knobs)."""
        set_knobs(self.model, self.identity)
        for _, _, nvib in knob_groups(self.model):
            if nvib.head_knobs() is not None:
                nvib.set_head_knobs()

    def apply(self, choice: Choice) -> None:
        """The identity, then the knobs of ``choice``."""
        self.reset()
        if choice.space is not None:
            apply_knobs(self.model, choice.space, choice.params)

    def search(self, choice: Choice, space: KnobSpace, objective: Callable[[nn.Module], float], n_trials: int,
               **tune_kw: Any) -> Choice:
        """:func:`nvformer.tune` of ``space`` from the identity (identity corner first, the
        protocol's seed, no progress bar; ``tune_kw``: ``direction``, ``study_name``, ``out_dir``);
        returns ``choice`` with the space, the best knobs, the objective values and the trial count
        filled in. The model is left at the best knobs."""
        self.reset()
        res = tune(self.model, objective, space=space, n_trials=n_trials, seed=self.seed, show_progress=False, **tune_kw)
        return replace(choice, space=space, params=dict(res.best_params), value=res.best_value, identity_value=res.identity_value,
                       trials=res.n_complete)

"""The search space of the knobs: which groups of modules share a setting, and the ranges.

A *group* is a set of NV modules that share one knob setting during a search: ``"all"`` (every
module), a site (``"encoder"``), one layer of a site (``"encoder.3"``) or several layers sharing
one setting (``"encoder.4+5"``). Trial parameters are named ``"{group}/{knob}"``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..api import knob_groups, set_knobs
from ..config import KNOBS, SITES

__all__ = ["KnobSpace", "apply_knobs"]


def _finite_range(r: Any) -> bool:
    """``r`` is a ``(low, high)`` pair of finite real numbers with ``low <= high``."""
    try:
        lo, hi = r
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) and math.isfinite(lo) \
            and math.isfinite(hi) and lo <= hi
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class KnobSpace:
    """Search space of the knobs.

    Args:
        sites: sites tuned separately (each gets its own knobs); None = one setting for all sites.
        per_layer: also separate knobs per layer within each site (the cross site is one NVIB).
        alpha_tau, stdev_tau: ``(low, high)`` ranges (the authors searched ``[-15, 10]`` and
            ``[0, 0.5]``).
        mu_tau: a range to search, or None to keep ``mu_tau = 1``.
        log_alpha: sample ``alpha_tau`` on a log scale (the range must then be positive); for
            models whose pseudo-count scale ``s_alpha`` is small (SmolLM2: identity needs
            ``alpha_tau`` ~ 1000, yet ``alpha_tau`` ~ 10 already moves the outputs).
        layers: tune only these layer indices (the others keep their knobs); with
            ``per_layer=False`` they share one setting. The cross site has no layers and is
            skipped when ``layers`` is given.
    """

    sites: tuple[str, ...] | None = None
    per_layer: bool = False
    alpha_tau: tuple[float, float] = (-15.0, 10.0)
    stdev_tau: tuple[float, float] = (0.0, 0.5)
    mu_tau: tuple[float, float] | None = None
    layers: tuple[int, ...] | None = None
    log_alpha: bool = False

    def __post_init__(self) -> None:
        for name in ("alpha_tau", "stdev_tau", "mu_tau"):
            r = getattr(self, name)
            if r is not None and not _finite_range(r):
                raise ValueError(f"KnobSpace: `{name}` must be a finite (low, high) pair with low <= high, got {r!r}")
        if self.log_alpha and self.alpha_tau[0] <= 0:
            raise ValueError(f"KnobSpace: a log-scale `alpha_tau` range must be positive, got {self.alpha_tau}")
        if self.stdev_tau[0] < 0:
            raise ValueError(f"KnobSpace: `stdev_tau` must be >= 0, got {self.stdev_tau}")
        if self.sites is not None and not set(self.sites) <= set(SITES):
            raise ValueError(f"KnobSpace: unknown site(s) in {self.sites}; sites are {SITES}")
        if self.layers is not None and (not self.layers or any(not isinstance(i, int) or i < 0 for i in self.layers)):
            raise ValueError(f"KnobSpace: `layers` must be a non-empty tuple of layer indices, got {self.layers!r}")

    def groups(self, model: nn.Module) -> list[tuple[str, str | None, int | None]]:
        """``(group name, site, layer)`` of every group of modules that shares one knob setting."""
        present = []
        for _, info, _ in knob_groups(model, "KnobSpace"):
            if info.site not in present:
                present.append(info.site)
        sites = [s for s in (self.sites or []) if s in present]
        if self.layers is not None:
            return self._layer_groups(model, sites if self.sites is not None else [s for s in present if s != "cross"])
        if self.sites is None:
            if not self.per_layer:
                return [("all", None, None)]
            sites = present
        out = []
        for site in sites:
            layers = self._layers(model, site)
            if self.per_layer and site != "cross" and layers:
                out += [(f"{site}.{layer}", site, layer) for layer in layers]
            else:
                out.append((str(site), site, None))
        return out

    def _layer_groups(self, model: nn.Module, sites: list) -> list[tuple[str, str | None, Any]]:
        out = []
        for site in sites:
            have = set(self._layers(model, site))
            missing = set(self.layers) - have
            if missing:
                raise ValueError(f"KnobSpace: site {site!r} has no layer(s) {sorted(missing)} (it has {sorted(have)})")
            if self.per_layer:
                out += [(f"{site}.{layer}", site, layer) for layer in self.layers]
            else:
                out.append((f"{site}.{'+'.join(map(str, self.layers))}", site, tuple(self.layers)))
        return out

    @staticmethod
    def _layers(model: nn.Module, site: str) -> list[int]:
        return sorted({info.layer for _, info, _ in knob_groups(model, "KnobSpace") if info.site == site and info.layer is not None})

    def check(self, model: nn.Module, who: str = "KnobSpace") -> None:
        """Raise ``ValueError`` unless every site of ``sites`` has NV modules in ``model`` (and the
        space selects at least one module)."""
        present = [s for s in SITES if any(info.site == s for _, info, _ in knob_groups(model, who))]
        missing = [s for s in (self.sites or ()) if s not in present]
        if missing:
            raise ValueError(f"{who}: `space` names site(s) {', '.join(map(repr, missing))} where {type(model).__name__} "
                             f"has no NV module (its sites: {', '.join(present)})")
        if not self.groups(model):
            raise ValueError(f"{who}: `space` selects no NV module of {type(model).__name__} (its sites: {', '.join(present)})")

    def ranges(self, model: nn.Module) -> dict[str, tuple[float, float, bool]]:
        """``{"{group}/{knob}": (low, high, log)}`` of every trial parameter, in the order a search suggests them."""
        out = {}
        for group, *_ in self.groups(model):
            out[f"{group}/alpha_tau"] = (float(self.alpha_tau[0]), float(self.alpha_tau[1]), self.log_alpha)
            out[f"{group}/stdev_tau"] = (float(self.stdev_tau[0]), float(self.stdev_tau[1]), False)
            if self.mu_tau is not None:
                out[f"{group}/mu_tau"] = (float(self.mu_tau[0]), float(self.mu_tau[1]), False)
        return out

    def identity(self) -> dict[str, float]:
        """The identity-like corner of one group: largest ``alpha_tau``, ``stdev_tau`` at its low
        end, ``mu_tau`` as close to 1 as its range allows."""
        knobs = {"alpha_tau": float(self.alpha_tau[1]), "stdev_tau": float(self.stdev_tau[0])}
        if self.mu_tau is not None:
            knobs["mu_tau"] = float(min(max(1.0, self.mu_tau[0]), self.mu_tau[1]))
        return knobs

    def identity_params(self, model: nn.Module) -> dict[str, float]:
        """The identity corner as trial parameters (``"{group}/{knob}"``) of every group."""
        return {f"{g}/{k}": v for g, *_ in self.groups(model) for k, v in self.identity().items()}


def apply_knobs(model: nn.Module, space: KnobSpace, params: dict[str, float]) -> None:
    """Set the knobs ``params`` (``"{group}/{knob}"`` names, as a search names them) on ``model``."""
    for group, site, layer in space.groups(model):
        knobs = {k: params[f"{group}/{k}"] for k in KNOBS if f"{group}/{k}" in params}
        set_knobs(model, site=site, layers=layer, **knobs)

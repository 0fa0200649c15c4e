"""One configuration object for NV conversion, and one vocabulary for the knobs.

:class:`NVConfig` is what :func:`nvformer.convert` takes, what :func:`nvformer.get_config`
returns, what :func:`nvformer.set_knobs` writes and what :func:`nvformer.save_adapter` saves.
:class:`Knobs` is one knob setting, always in the order ``alpha_tau, stdev_tau, mu_tau``
(docs/MATH.md section 4):

* ``alpha_tau``: shifts every token's log pseudo-count by ``alpha_tau * s_alpha``, in units of
  the prior's spread ``s_alpha`` (the prior component's weight relative to a token scales as
  ``exp(-alpha_tau * s_alpha)``, times a data-dependent constant); large = identity, small or
  negative = mass on the prior;
* ``stdev_tau >= 0``: the token variances are ``(stdev_tau * sigma_p)^2``; 0 = identity;
* ``mu_tau``: the token means are ``mu_tau x + (1 - mu_tau) mu_p``; 1 = identity.

:data:`IDENTITY` is the setting at which a converted model computes what the original did, up to
a prior weight that scales as ``exp(-1e4 s_alpha)``: below float precision whenever
``s_alpha > 0.01`` (the empirical priors in docs/RESULTS.md have ``s_alpha`` from 0.025 to 5.4; an
estimate floors ``s_alpha`` at 1e-6, so data whose vectors all have one norm is not covered).

Knobs can differ per site and per layer: ``NVConfig.knobs`` maps *group keys* to settings, the
most specific key winning: a module's own name, then ``"site.layer"`` (e.g. ``"encoder.3"``), then
the site (``"encoder"``, ``"decoder"``, ``"cross"``), then ``"*"`` (every module).

No state: plain data, validated on construction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .core.checks import check_choice, check_int, check_knob, check_mapping, check_real

__all__ = ["FORMULAS", "IDENTITY", "KNOBS", "SITES", "Knobs", "NVConfig", "NVSite", "group_key", "is_module_key"]

SITES = ("encoder", "decoder", "cross")
FORMULAS = ("paper", "exact")
KNOBS = ("alpha_tau", "stdev_tau", "mu_tau")  # the one knob order, everywhere
THRESHOLD_MODES = ("absolute", "relative")
PRIOR_SCALINGS = ("constant", "length")


@dataclass(frozen=True)
class Knobs:
    """One knob setting (module docstring). Validated: finite values, ``stdev_tau >= 0``."""

    alpha_tau: float = 1e4
    stdev_tau: float = 0.0
    mu_tau: float = 1.0

    def __post_init__(self) -> None:
        for name in KNOBS:
            minimum = 0.0 if name == "stdev_tau" else None
            object.__setattr__(self, name, check_knob(getattr(self, name), name, "Knobs", minimum))

    def replace(self, **changes: float | None) -> Knobs:
        """A copy with the given knobs changed (None = keep)."""
        unknown = set(changes) - set(KNOBS)
        if unknown:
            raise ValueError(f"Knobs: unknown knob(s) {sorted(unknown)}; knobs are {KNOBS}")
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in KNOBS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "Knobs") -> Knobs:
        """Strict: every key must be a knob name (missing ones take the identity value)."""
        kw = check_mapping(d, KNOBS, where, "knob")
        try:
            return cls(**kw)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


IDENTITY = Knobs()


def group_key(site: str | None, layer: int | None) -> str:
    """The ``NVConfig.knobs`` key of one layer's module(s): ``"site.layer"``, or the site alone."""
    site = site or "*"
    return site if layer is None else f"{site}.{layer}"


def is_module_key(key: str) -> bool:
    """True if a knob group key names one module (not ``"*"``, a site or ``"site.layer"``)."""
    site, _, layer = key.partition(".")
    return not (key == "*" or (site in SITES and (not layer or layer.isdigit())))


def _check_group(key: str, where: str) -> None:
    if not is_module_key(key):
        return
    # anything else must look like a module name (a dotted path), which resolves first
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"{where}: bad knob group {key!r}: use '*', a site {SITES}, 'site.layer' or a module name")


@dataclass(frozen=True)
class NVConfig:
    """Everything that defines an NV conversion besides the priors.

    Args:
        sites: the attention sites to convert (``"encoder"``: bidirectional self-attention, one
            NVIB per layer; ``"decoder"``: causal self-attention; ``"cross"``: one NVIB on the final
            encoder output shared by all decoder layers, as in Fehr & Henderson 2024).
        formula: evaluation formula, ``"paper"`` (the publications) or ``"exact"`` (docs/MATH.md
            section 3).
        delta: pseudo-count per token of the conditional prior in ``KL_D``.
        kappa: samples per component in training (1 for Hugging Face models).
        alpha_threshold, threshold_mode: evaluation-time pruning of token components
            (``"absolute"``: pseudo-count ``<= alpha_threshold``, the authors' 0.1;
            ``"relative"``: weight ``a_i / sum a <= alpha_threshold``); None keeps all.
        prior_component: include the prior component.
        prior_scaling: ``"constant"`` (the prior component's pseudo-count ``alpha_p``, the publications') or
            ``"length"`` (``alpha_p`` times the number of tokens each query sees, so the prior's share does
            not shrink as inputs grow: docs/MATH.md section 4; evaluation form of Hugging Face models).
        min_var: variance floor (keeps ``stdev_tau = 0`` finite).
        alpha_skip: link consecutive NV self-attention layers (Behjati et al. 2023; PyTorch models).
        knobs: group key -> :class:`Knobs` (module docstring); default ``{"*": IDENTITY}``.
    """

    sites: tuple[str, ...] = SITES
    formula: str = "paper"
    delta: float = 1.0
    kappa: int = 1
    alpha_threshold: float | None = None
    threshold_mode: str = "absolute"
    prior_component: bool = True
    prior_scaling: str = "constant"
    min_var: float = 1e-20
    alpha_skip: bool = False
    knobs: Mapping[str, Knobs] = field(default_factory=lambda: {"*": IDENTITY})

    def __post_init__(self) -> None:
        where = "NVConfig"
        try:
            sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        except TypeError:
            raise ValueError(f"{where}: `sites` must be a site or a sequence of sites {SITES}, got {self.sites!r}") from None
        bad = [s for s in sites if s not in SITES]
        if bad or not sites:
            raise ValueError(f"{where}: unknown or no site(s) {bad}; sites are {SITES}")
        object.__setattr__(self, "sites", sites)
        check_choice(self.formula, "formula", where, FORMULAS)
        object.__setattr__(self, "delta", check_real(self.delta, "delta", where, minimum=0.0))
        check_int(self.kappa, "kappa", where)
        if self.alpha_threshold is not None:
            check_real(self.alpha_threshold, "alpha_threshold", where, above=0.0)
        check_choice(self.threshold_mode, "threshold_mode", where, THRESHOLD_MODES)
        check_choice(self.prior_scaling, "prior_scaling", where, PRIOR_SCALINGS)
        if not isinstance(self.prior_component, bool) or not isinstance(self.alpha_skip, bool):
            raise ValueError(f"{where}: `prior_component` and `alpha_skip` must be True or False")
        check_real(self.min_var, "min_var", where, above=0.0)
        if not isinstance(self.knobs, Mapping):
            raise ValueError(f"{where}: `knobs` must map group keys to knob settings, got {type(self.knobs).__name__}")
        knobs = {}
        for key, value in dict(self.knobs).items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: knob group keys must be strings, got {key!r}")
            _check_group(key, where)
            knobs[key] = value if isinstance(value, Knobs) else Knobs.from_dict(value, f"{where}.knobs[{key!r}]")
        if not knobs:
            knobs = {"*": IDENTITY}
        object.__setattr__(self, "knobs", knobs)

    # ------------------------------------------------------------------ knobs
    def lookup(self, site: str | None, layer: int | None, name: str | None = None) -> Knobs | None:
        """The knobs of one module: its name, then ``"site.layer"``, then its site, then ``"*"``;
        None if no key matches."""
        for key in (name, None if layer is None else group_key(site, layer), site, "*"):
            if key is not None and key in self.knobs:
                return self.knobs[key]
        return None

    def knobs_for(self, site: str | None, layer: int | None, name: str | None = None) -> Knobs:
        """:meth:`lookup`, with :data:`IDENTITY` where no key matches."""
        found = self.lookup(site, layer, name)
        return IDENTITY if found is None else found

    def with_knobs(self, knobs: Mapping[str, Knobs] | Knobs | None = None, **changes: float | None) -> NVConfig:
        """A copy whose knobs are ``knobs`` (a mapping, or one setting for every module), and/or
        whose default setting ``"*"`` has the given knob values changed."""
        new = dict(self.knobs) if knobs is None else ({"*": knobs} if isinstance(knobs, Knobs) else dict(knobs))
        if changes:
            new["*"] = new.get("*", IDENTITY).replace(**changes)
        return replace(self, knobs=new)

    def nvib_settings(self) -> dict[str, Any]:
        """The :class:`~nvformer.NVIB` keyword arguments besides knobs and prior."""
        return {"delta": self.delta, "kappa": self.kappa, "alpha_threshold": self.alpha_threshold,
                "threshold_mode": self.threshold_mode, "prior_component": self.prior_component, "min_var": self.min_var,
                "prior_scaling": self.prior_scaling}

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sites"] = list(self.sites)
        d["knobs"] = {k: v.as_dict() for k, v in self.knobs.items()}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "NVConfig") -> NVConfig:
        """Strict: unknown fields, unknown knobs and invalid values are errors naming them."""
        kw = check_mapping(d, (f.name for f in fields(cls)), where)
        if "knobs" in kw:
            if not isinstance(kw["knobs"], Mapping):
                raise ValueError(f"{where}: `knobs` must map group keys to knob settings")
            kw["knobs"] = {k: Knobs.from_dict(v, f"{where}.knobs[{k!r}]") for k, v in kw["knobs"].items()}
        try:
            return cls(**kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None


@dataclass(frozen=True)
class NVSite:
    """Where one converted attention module sits: its site, layer index, the name of the module
    whose NVIB it reads (itself, except for the shared cross-attention NVIB), its evaluation
    formula and, for Hugging Face modules, the family adapter. Stored as ``module._nv``."""

    site: str
    layer: int | None
    owner: str
    formula: str = "paper"
    adapter: Any = None

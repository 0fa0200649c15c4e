"""Variational inference on attention weights (Cinquin, Immer, Horn & Fortuin 2021): docs/MATH.md section 5.

Per query ``t`` the attention distribution ``a_t`` over the visible keys gets a Dirichlet
posterior ``q(a_t) = Dir(c_t)`` built from the attention scores ``s_t = scale q_t K^T`` (+ mask),
a Dirichlet prior ``p(a_t) = Dir(c0_t)``, reparameterised samples (implicit reparameterisation
gradients through :func:`nvformer.sample_dirichlet`) and the ELBO term ``KL(q || p)``.

The paper's exact parameterisation is not available; ours, configurable in :class:`DirichletSpec`:

* concentration ``"softmax"`` (default): ``c_t = tau n_t softmax(s_t) + eps`` with ``n_t`` the
  number of visible keys: the posterior mean is (up to ``eps``) the deterministic attention and
  the total concentration ``tau n_t`` sets how tightly samples gather around it (``tau`` learnt
  per module when ``learn_tau``, starting at ``tau``);
  ``"exp"``: ``c_t = tau exp(s_t) + eps`` (an evidential form: large scores give confident
  posteriors, small ones uncertain ones).
* prior ``"centred"`` (default): ``c0_t = prior_tau n_t softmax(s_t) + eps`` with the softmax
  detached (a prior centred on the deterministic attention, penalising only over- or
  under-dispersion); ``"symmetric"``: ``c0_t = prior_alpha`` for every visible key. The default
  ``prior_tau`` equals the default ``tau`` (10): the KL is 0 at initialisation and grows only as
  the learnt concentration moves away from the prior's. A broad prior is a trap: the attention
  KL is a sum of one Dirichlet KL per query, head and layer (about 10^4 of them, each over up to
  128 keys, for one 128-token review in MiniLM), so with ``prior_tau = 1`` it outweighs the
  likelihood, training drives the posterior
  to the prior's near-uniform noise and the classifier to chance (measured: docs/RESULTS.md,
  "Bayesian attention").
* prediction ``"mean"``: attention ``E_q[a_t] = c_t / sum(c_t)``; ``"sample"``: a fresh sample
  per forward (average the predictions of ``S`` forwards for a Monte Carlo predictive). In
  training the weights are always sampled.

Everything over the ``[B, H, Nq, Nk]`` scores runs in the input's precision (at least float32):
the concentrations and the Gamma draws in log space (so tiny attention probabilities neither
under- nor overflow), the KL's per-entry terms; the KL's per-row terms and sums are float64
(:func:`dirichlet_kl`). The posterior-mean weights without the KL, all that a ``"mean"``
prediction needs, cost about a softmax. Evaluation-mode forwards skip the KL (``last_kl`` is None) unless
:func:`set_eval_kl` asks for it, e.g. for a validation ELBO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.checks import check_choice, check_real
from ..core.kl import lgamma_terms
from ..core.masks import masked_log_softmax, nothing_set, safe_softmax
from ..core.sampling import sample_dirichlet

__all__ = ["CONCENTRATIONS", "PREDICTIONS", "PRIORS", "DirichletSpec", "dirichlet_attention", "dirichlet_kl", "log_concentrations",
           "mean_weights", "working_dtype"]

CONCENTRATIONS = ("softmax", "exp")
PRIORS = ("centred", "symmetric")
PREDICTIONS = ("mean", "sample")
DIRECT_BELOW = math.log(1e3)  # dirichlet_kl: log-concentrations below this take the direct per-entry form


@dataclass(frozen=True)
class DirichletSpec:
    """Parameterisation of Dirichlet attention (module docstring)."""

    concentration: str = "softmax"
    tau: float = 10.0
    learn_tau: bool = True
    eps: float = 1e-4
    prior: str = "centred"
    prior_tau: float = 10.0
    prior_alpha: float = 1.0
    prediction: str = "mean"

    def __post_init__(self) -> None:
        where = "DirichletSpec"
        check_choice(self.concentration, "concentration", where, CONCENTRATIONS)
        check_choice(self.prior, "prior", where, PRIORS)
        check_choice(self.prediction, "prediction", where, PREDICTIONS)
        for name in ("tau", "eps", "prior_tau", "prior_alpha"):
            check_real(getattr(self, name), name, where, above=0.0)
        if not isinstance(self.learn_tau, bool):
            raise ValueError(f"{where}: `learn_tau` must be True or False, got {self.learn_tau!r}")


def dirichlet_kl(log_cq: Tensor, log_cp: Tensor, pad: Tensor | None = None) -> Tensor:
    """``KL(Dir(c_q) || Dir(c_p))`` over the last dimension, from log concentrations; float64 result.

    The textbook ``lgamma(C_q) - sum lgamma(c_q) - lgamma(C_p) + sum lgamma(c_p)
    + sum (c_q - c_p)(digamma(c_q) - digamma(C_q))`` (``C = sum c``) has ``O(C log C)`` terms that
    cancel, so it loses every digit once concentrations reach ``e^40``. It is evaluated regrouped,
    as :func:`nvformer.kl_symmetric_dirichlet` is (docs/MATH.md section 2, "Cancellation-free
    evaluation"), with ``h(x) = lgamma(x) - x psi(x) + x`` and ``g(x) = psi(x) - log x``
    (:func:`nvformer.core.kl.lgamma_terms`, ``O(log x)`` quantities)::

        KL = h(C_q) - h(C_p) + C_p (g(C_q) - g(C_p)) + C_p (log C_q - log C_p) + sum_i e_i
        e_i = h(c_p) - h(c_q) + c_p (log c_p - log c_q + g(c_p) - g(c_q))
            = lgamma(c_p) - lgamma(c_q) + (c_p - c_q)(1 - psi(c_q))

    No term is larger than the KL's own scale, so the result is exact far beyond float64's ``exp``
    range (and exactly 0 for ``c_q = c_p``). ``e_i`` takes its second form (one digamma, as cheap as
    the textbook formula) where both concentrations are below 1000, whose terms then carry no more
    than ``1e-12`` of rounding. Entries where ``pad`` is True are not part of the distribution;
    rows with no visible entry give 0.

    Precision: float64 inputs are computed in float64 throughout. Float32 (or 16-bit) inputs, as
    Dirichlet attention passes for float32 models, keep the per-entry terms ``e_i`` (the ``O(N^2)``
    part of attention) in float32 and do everything per row (the totals, their ``h`` and ``g``, the
    sum of the ``e_i``) in float64: each ``e_i`` then carries a relative rounding of about ``1e-7``
    and ``log C`` one float32 ulp, so the KL of a row is exact to about ``ulp(log C) C + n ulp(lgamma)`` (measured:
    within 2e-3 of the float64 path at tau 3-30 with 128 keys, gradients within 1e-4 of their
    largest magnitude; ``tests/dirichlet``).
    """
    entry_dtype = torch.promote_types(torch.promote_types(log_cq.dtype, log_cp.dtype), torch.float32)
    lq, lp = torch.broadcast_tensors(log_cq.to(entry_dtype), log_cp.to(entry_dtype))
    padded = pad is not None and not nothing_set(pad)  # without padding the masked passes below are skipped
    pad = pad.expand(lq.shape) if padded else None
    empty = pad.all(-1, keepdim=True) if padded else None  # such a row is computed on dummy entries (log c = 0) and zeroed at the end

    def log_total(lc: Tensor) -> Tensor:  # [..., 1] log of the sum over the visible entries, float64
        visible = lc.masked_fill(pad, float("-inf")).masked_fill(empty, 0.0) if padded else lc
        return torch.logsumexp(visible, -1, keepdim=True).double()

    if padded:
        lq, lp = lq.masked_fill(pad, 0.0), lp.masked_fill(pad, 0.0)
    log_Cq, log_Cp = log_total(lq), log_total(lp)
    (h_Cq, g_Cq), (h_Cp, g_Cp) = lgamma_terms(log_Cq), lgamma_terms(log_Cp)
    C_p = log_Cp.exp()
    kl = (h_Cq - h_Cp + C_p * (g_Cq - g_Cp) + C_p * (log_Cq - log_Cp)).squeeze(-1)
    cq, cp = lq.clamp(max=DIRECT_BELOW).exp(), lp.clamp(max=DIRECT_BELOW).exp()  # clamped: no inf (nor NaN gradient) where unused
    per_entry = _EntryTerms.apply(cq, cp)
    large = (lq >= DIRECT_BELOW) | (lp >= DIRECT_BELOW)
    if bool(large.any()):  # few entries: their O(log c) form in float64, added to their rows' sums
        per_entry = per_entry.masked_fill(large, 0.0)
        lq_l, lp_l = lq[large].double(), lp[large].double()
        (h_q, g_q), (h_p, g_p) = lgamma_terms(lq_l), lgamma_terms(lp_l)
        rows = tuple(large.nonzero(as_tuple=False)[:, :-1].T)  # each entry's row; accumulate sums an entry per row
        kl = kl.index_put(rows, h_p - h_q + lp_l.exp() * (lp_l - lq_l + g_p - g_q), accumulate=True)
    if padded:
        per_entry = per_entry.masked_fill(pad, 0.0)
    kl = kl + per_entry.sum(-1, dtype=torch.float64)
    return kl.masked_fill(empty.squeeze(-1), 0.0) if padded else kl


class _EntryTerms(torch.autograd.Function):
    """``e = lgamma(c_p) - lgamma(c_q) + (c_p - c_q)(1 - psi(c_q))`` elementwise, with its derivatives
    written out: ``de/dc_q = -1 - (c_p - c_q) psi'(c_q)`` (the ``psi(c_q)`` of ``lgamma``'s derivative
    cancels) and ``de/dc_p = psi(c_p) + 1 - psi(c_q)``; autograd would evaluate ``psi(c_q)`` twice and
    keep every intermediate of the ``[B, H, Nq, Nk]`` product alive."""

    @staticmethod
    def forward(ctx, cq: Tensor, cp: Tensor) -> Tensor:  # noqa: D102
        psi_q = torch.digamma(cq)
        ctx.save_for_backward(cq, cp, psi_q if ctx.needs_input_grad[1] else None)
        return torch.lgamma(cp) - torch.lgamma(cq) + (cp - cq) * (1.0 - psi_q)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # noqa: D102
        cq, cp, psi_q = ctx.saved_tensors
        g_q = -grad * torch.addcmul(torch.ones((), dtype=cq.dtype, device=cq.device), cp - cq, torch.polygamma(1, cq)) if ctx.needs_input_grad[0] else None
        g_p = grad * (torch.digamma(cp) + 1.0 - psi_q) if ctx.needs_input_grad[1] else None
        return g_q, g_p


def log_concentrations(logits: Tensor, spec: DirichletSpec, tau: Tensor | float, *, prior: bool = True,
                       masked: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(log c [..., N], log c0 [..., N], pad [..., N])`` from masked attention logits, in their
    dtype (at least float32; pass float64 logits for the exact sampling / KL path).

    ``logits`` are ``scale q.k`` plus the additive mask (``-inf`` = not visible). ``log c0`` (the
    prior's) is None when ``prior`` is False (a sample without its KL needs only ``log c``).
    ``masked=False`` promises that no logit is ``-inf`` (no mask was added): the mask is then not
    looked for and ``pad`` is None.
    """
    return _concentrations(logits, spec, tau, prior=prior, masked=masked)[:3]


_LINEAR_BELOW = math.exp(20.0)  # tau n below this: "softmax" concentrations are formed in linear space


def _concentrations(logits: Tensor, spec: DirichletSpec, tau: Tensor | float, *, prior: bool,
                    masked: bool, need_log: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """:func:`log_concentrations` and, when it was formed on the way, ``c`` itself (else None).

    ``"softmax"`` with ``tau n < e^20`` forms ``c = tau n softmax(s) + eps`` in linear space (an
    attention probability that underflows leaves ``c = eps``, its value to the dtype's precision)
    and takes one log, instead of a ``logaddexp`` in log space, which larger ``tau n`` need.
    ``need_log=False`` (a sample without its KL): ``log c`` is None whenever ``c`` is formed.
    """
    lg = logits.to(torch.promote_types(logits.dtype, torch.float32))
    pad = torch.isneginf(lg) if masked else None
    padded = pad is not None and not nothing_set(pad)
    n = (~pad).sum(-1, keepdim=True).clamp_min(1).to(lg.dtype) if padded else torch.tensor(float(lg.shape[-1]), dtype=lg.dtype, device=lg.device)
    tau_t = torch.as_tensor(tau, device=lg.device).to(lg.dtype)
    log_eps = math.log(spec.eps)
    linear = spec.concentration == "softmax" and float(tau_t.detach().max()) * lg.shape[-1] < _LINEAR_BELOW
    c = p = log_p = None
    if linear:
        p = safe_softmax(lg) if padded else torch.softmax(lg, -1)
        scale = tau_t * n
        # no graph and no prior to read p: c over p (one full-size tensor fewer; the same kernel, the same numbers)
        over_p = not prior and not (torch.is_grad_enabled() and (p.requires_grad or scale.requires_grad))
        c = torch.addcmul(torch.tensor(spec.eps, dtype=lg.dtype, device=lg.device), p, scale, out=p if over_p else None)
        log_c = c.log() if need_log else None
    else:
        log_p = masked_log_softmax(lg, pad) if padded else torch.log_softmax(lg, -1)
        if spec.concentration == "softmax":
            core = tau_t.log() + n.log() + log_p
        else:
            core = tau_t.log() + (lg.masked_fill(pad, 0.0) if padded else lg)
        log_c = _log_plus_eps(core, log_eps)
    log_c0 = None
    if prior and spec.prior == "centred":
        if linear:
            log_c0 = torch.addcmul(torch.tensor(spec.eps, dtype=lg.dtype, device=lg.device), p.detach(), spec.prior_tau * n).log()
        else:
            lp = log_p if log_p is not None else (masked_log_softmax(lg, pad) if padded else torch.log_softmax(lg, -1))
            log_c0 = _log_plus_eps(math.log(spec.prior_tau) + n.log() + lp.detach(), log_eps)
    elif prior:
        log_c0 = torch.full_like(lg, math.log(spec.prior_alpha))
    if padded:
        log_c = None if log_c is None else log_c.masked_fill(pad, float("-inf"))
        log_c0 = None if log_c0 is None else log_c0.masked_fill(pad, float("-inf"))
        c = None if c is None else c.masked_fill(pad, 0.0)
    return log_c, log_c0, pad, c


def _log_plus_eps(core: Tensor, log_eps: float) -> Tensor:
    """``log(exp(core) + eps)`` elementwise, as ``logaddexp`` without materialising ``eps``."""
    return torch.logaddexp(core, torch.tensor(log_eps, dtype=core.dtype, device=core.device))


def dirichlet_attention(query: Tensor, key: Tensor, value: Tensor, bias: Tensor | None, spec: DirichletSpec, tau: Tensor | float, *,
                        sample: bool, kl: bool = True, scale: float | None = None, dropout_p: float = 0.0) -> tuple[Tensor, Tensor, Tensor | None]:
    """Attention with Dirichlet weights.

    Args:
        query: ``[B, H, Nq, d]``; key: ``[B, H, Nk, d]``; value: ``[B, H, Nk, d_v]``.
        bias: additive mask broadcastable to ``[B, H, Nq, Nk]`` (``-inf`` = not visible) or None.
        sample: draw ``a ~ q`` (training / Monte Carlo prediction) or use ``E_q[a]``.
        kl: compute the KL term (float64 per row, :func:`dirichlet_kl`); everything else runs in
            the input's precision (at least float32).

    Returns:
        ``(out [B, H, Nq, d_v], weights [B, H, Nq, Nk], kl [B, H, Nq] or None)`` (``kl`` float64;
        rows with no visible key get zero weights and zero KL).
    """
    if query.dim() != 4 or key.dim() != 4 or value.shape[:-1] != key.shape[:-1]:
        raise ValueError(f"dirichlet_attention: need query [B, H, Nq, d] and key/value [B, H, Nk, d], got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    cd = working_dtype(query.dtype, sample=sample, kl=kl)
    logits = (query @ key.transpose(-1, -2)).to(cd).mul_(scale)  # in place: neither op's backward reads its output
    if bias is not None:
        logits = logits.add_(bias.to(cd))
    if not (sample or kl):
        weights = mean_weights(logits, spec, tau, masked=bias is not None).to(query.dtype)
        log_c = log_c0 = pad = None
    else:
        log_c, log_c0, pad, c = _concentrations(logits, spec, tau, prior=kl, masked=bias is not None, need_log=kl or not sample)
        weights = (sample_dirichlet(log_c, cd, c) if sample else safe_softmax(log_c)).to(query.dtype)  # masked entries: weight 0
    w = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return w @ value, weights, (dirichlet_kl(log_c, log_c0, pad) if kl else None)


def working_dtype(dtype: torch.dtype, *, sample: bool, kl: bool) -> torch.dtype:
    """The dtype of :func:`dirichlet_attention`'s ``[B, H, Nq, Nk]`` work: the input's, at least
    float32, for the posterior mean, the samples (log space, :func:`nvformer.sample_dirichlet`)
    and the KL's per-entry terms alike (the KL's per-row terms are float64: :func:`dirichlet_kl`).
    ``sample`` and ``kl`` do not change it (kept for callers that build masks in it)."""
    return torch.promote_types(dtype, torch.float32)


def mean_weights(logits: Tensor, spec: DirichletSpec, tau: Tensor | float, masked: bool = True) -> Tensor:
    """The posterior-mean attention ``E_q[a] = c / sum(c)`` in closed form, in the logits' dtype.

    ``"softmax"``: ``(tau softmax(s) + eps / n) / (tau + eps)`` over the ``n`` visible keys;
    ``"exp"``: ``softmax(log(tau exp(s) + eps))``. Keys with logit ``-inf`` get 0 (a row with no
    visible key: all 0). ``masked=False`` promises that no logit is ``-inf`` (no mask was added).
    """
    tau = torch.as_tensor(tau, device=logits.device).to(logits.dtype)
    if spec.concentration == "softmax" and not masked:  # one softmax and one affine map, nothing to hide
        n = logits.shape[-1]
        return torch.addcmul(spec.eps / (n * (tau + spec.eps)), torch.softmax(logits, -1), tau / (tau + spec.eps))
    if spec.concentration == "softmax":
        visible = ~torch.isneginf(logits)
        n = visible.sum(-1, keepdim=True).clamp_min(1).to(logits.dtype)
        return ((tau * safe_softmax(logits) + spec.eps / n) / (tau + spec.eps)) * visible
    log_c = torch.logaddexp(tau.log() + logits, torch.full_like(logits, math.log(spec.eps))).masked_fill(torch.isneginf(logits), float("-inf"))
    return safe_softmax(log_c)



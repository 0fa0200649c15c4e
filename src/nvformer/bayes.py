"""Variational inference on attention weights (Cinquin, Immer, Horn & Fortuin 2021): MATH.md section 5.

Per query ``t`` the attention distribution ``a_t`` over the visible keys gets a Dirichlet
posterior ``q(a_t) = Dir(c_t)`` built from the attention scores ``s_t = scale q_t K^T`` (+ mask),
a Dirichlet prior ``p(a_t) = Dir(c0_t)``, reparameterised samples (implicit reparameterisation
gradients through :func:`nvformer.sample_log_dirichlet`) and the ELBO term ``KL(q || p)``.

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

Sampling and the KL term run in float64 (concentrations from log space, so tiny attention
probabilities stay exact); the posterior-mean weights without the KL, all that a
``"mean"`` prediction needs, run in the input's precision (at least float32), at about the cost
of a softmax. Evaluation-mode forwards skip the KL (``last_kl`` is None) unless
:func:`set_eval_kl` asks for it, e.g. for a validation ELBO.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .sampling import masked_log_softmax, safe_softmax, sample_log_dirichlet

__all__ = [
    "CONCENTRATIONS",
    "PREDICTIONS",
    "PRIORS",
    "DirichletAttention",
    "DirichletSpec",
    "convert_dirichlet",
    "compute_dtype",
    "dirichlet_attention",
    "dirichlet_kl",
    "dirichlet_kl_total",
    "log_concentrations",
    "mean_weights",
    "set_eval_kl",
    "set_prediction",
]

CONCENTRATIONS = ("softmax", "exp")
PRIORS = ("centred", "symmetric")
PREDICTIONS = ("mean", "sample")


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
        if self.concentration not in CONCENTRATIONS:
            raise ValueError(f"DirichletSpec: `concentration` must be one of {CONCENTRATIONS}, got {self.concentration!r}")
        if self.prior not in PRIORS:
            raise ValueError(f"DirichletSpec: `prior` must be one of {PRIORS}, got {self.prior!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"DirichletSpec: `prediction` must be one of {PREDICTIONS}, got {self.prediction!r}")
        if not (self.tau > 0 and self.eps > 0 and self.prior_tau > 0 and self.prior_alpha > 0):
            raise ValueError("DirichletSpec: tau, eps, prior_tau and prior_alpha must be > 0")


# ---------------------------------------------------------------------------------------------- pure maths


def dirichlet_kl(log_cq: Tensor, log_cp: Tensor, pad: Tensor | None = None) -> Tensor:
    """``KL(Dir(c_q) || Dir(c_p))`` over the last dimension, from log concentrations; float64.

    ``KL = lgamma(C_q) - sum lgamma(c_q) - lgamma(C_p) + sum lgamma(c_p)
    + sum (c_q - c_p)(digamma(c_q) - digamma(C_q))`` with ``C = sum c``; entries where ``pad``
    is True are not part of the distribution. Rows with no visible entry give 0.
    """
    lq, lp = log_cq.double(), log_cp.double()
    if pad is None:
        pad = torch.zeros_like(lq, dtype=torch.bool)
    keep = ~pad
    cq = lq.exp().masked_fill(pad, 1.0)
    cp = lp.exp().masked_fill(pad, 1.0)
    Cq = (cq * keep).sum(-1)
    Cp = (cp * keep).sum(-1)
    empty = ~keep.any(-1)
    Cq, Cp = Cq.masked_fill(empty, 1.0), Cp.masked_fill(empty, 1.0)
    terms = (-torch.lgamma(cq) + torch.lgamma(cp) + (cq - cp) * (torch.digamma(cq) - torch.digamma(Cq)[..., None])) * keep
    kl = torch.lgamma(Cq) - torch.lgamma(Cp) + terms.sum(-1)
    return kl.masked_fill(empty, 0.0)


def log_concentrations(logits: Tensor, spec: DirichletSpec, tau: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
    """``(log c [..., N], log c0 [..., N], pad [..., N])`` from masked attention logits, in their
    dtype (at least float32; pass float64 logits for the exact sampling / KL path).

    ``logits`` are ``scale q.k`` plus the additive mask (``-inf`` = not visible).
    """
    lg = logits.to(torch.promote_types(logits.dtype, torch.float32))
    pad = torch.isneginf(lg)
    n = (~pad).sum(-1, keepdim=True).clamp_min(1).double()
    log_p = masked_log_softmax(lg, pad)
    log_tau = torch.log(torch.as_tensor(tau, device=lg.device)).to(lg.dtype)
    log_eps = math.log(spec.eps)
    if spec.concentration == "softmax":
        core = log_tau + n.log() + log_p
    else:
        core = log_tau + lg.masked_fill(pad, 0.0)
    log_c = torch.logaddexp(core, torch.full_like(core, log_eps)).masked_fill(pad, float("-inf"))
    if spec.prior == "centred":
        prior_core = math.log(spec.prior_tau) + n.log() + log_p.detach()
        log_c0 = torch.logaddexp(prior_core, torch.full_like(prior_core, log_eps))
    else:
        log_c0 = torch.full_like(lg, math.log(spec.prior_alpha))
    return log_c, log_c0.masked_fill(pad, float("-inf")), pad


def dirichlet_attention(query: Tensor, key: Tensor, value: Tensor, bias: Tensor | None, spec: DirichletSpec, tau: Tensor | float, *,
                        sample: bool, kl: bool = True, scale: float | None = None, dropout_p: float = 0.0) -> tuple[Tensor, Tensor, Tensor | None]:
    """Attention with Dirichlet weights.

    Args:
        query: ``[B, H, Nq, d]``; key: ``[B, H, Nk, d]``; value: ``[B, H, Nk, d_v]``.
        bias: additive mask broadcastable to ``[B, H, Nq, Nk]`` (``-inf`` = not visible) or None.
        sample: draw ``a ~ q`` (training / Monte Carlo prediction) or use ``E_q[a]``.
        kl: compute the KL term (float64); without it and without sampling, everything runs in
            the input's precision (at least float32).

    Returns:
        ``(out [B, H, Nq, d_v], weights [B, H, Nq, Nk], kl [B, H, Nq] or None)`` (``kl`` float64;
        rows with no visible key get zero weights and zero KL).
    """
    if query.dim() != 4 or key.dim() != 4 or value.shape[:-1] != key.shape[:-1]:
        raise ValueError(f"dirichlet_attention: need query [B, H, Nq, d] and key/value [B, H, Nk, d], got {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    cd = compute_dtype(query.dtype, sample=sample, kl=kl)
    logits = (query @ key.transpose(-1, -2)).to(cd) * scale
    if bias is not None:
        logits = logits + bias.to(cd)
    if not (sample or kl):
        weights = mean_weights(logits, spec, tau).to(query.dtype)
        log_c = log_c0 = pad = None
    else:
        log_c, log_c0, pad = log_concentrations(logits, spec, tau)
        log_a = sample_log_dirichlet(log_c, pad) if sample else masked_log_softmax(log_c, pad)
        weights = log_a.exp().masked_fill(pad, 0.0).to(query.dtype)
    w = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights
    return w @ value, weights, (dirichlet_kl(log_c, log_c0, pad) if kl else None)


def compute_dtype(dtype: torch.dtype, *, sample: bool, kl: bool) -> torch.dtype:
    """The dtype :func:`dirichlet_attention` works in: float64 when it samples or computes the KL,
    else the input's (at least float32), for the closed-form posterior mean."""
    return torch.float64 if (sample or kl) else torch.promote_types(dtype, torch.float32)


def mean_weights(logits: Tensor, spec: DirichletSpec, tau: Tensor | float) -> Tensor:
    """The posterior-mean attention ``E_q[a] = c / sum(c)`` in closed form, in the logits' dtype.

    ``"softmax"``: ``(tau softmax(s) + eps / n) / (tau + eps)`` over the ``n`` visible keys;
    ``"exp"``: ``softmax(log(tau exp(s) + eps))``. Keys with logit ``-inf`` get 0 (a row with no
    visible key: all 0).
    """
    tau = torch.as_tensor(tau, device=logits.device).to(logits.dtype)
    if spec.concentration == "softmax":
        visible = ~torch.isneginf(logits)
        n = visible.sum(-1, keepdim=True).clamp_min(1).to(logits.dtype)
        return ((tau * safe_softmax(logits) + spec.eps / n) / (tau + spec.eps)) * visible
    log_c = torch.logaddexp(tau.log() + logits, torch.full_like(logits, math.log(spec.eps))).masked_fill(torch.isneginf(logits), float("-inf"))
    return safe_softmax(log_c)


# ---------------------------------------------------------------------------------------------- modules


class _Tau(nn.Module):
    """The (learnable) concentration scale ``tau`` of one attention module, kept positive via its log."""

    def __init__(self, spec: DirichletSpec) -> None:
        super().__init__()
        self.spec = spec
        self.log_tau = nn.Parameter(torch.tensor(math.log(spec.tau)), requires_grad=spec.learn_tau)
        self.last_kl: Tensor | None = None
        self.eval_kl = False  # evaluation-mode forwards compute the KL too (set_eval_kl)

    @property
    def tau(self) -> Tensor:
        return self.log_tau.exp()

    def modes(self, training: bool) -> tuple[bool, bool]:
        """``(sample, kl)`` for a forward of the owning module: training always samples and computes
        the KL; evaluation samples for ``prediction="sample"`` and computes the KL after :func:`set_eval_kl`."""
        return training or self.spec.prediction == "sample", training or self.eval_kl

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.spec).items())


class DirichletAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention`` (``batch_first=True``) with Dirichlet attention weights.

    Training: sampled weights; evaluation: ``spec.prediction`` (``"mean"`` or ``"sample"``).
    After every training forward (and evaluation forward, with :func:`set_eval_kl`), ``last_kl``
    holds ``[B]``: the KL of all heads and queries (queries at padded positions excluded when a
    ``key_padding_mask`` of the same length is given); otherwise it is None.

    Args:
        embed_dim, num_heads, dropout, bias: as ``nn.MultiheadAttention``.
        spec: :class:`DirichletSpec`.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True, spec: DirichletSpec = DirichletSpec(),
                 *, device=None, dtype=None) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"DirichletAttention: `embed_dim` ({embed_dim}) must be divisible by `num_heads` ({num_heads})")
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(embed_dim, embed_dim, bias=bias, **kw) for _ in range(4))
        self.dirichlet = _Tau(spec).to(**{k: v for k, v in kw.items() if v is not None and k == "device"})

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, spec: DirichletSpec = DirichletSpec()) -> DirichletAttention:
        """A copy of ``mha``'s projections (packed or separate) with Dirichlet weights."""
        if not mha.batch_first:
            raise ValueError("DirichletAttention.from_mha: only batch_first=True modules are supported")
        if mha.bias_k is not None or mha._qkv_same_embed_dim is False and mha.kdim != mha.embed_dim:
            raise ValueError("DirichletAttention.from_mha: add_bias_kv and kdim/vdim != embed_dim are not supported")
        p = mha.in_proj_weight
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, bias=mha.in_proj_bias is not None, spec=spec, device=p.device, dtype=p.dtype)
        E = mha.embed_dim
        with torch.no_grad():
            for i, lin in enumerate((new.q_proj, new.k_proj, new.v_proj)):
                lin.weight.copy_(p[i * E : (i + 1) * E])
                if mha.in_proj_bias is not None:
                    lin.bias.copy_(mha.in_proj_bias[i * E : (i + 1) * E])
            new.out_proj.load_state_dict(mha.out_proj.state_dict())
        return new

    @property
    def last_kl(self) -> Tensor | None:
        return self.dirichlet.last_kl

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """Same arguments and return as ``nn.MultiheadAttention.forward`` (batch-first, bool masks True = masked out,
        float masks additive)."""
        if query.dim() != 3:
            raise ValueError(f"DirichletAttention: `query` must be [B, Nq, E], got {tuple(query.shape)}")
        B, Nq, E = query.shape
        Nk, H = key.shape[1], self.num_heads

        def heads(x: Tensor, n: int) -> Tensor:
            return x.view(B, n, H, E // H).transpose(1, 2)

        q, k, v = heads(self.q_proj(query), Nq), heads(self.k_proj(key), Nk), heads(self.v_proj(value), Nk)
        st = self.dirichlet
        sample, need_kl = st.modes(self.training)
        bias = torch.zeros(B, 1, Nq, Nk, dtype=compute_dtype(query.dtype, sample=sample, kl=need_kl), device=query.device)
        if key_padding_mask is not None:
            kpm = key_padding_mask if key_padding_mask.dtype == torch.bool else torch.isneginf(key_padding_mask)
            bias = bias.masked_fill(kpm[:, None, None, :], float("-inf"))
        if attn_mask is not None:
            am = attn_mask.view(-1, H, Nq, Nk) if attn_mask.dim() == 3 else attn_mask
            bias = bias.masked_fill(am, float("-inf")) if am.dtype == torch.bool else bias + am.to(bias.dtype)
        if is_causal:
            bias = bias.masked_fill(torch.ones(Nq, Nk, dtype=torch.bool, device=query.device).triu(1 + Nk - Nq), float("-inf"))
        out, w, kl = dirichlet_attention(q, k, v, bias, st.spec, st.tau, sample=sample, kl=need_kl,
                                         dropout_p=self.dropout if self.training else 0.0)
        if kl is not None and key_padding_mask is not None and Nq == Nk:
            kl = kl.masked_fill(kpm[:, None, :], 0.0)
        st.last_kl = None if kl is None else kl.sum((1, 2))
        out = self.out_proj(out.transpose(1, 2).reshape(B, Nq, E))
        if not need_weights:
            return out, None
        return out, w.mean(1) if average_attn_weights else w


def dirichlet_kl_total(model: nn.Module) -> Tensor:
    """``[B]`` summed KL of every Dirichlet attention module's last forward."""
    kls = [m.last_kl for m in model.modules() if isinstance(m, _Tau) and m.last_kl is not None]
    if not kls:
        raise RuntimeError("dirichlet_kl_total: no Dirichlet attention module has a KL from its last forward (none ran in training "
                           "mode; evaluation forwards compute it only after set_eval_kl(model))")
    return torch.stack(kls).sum(0)


def _dirichlet_states(model: nn.Module, who: str) -> list[_Tau]:
    found = [m for m in model.modules() if isinstance(m, _Tau)]
    if not found:
        raise ValueError(f"{who}: the model has no Dirichlet attention module")
    return found


def set_eval_kl(model: nn.Module, on: bool = True) -> None:
    """Make evaluation-mode forwards of every Dirichlet attention module of ``model`` compute the
    KL term (``last_kl``), e.g. for a validation ELBO; off by default, since predictions do not
    need it and the posterior-mean path is then much cheaper."""
    for m in _dirichlet_states(model, "set_eval_kl"):
        m.eval_kl = bool(on)


def set_prediction(model: nn.Module, prediction: str) -> None:
    """Switch every Dirichlet attention module of ``model`` to ``"mean"`` or ``"sample"`` prediction."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"set_prediction: `prediction` must be one of {PREDICTIONS}, got {prediction!r}")
    for m in _dirichlet_states(model, "set_prediction"):
        m.spec = DirichletSpec(**{**asdict(m.spec), "prediction": prediction})


# ---------------------------------------------------------------------------------------------- Hugging Face models

HF_NAME = "nvformer_dirichlet"


def _hf_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, scaling: float | None = None,
                  dropout: float = 0.0, **kwargs):
    """The ``transformers`` attention interface: ``[B, H, N, d]`` inputs, returns ``([B, Nq, H, d], weights)``."""
    from .hf.forward import _mask_bias

    st = getattr(module, "dirichlet", None)
    if not isinstance(st, _Tau):
        raise RuntimeError(f"nvformer Dirichlet attention: {type(module).__name__} was not converted with convert_dirichlet")
    B, H, Nq, _ = query.shape
    Nk = key.shape[2]
    if key.shape[1] != H:  # grouped-query attention
        key = key.repeat_interleave(H // key.shape[1], dim=1)
        value = value.repeat_interleave(H // value.shape[1], dim=1)
    sample, need_kl = st.modes(module.training)
    bias = _mask_bias(attention_mask, B, Nq, Nk, bool(getattr(module, "is_causal", False)),
                      compute_dtype(query.dtype, sample=sample, kl=need_kl), query.device)
    out, w, kl = dirichlet_attention(query, key, value, bias, st.spec, st.tau, sample=sample, kl=need_kl, scale=scaling,
                                     dropout_p=dropout if module.training else 0.0)
    st.last_kl = None if kl is None else kl.sum((1, 2))
    return out.transpose(1, 2).contiguous(), w


def convert_dirichlet(model: nn.Module, spec: DirichletSpec = DirichletSpec()) -> nn.Module:
    """Give every attention module of a Hugging Face model (the families of
    :func:`nvformer.convert`) Dirichlet attention weights, in place.

    Registers the attention function with ``transformers.AttentionInterface`` (additive masks)
    and switches the model to it; each attention module gets a ``dirichlet`` submodule holding
    its ``tau`` (trained with the model when ``spec.learn_tau``) and ``last_kl``.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    from .hf.convert import attention_modules

    AttentionInterface.register(HF_NAME, _hf_attention)
    AttentionMaskInterface.register(HF_NAME, eager_mask)
    mods = attention_modules(model)
    if not mods:
        raise ValueError("convert_dirichlet: no supported attention module found")
    device = next(model.parameters()).device
    for _, module, _, _ in mods:
        module.dirichlet = _Tau(spec).to(device)
    model.set_attn_implementation(HF_NAME)
    return model

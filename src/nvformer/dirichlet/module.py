"""Dirichlet attention as a module: ``DirichletAttention`` (an ``nn.MultiheadAttention`` drop-in)
and the per-module state (learnable ``tau``, prediction mode, last KL) it shares with the Hugging
Face interface (docs/MATH.md section 5; the maths is :mod:`nvformer.dirichlet.functional`).
"""

from __future__ import annotations

import math
from dataclasses import asdict

import torch
from torch import Tensor, nn

from ..core.checks import at_least_float32, check_dropout, check_float, check_heads, check_tensor
from ..core.masks import additive_mask, mha_masks
from .functional import DirichletSpec, dirichlet_attention, working_dtype

__all__ = ["DirichletAttention", "DirichletState", "dirichlet_kl_total", "set_eval_kl", "variational_parameters"]

class DirichletState(nn.Module):
    """The state of one Dirichlet attention module: the (learnable) concentration scale ``tau``,
    kept positive via its log; the prediction mode (``"mean"`` / ``"sample"``,
    :func:`nvformer.set_prediction`); whether evaluation forwards compute the KL; the last KL."""

    def __init__(self, spec: DirichletSpec) -> None:
        super().__init__()
        self.spec = spec
        self.prediction = spec.prediction
        self.log_tau = nn.Parameter(torch.tensor(math.log(spec.tau)), requires_grad=spec.learn_tau)
        self.last_kl: Tensor | None = None
        self.eval_kl = False  # evaluation-mode forwards compute the KL too (set_eval_kl)

    def _apply(self, fn, recurse: bool = True):
        """``.to()`` / ``.half()`` / ``.cuda()``: ``log_tau`` follows devices and any widening, but
        stays at least float32 (a 16-bit ``tau`` would change the model between conversion orders
        and could hardly be trained)."""
        return super()._apply(at_least_float32(fn), recurse)

    @property
    def tau(self) -> Tensor:
        return self.log_tau.exp()

    def modes(self, training: bool) -> tuple[bool, bool]:
        """``(sample, kl)`` for a forward of the owning module: training always samples and computes
        the KL; evaluation samples for ``prediction="sample"`` and computes the KL after :func:`set_eval_kl`."""
        return training or self.prediction == "sample", training or self.eval_kl

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in {**asdict(self.spec), "prediction": self.prediction}.items())


class DirichletAttention(nn.Module):
    """Drop-in for ``nn.MultiheadAttention`` (``batch_first=True``) with Dirichlet attention weights.

    Training: sampled weights; evaluation: ``spec.prediction`` (``"mean"`` or ``"sample"``; change it
    with :func:`nvformer.set_prediction`). Masks as ``nn.MultiheadAttention`` (:mod:`nvformer.core.masks`).
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
        where = "DirichletAttention"
        check_heads(embed_dim, num_heads, where)
        dropout = check_dropout(dropout, where)
        if not isinstance(spec, DirichletSpec):
            raise ValueError(f"{where}: `spec` must be a DirichletSpec, got {type(spec).__name__}")
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(embed_dim, embed_dim, bias=bias, **kw) for _ in range(4))
        self.dirichlet = DirichletState(spec).to(**{k: v for k, v in kw.items() if v is not None and k == "device"})

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
        where = "DirichletAttention.forward"
        E = self.embed_dim
        check_tensor(query, "query", 3, where, f"[B, Nq, {E}]")
        check_float(query, "query", where)
        B, Nq = query.shape[:2]
        check_tensor(key, "key", 3, where, f"[{B}, Nk, {E}]")
        if query.shape[-1] != E or key.shape[0] != B or key.shape[-1] != E or not isinstance(value, Tensor) or value.shape != key.shape:
            raise ValueError(f"{where}: need `query` [B, Nq, {E}] and `key`, `value` [B, Nk, {E}] of the same batch, got "
                             f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(getattr(value, 'shape', ()))}")
        Nk, H = key.shape[1], self.num_heads

        def heads(x: Tensor, n: int) -> Tensor:
            return x.view(B, n, H, E // H).transpose(1, 2)

        q, k, v = heads(self.q_proj(query), Nq), heads(self.k_proj(key), Nk), heads(self.v_proj(value), Nk)
        st = self.dirichlet
        sample, need_kl = st.modes(self.training)
        cd = working_dtype(query.dtype, sample=sample, kl=need_kl)
        kpm, extra = mha_masks(B, H, Nq, Nk, key_padding_mask, attn_mask, is_causal, cd, query.device, where)
        bias = extra
        if kpm is not None:
            hide = additive_mask(kpm, cd)[:, None, None, :]
            bias = hide if bias is None else bias + hide
        out, w, kl = dirichlet_attention(q, k, v, bias, st.spec, st.tau, sample=sample, kl=need_kl,
                                         dropout_p=self.dropout if self.training else 0.0)
        if kl is not None and kpm is not None and Nq == Nk:
            kl = kl.masked_fill(kpm[:, None, :], 0.0)
        st.last_kl = None if kl is None else kl.sum((1, 2))
        out = self.out_proj(out.transpose(1, 2).reshape(B, Nq, E))
        if not need_weights:
            return out, None
        return out, w.mean(1) if average_attn_weights else w


def dirichlet_kl_total(model: nn.Module) -> Tensor:
    """``[B]`` summed KL of every Dirichlet attention module's last forward."""
    kls = [m.last_kl for m in model.modules() if isinstance(m, DirichletState) and m.last_kl is not None]
    if not kls:
        raise RuntimeError("dirichlet_kl_total: no Dirichlet attention module has a KL from its last forward (none ran in training "
                           "mode; evaluation forwards compute it only after set_eval_kl(model))")
    return torch.stack(kls).sum(0)


def _dirichlet_states(model: nn.Module, who: str) -> list[DirichletState]:
    found = [m for m in model.modules() if isinstance(m, DirichletState)]
    if not found:
        raise ValueError(f"{who}: the model has no Dirichlet attention module")
    return found


def set_eval_kl(model: nn.Module, on: bool = True) -> None:
    """Make evaluation-mode forwards of every Dirichlet attention module of ``model`` compute the
    KL term (``last_kl``), e.g. for a validation ELBO; off by default, since predictions do not
    need it and the posterior-mean path is then much cheaper."""
    for m in _dirichlet_states(model, "set_eval_kl"):
        m.eval_kl = bool(on)


def variational_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every variational parameter of ``model``'s Dirichlet attention: the
    parameters of each :class:`DirichletState` (today its ``log_tau``), in ``named_parameters``
    order; empty for a model without Dirichlet attention. An optimiser can give them a parameter
    group of their own (they parameterise the attention posterior, not the network)."""
    ids = {id(p) for m in model.modules() if isinstance(m, DirichletState) for p in m.parameters()}
    return [(name, p) for name, p in model.named_parameters() if id(p) in ids]

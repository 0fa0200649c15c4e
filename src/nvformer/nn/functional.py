"""Denoising attention as a function (docs/MATH.md section 3): the reference path, and the
dispatch to the fast path of :mod:`nvformer.nn.sdpa`, which sits below this function.

Masks follow :mod:`nvformer.core.masks` (bool True = not allowed, float = additive).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.checks import check_choice, check_float, check_real, check_tensor, compute_dtype
from ..core.keyform import shift_rows, weighted_sq_sum
from ..core.latent import NVLatent
from ..core.masks import additive_mask, latent_columns_mask, safe_softmax
from .sdpa import fast_applicable, fast_denoising_attention

__all__ = ["FORMULAS", "denoising_attention", "heads"]

FORMULAS = ("paper", "exact")


def heads(t: Tensor, num_heads: int) -> Tensor:
    """``[B, L, H*d] -> [B, H, L, d]``."""
    B, L, E = t.shape
    return t.view(B, L, num_heads, E // num_heads).transpose(1, 2)


def denoising_attention(
    query: Tensor,
    latent: NVLatent,
    k_weight: Tensor,
    k_bias: Tensor | None,
    v_weight: Tensor,
    v_bias: Tensor | None,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    formula: str = "paper",
    form: str | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    need_weights: bool = True,
    impl: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Denoising attention of queries over an NV latent: the reference (slow, obvious) path.

    Training form (``latent.sampled``), per head:
    ``s_i = scale q.k_i + log pi_i - scale ||z_i||^2 / 2`` with ``k_i = W_k z_i + b_k``, and
    ``out = sum_i softmax(s)_i (W_v z_i + b_v)``.

    Evaluation form (Gaussian integrated out), with ``u = W_k,h^T q`` (``[P]`` per head),
    ``sigma2 = 1/scale`` (``sqrt(d)``), ``S_i = var_i + sigma2``:
    ``s_i = u.(mu_i/S_i) + log pi_i - 1/2 sum(mu_i^2/S_i) - 1/2 sum(log S_i) [- 1/2 sum(u^2/S_i)]``
    (the bracket only for ``formula="exact"``), and
    ``out = W_v,h sum_i softmax(s)_i ((var_i/S_i) u + (sigma2/S_i) mu_i) + b_v,h``.

    Args:
        query: ``[B, H, Nt, d]`` projected queries ``W_q x + b_q`` (not scaled).
        latent: :class:`NVLatent`; ``z`` ``[B, K, P]``, ``log_pi`` ``[B, K]``.
        k_weight, v_weight: ``[H*d, P]`` key / value projections (``nn.Linear`` convention).
        k_bias, v_bias: ``[H*d]`` or None.
        attn_mask: broadcastable to ``[B, H, Nt, K]`` over latent columns; bool (True = masked
            out) or float (additive). Latent padding is applied on top.
        is_causal: self-attention over the latent of the queries' own sequence: query ``t``
            sees token components ``1..t+1`` (all copies) and the prior column, which is always
            visible. Needs ``K = (Nt + 1) * latent.copies``.
        formula: ``"paper"`` (default; the publications) or ``"exact"`` (the true posterior);
            evaluation form only.
        form: ``"train"`` or ``"eval"``; default ``"train"`` if ``latent.sampled`` else ``"eval"``.
        dropout_p: dropout on the attention weights (apply only in training).
        scale: logit scale; default ``1/sqrt(d)``.
        need_weights: return the attention weights (forces the reference path).
        impl: ``"auto"`` (the fast path of :mod:`nvformer.nn.sdpa` whenever it applies: weights not
            needed and the prior column visible in every row), ``"fast"`` (error if it does not
            apply) or ``"reference"`` (this function's own, obviously correct computation).

    Returns:
        ``(out [B, H, Nt, d], weights [B, H, Nt, K] or None)``; rows with nothing visible get
        zeros. Computed in at least float32, returned in ``query``'s dtype.
    """
    where = "denoising_attention"
    check_tensor(query, "query", 4, where, "[B, H, Nt, d]")
    check_float(query, "query", where)
    if not isinstance(latent, NVLatent):
        raise ValueError(f"{where}: `latent` must be an NVLatent (the output of an NVIB layer), got {type(latent).__name__}")
    check_choice(formula, "formula", where, FORMULAS)
    if form is None:
        form = "train" if latent.sampled else "eval"
    check_choice(form, "form", where, ("train", "eval"))
    if form == "eval" and latent.copies != 1:
        raise ValueError(f"{where}: the evaluation form needs an unsampled latent (copies=1), got copies={latent.copies}")
    B, H, Nt, d = query.shape
    P = latent.z.shape[-1]
    for name, t, shape in (("k_weight", k_weight, (H * d, P)), ("v_weight", v_weight, (H * d, P)), ("k_bias", k_bias, (H * d,)),
                           ("v_bias", v_bias, (H * d,))):
        if (t is not None or name.endswith("weight")) and (not isinstance(t, Tensor) or tuple(t.shape) != shape):
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{where}: `{name}` must have shape {list(shape)}{' or be None' if name.endswith('bias') else ''}, got {got}")
    if latent.z.shape[0] != B:
        raise ValueError(f"{where}: `latent` has batch {latent.z.shape[0]} but `query` has batch {B}")
    scale = 1.0 / math.sqrt(d) if scale is None else check_real(scale, "scale", where, above=0.0)
    dropout_p = check_real(dropout_p, "dropout_p", where, minimum=0.0, maximum=1.0)
    check_choice(impl, "impl", where, ("auto", "fast", "reference"))
    if impl != "reference":
        if fast_applicable(latent, attn_mask, need_weights, form, dropout_p):
            out = fast_denoising_attention(query, latent, k_weight, k_bias, v_weight, v_bias, attn_mask=attn_mask, is_causal=is_causal,
                                           formula=formula, form=form, dropout_p=dropout_p, scale=scale)
            return out, None
        if impl == "fast":
            raise ValueError(f"{where}: impl='fast' does not apply (weights requested, a row without the prior column, or eval-form dropout)")
    cd = compute_dtype(query.dtype)
    q = query.to(cd)
    Wk, Wv = k_weight.to(cd), v_weight.to(cd)
    bk = k_bias.to(cd) if k_bias is not None else None
    bv = v_bias.to(cd) if v_bias is not None else None

    if form == "train":
        z = latent.z.to(cd)
        k = heads(F.linear(z, Wk, bk), H)  # [B, H, K, d]
        v = heads(F.linear(z, Wv, bv), H)
        per_key = latent.log_pi.double() - weighted_sq_sum(z, 0.5 * scale)  # [B, K]
        logits = scale * (q @ k.transpose(-1, -2)) + shift_rows(per_key, None, cd)[:, None, None, :]
    else:
        mu = latent.mu.to(cd)  # [B, K, P]
        sigma2 = 1.0 / scale
        S = latent.logvar.to(cd).exp() + sigma2  # [B, K, P]
        u = q @ Wk.view(H, d, P)[None]  # [B, H, Nt, P]
        S64 = latent.logvar.double().exp() + sigma2
        per_key = latent.log_pi.double() - weighted_sq_sum(mu, 0.5 / S) - 0.5 * S64.log().sum(-1)
        logits = u @ (mu / S)[:, None].transpose(-1, -2) + shift_rows(per_key, None, cd)[:, None, None, :]
        if formula == "exact":
            logits = logits - 0.5 * (u.pow(2) @ (1.0 / S)[:, None].transpose(-1, -2))

    logits = logits.masked_fill(latent.sample_pad_mask[:, None, None, :], float("-inf"))
    extra = additive_mask(attn_mask, cd)
    if extra is not None:
        logits = logits + extra
    if is_causal:
        if logits.shape[-1] != (Nt + 1) * latent.copies:
            raise ValueError(f"{where}: `is_causal` needs a latent of the queries' sequence ({Nt} + 1 components), got {logits.shape[-1] // latent.copies}")
        future = torch.ones(Nt, Nt, dtype=torch.bool, device=logits.device).triu(1)
        logits = logits + latent_columns_mask(additive_mask(future, cd), latent.copies)
    weights = safe_softmax(logits, dim=-1)
    w = F.dropout(weights, p=dropout_p) if dropout_p > 0 else weights

    if form == "train":
        out = w @ v
    else:
        var_over_S = (S - sigma2) / S  # [B, K, P]
        zbar = u * (w @ var_over_S[:, None]) + w @ (sigma2 * mu / S)[:, None]  # [B, H, Nt, P]
        out = zbar @ Wv.view(H, d, P).transpose(-1, -2)[None]  # [B, H, Nt, d]
        if bv is not None:
            out = out + w.sum(-1, keepdim=True) * bv.view(1, H, 1, d)
    return out.to(query.dtype), weights.to(query.dtype)

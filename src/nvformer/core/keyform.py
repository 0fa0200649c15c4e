"""Denoising attention in key/value-cache form (docs/MATH.md section 3; its use in KV caches: docs/DESIGN.md, "Hugging Face").

Both forms of denoising attention can be written with one vector ``m_i`` (``[P]``) and one
scalar ``b_i`` per latent component, which is what a KV cache can hold:

* training (``z`` sampled): ``m_i = z_i``, ``b_i = log g_i - scale/2 ||z_i||^2``;
* evaluation: ``m_i = sigma2 mu_i / S_i`` (``sigma2 = 1/scale``, ``S_i = var_i + sigma2``),
  ``b_i = log a_i - 1/2 sum_p mu_ip^2 / S_ip - 1/2 sum_p log S_ip``.

Keys are ``k_i = W_k m_i + b_k`` and values ``v_i = W_v m_i + b_v``; the logits are
``scale q.k_i + b_i``. ``b_i`` uses the unnormalised weights (``log g`` or ``log a``): the
normaliser is the same for every column of a softmax, so cached columns stay valid as the
sequence grows. The evaluation form adds, per head, the value interpolation
``W_v,h sum_i w_i (r_i * u_i)`` with ``r_i = var_i / S_i`` and ``u_i = W_k,h^T q`` (rotated
queries under RoPE); when all token components share one variance (always so after the
identity initialisation) this is ``M_tok (sum_i w_i R_i^T) q + w_0 M_0 q`` with per-head
``d x d`` matrices ``M = W_v,h diag(r) W_k,h^T``. The ``"exact"`` formula's extra term
``-1/2 sum_p u_p^2 / S_ip`` is then constant over token columns and moves to the prior column
as ``-1/2 q^T G q`` with ``G = W_k,h diag(1/S_0 - 1/S_tok) W_k,h^T``.

Everything here is pure tensor maths, tested against :func:`nvformer.denoising_attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import safe_softmax

__all__ = [
    "weighted_sq_sum",
    "shift_rows",
    "key_terms",
    "shared_key_terms",
    "head_key_terms",
    "head_matrices",
    "scale_heads",
    "input_key_terms",
    "max_norm",
    "prior_weight_underflows",
    "attend",
]


def weighted_sq_sum(v: Tensor, w: Tensor | float) -> Tensor:
    """``sum_p v_p^2 w_p`` over the last dim, products in ``v``'s dtype, accumulated in float64.

    Every place that computes such a quadratic term (the NVIB's ``log a``, the per-key logit
    terms of both attention paths) uses this one function, so that at the identity
    initialisation ``log a_i`` and ``-1/2 sum mu^2 / S`` cancel exactly, with float32 memory.
    """
    return (v * v * w).sum(-1, dtype=torch.float64)


def shift_rows(b: Tensor, exclude: Tensor | None, dtype: torch.dtype, fill: float = float("-inf")) -> Tensor:
    """Per-key logit terms ``[B, K]`` (float64) minus their row maximum over included keys, cast.

    The terms are large (``-1/2 sum_p log S_ip`` alone is ~ -600 at width 576) and cancel
    between ``log a`` and the norm of the mean; a per-row shift leaves the softmax unchanged and
    keeps float32 logits accurate to ~1e-7 instead of ~1e-4. Excluded (or non-finite) keys get
    ``fill``.
    """
    keep = torch.isfinite(b) if exclude is None else torch.isfinite(b) & ~exclude
    row_max = b.masked_fill(~keep, float("-inf")).amax(-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    return (b - row_max).masked_fill(~keep, fill).to(dtype)


def key_terms(
    mu: Tensor, logvar: Tensor, log_w: Tensor, z: Tensor | None, scale: float, shift: Tensor | float = 0.0, ref_log_s: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-component ``m [B, C, P]`` and ``b [B, C]`` (float64) of the module docstring.

    Args:
        mu, logvar: ``[B, C, P]``.
        log_w: ``[B, C]`` unnormalised log weights (``-inf`` = excluded).
        z: ``[B, C, P]`` samples for the training form, or None for the evaluation form.
        scale: attention logit scale.
        shift: subtracted from ``b`` (a constant over columns: softmax-invariant), so that the
            float32 logits stay accurate; e.g. the layer's ``alpha_tau * s_alpha``.
        ref_log_s: ``[P]`` ``log S`` of a reference component; ``-1/2 sum_p (log S_ip - ref)`` is
            used instead of ``-1/2 sum_p log S_ip`` (another softmax-invariant constant).
    """
    cd = torch.promote_types(mu.dtype, torch.float32)
    if z is not None:
        z = z.to(cd)
        b = log_w.double() - shift - weighted_sq_sum(z, 0.5 * scale)
        return z, b
    sigma2 = 1.0 / scale
    mu = mu.to(cd)
    S = logvar.to(cd).exp() + sigma2
    log_s = logvar.double().exp().add(sigma2).log()
    if ref_log_s is not None:
        log_s = log_s - ref_log_s.double()
    b = log_w.double() - shift - weighted_sq_sum(mu, 0.5 / S) - 0.5 * log_s.sum(-1)
    m = mu * (sigma2 / S)
    return m, b


def shared_key_terms(
    mu: Tensor, log_w: Tensor, tok_logvar: Tensor, prior_logvar: Tensor, scale: float, shift: Tensor | float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Evaluation-form :func:`key_terms` when all token components share one variance.

    Column 0 is the prior component (variance ``exp(prior_logvar)``), columns ``1..`` tokens
    (``exp(tok_logvar)``); only ``[P]`` vectors are exponentiated, never ``[B, C, P]`` tensors.

    Returns:
        ``(m, m0, b)``: ``m [B, C, P]`` is right for the token columns (it may be ``mu`` itself,
        do not modify it in place), ``m0 [B, 1, P]`` is the prior column's, ``b [B, C]`` float64
        with ``-1/2 sum_p log S_tok`` taken as the reference (a constant shift).
    """
    cd = torch.promote_types(mu.dtype, torch.float32)
    mu = mu.to(cd)
    sigma2 = 1.0 / scale
    S_tok = tok_logvar.double().exp() + sigma2
    S0 = prior_logvar.double().exp() + sigma2
    sq = weighted_sq_sum(mu, (0.5 / S_tok).to(cd))
    sq[:, 0] = weighted_sq_sum(mu[:, 0], (0.5 / S0).to(cd)) + 0.5 * (S0.log() - S_tok.log()).sum()
    b = log_w.double() - shift - sq
    f_tok = sigma2 / S_tok
    m = mu if bool((f_tok == 1.0).all()) else mu * f_tok.to(cd)
    return m, mu[:, :1] * (sigma2 / S0).to(cd), b


def head_key_terms(
    mu: Tensor, log_w: Tensor, head_logvar: Tensor, prior_logvar: Tensor, scale: float, shift: Tensor | float, head_shift: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Evaluation-form terms with per-head token variances and pseudo-count shifts (per-head knobs).

    Head ``h`` sees every token component with variance ``exp(head_logvar[h])`` and log pseudo-count
    ``log_w + head_shift[h]``; the prior component (column 0) is the same for every head. The token
    columns' ``m_h = mu * f_h`` is not formed: keys are ``(W_k,h diag(f_h)) mu`` (:func:`scale_heads`).

    Args:
        mu: ``[B, C, P]``; log_w: ``[B, C]``; head_logvar: ``[H, P]``; prior_logvar: ``[P]``;
        shift: a constant subtracted from every column; head_shift: ``[H]`` added to token columns.

    Returns:
        ``(f [H, P], m0 [B, 1, P], b [B, H, C])``: ``f_h = sigma2 / S_h`` (float64), the prior column's
        ``m``, and ``b`` (float64) with ``-1/2 sum_p log S_h`` as each head's reference (a constant shift per row).
    """
    cd = torch.promote_types(mu.dtype, torch.float32)
    mu = mu.to(cd)
    sigma2 = 1.0 / scale
    S_h = head_logvar.double().exp() + sigma2
    S0 = prior_logvar.double().exp() + sigma2
    sq = torch.einsum("bcp,hp->bhc", (mu * mu).double(), 0.5 / S_h)
    sq0 = weighted_sq_sum(mu[:, 0], (0.5 / S0).to(cd))[:, None] + 0.5 * (S0.log()[None, :] - S_h.log()).sum(-1)[None, :]
    b = log_w.double()[:, None, :] - shift + head_shift.double()[None, :, None] - sq
    b0 = log_w.double()[:, :1] - shift - sq0
    b = torch.cat([b0[:, :, None], b[:, :, 1:]], dim=-1)
    return sigma2 / S_h, mu[:, :1] * (sigma2 / S0).to(cd), b


def scale_heads(w: Tensor, f: Tensor) -> Tensor:
    """``[H*d, P]`` weights whose head ``h`` block has its input columns scaled by ``f[h]`` (``[H, P]``)."""
    H = f.shape[0]
    return (w.reshape(H, -1, w.shape[-1]) * f[:, None, :].to(w.dtype)).reshape(w.shape)


def head_matrices(w_k: Tensor, w_v: Tensor | None, diag: Tensor, head_dim: int) -> Tensor:
    """Per-head ``A diag(r) W_k,h^T``: ``[H, d, d]`` with ``A = W_v,h`` (or ``W_k,h`` if ``w_v`` is None).

    ``w_k``, ``w_v``: ``[H*d, P]``; ``diag``: ``[P]``, or ``[H, P]`` (a diagonal per head).
    """
    H = w_k.shape[0] // head_dim
    wk = w_k.reshape(H, head_dim, -1)
    left = wk if w_v is None else w_v.reshape(H, head_dim, -1)
    r = diag.to(left.dtype)
    return (left * (r[:, None, :] if r.dim() == 2 else r)) @ wk.transpose(1, 2)


def input_key_terms(
    c: float, mu_bias: Tensor, logvar_bias: Tensor, alpha_lin: Tensor, alpha_quad: Tensor, sigma2: float, min_var: float, cd: torch.dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor, float]:
    """The evaluation-form key terms of an NVIB in the identity initialisation's structure, as functions of
    its input ``x`` (no latent formed).

    With means ``mu = c x + b_mu``, one shared token variance ``S = exp(logvar_bias) + sigma2`` (floored like
    the NVIB's) and ``f = sigma2 / S``: ``m = f mu = (c f) x + f b_mu``, so keys are ``(W diag(c f)) x +
    (W (f b_mu) + b)``; and ``log a - shift - 1/2 sum mu^2 / S = sum_p x_p^2 A_p + sum_p x_p L_p + const`` with
    ``A = w_quad - c^2 / (2S)``, ``L = w_lin - c b_mu / S``, ``const = -1/2 sum b_mu^2 / S`` (``shift`` is the
    pseudo-count bias, which cancels). ``A`` takes ``1/(2S)`` rounded to ``cd``, as the two sums of
    :func:`shared_key_terms` do, so at the identity it is exactly 0.

    Returns ``(c f, f b_mu, A, L, const)``: float64 ``[P]`` vectors and a float.
    """
    S = logvar_bias.double().clamp_min(torch.log(torch.tensor(min_var, dtype=torch.float64)).item()).exp() + sigma2
    f, b_mu = sigma2 / S, mu_bias.double()
    A = alpha_quad.double() - c * c * (0.5 / S).to(cd).double()
    L = alpha_lin.double() - c * b_mu / S
    return c * f, f * b_mu, A, L, float(-(0.5 * b_mu * b_mu / S).sum())


def max_norm(x: Tensor) -> float:
    """The largest Euclidean norm over the last dimension of ``x [..., d]`` (0 when ``x`` is empty). The rows are
    read in memory order: a transposed view (a projection's ``[B, N, H, d]`` output as ``[B, H, N, d]``) is
    reduced as the contiguous ``[B N H, d]`` it is, which is faster than following the view's strides."""
    if not x.numel():
        return 0.0
    x = x.detach()
    if x.dim() > 2 and x.stride(-1) == 1 and not x.is_contiguous():
        lead = sorted(range(x.dim() - 1), key=lambda i: -x.stride(i))
        y = x.permute(*lead, x.dim() - 1)
        if y.is_contiguous():
            x = y.view(-1, x.shape[-1])
    return float(x.norm(dim=-1).amax())


def prior_weight_underflows(q: Tensor, keys: Tensor | float, prior: tuple[float, float], const: float, scale: float) -> bool:
    """Whether the prior column's attention weight is exactly 0 in ``q``'s dtype for every query, when every
    token's per-key term is ``const`` and every query sees a token.

    Its logit is below each visible token's by at least ``-(scale q.(k_0 - k_i) + b_0 - const) >=
    -(scale |q| (|k_0| + |k_i|) + b_0 - const)`` (Cauchy-Schwarz); when that exceeds minus the logarithm of the
    dtype's smallest positive number, its ``exp`` is 0 in the softmax whatever the row's maximum (at the
    identity ``b_0 - const`` is about ``-alpha_tau s_alpha``).

    Args:
        q: ``[B, H, Nt, d]``; keys: ``[B, H, N, d]``, or the largest key norm (any upper bound of it, as a
        decoding step keeps it with its KV cache); prior: ``(b_0, |k_0|)``, the largest over heads;
        const: the tokens' per-key term; scale: the logit scale.
    """
    fi = torch.finfo(q.dtype)
    floor = math.log(fi.smallest_normal * fi.eps) - 5.0  # below the smallest subnormal's logarithm
    b0, k0_norm = prior
    if b0 - const >= floor:
        return False
    k_norm = keys if isinstance(keys, float) else max_norm(keys.to(q.dtype))
    reach = scale * max_norm(q) * (k0_norm + k_norm)
    return b0 - const + reach < floor


def attend(
    q: Tensor,
    keys: Tensor,
    b: Tensor,
    values: Tensor,
    *,
    scale: float,
    bias: Tensor | None = None,
    prior_logit: Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Softmax attention with per-key scalars: ``softmax(scale q.k + b + bias) @ values``.

    Args:
        q: ``[B, H, Nt, d]``; keys ``[B, H, K, d]``; b ``[B, H|1, K]``; values ``[B, H, K, c]``.
        bias: additive, broadcastable to ``[B, H, Nt, K]`` (``-inf`` = masked).
        prior_logit: ``[B, H, Nt]`` added to column 0 (the prior component).
        dropout_p: dropout on the weights.

    Returns:
        ``(out [B, H, Nt, c], weights [B, H, Nt, K])``; rows with nothing visible give zeros.
    """
    logits = scale * (q @ keys.transpose(-1, -2)) + b.unsqueeze(-2)
    if bias is not None:
        logits = logits + bias
    if prior_logit is not None:
        logits = torch.cat([logits[..., :1] + prior_logit.unsqueeze(-1), logits[..., 1:]], dim=-1)
    w = safe_softmax(logits, dim=-1)
    wd = F.dropout(w, p=dropout_p) if dropout_p > 0 else w
    return wd @ values, w

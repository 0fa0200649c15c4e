"""Fast denoising attention: one ``scaled_dot_product_attention`` (SDPA) call per form.

Tested against the reference path (:func:`nvformer.nn.functional.denoising_attention` with
``impl="reference"``). The tricks, all exact (docs/MATH.md section 3):

* **Per-key scalars as a channel.** The logit term ``b_i`` of key ``i`` (``log pi_i - scale/2
  ||z_i||^2`` in training; ``log a_i - 1/2 sum mu^2/S - 1/2 sum log S`` in evaluation) rides as one
  extra key channel, with the constant ``1/scale`` as the matching query channel:
  ``scale * [q, 1/scale] . [k_i, b_i] = scale q.k_i + b_i``. Padding is ``b_i = -1e30``: no mask.
* **Causal with an always-visible prior column.** Keys are ``[prior, token_1..token_N]``; a dummy
  query row is prepended so that SDPA's own ``is_causal`` (query ``r`` sees keys ``0..r``) gives
  token query ``t`` exactly the prior and tokens ``1..t+1``. No mask is materialised.
* **Evaluation form, shared token variance** (always so after the identity initialisation):
  keys and values are projections of ``m_i = sigma2 mu_i / S_i``; the value interpolation is
  ``M_tok (1 - w_0) q + M_0 w_0 q`` with per-head ``d x d`` matrices ``M = W_v,h diag(r) W_k,h^T``
  and the prior weight ``w_0`` read from one extra value channel (1 on the prior column). The
  ``"exact"`` term ``-1/2 q^T G q`` is a query channel against a key channel that is 1 on the
  prior column only.
* **Evaluation form, per-token variances** (a trained logvar projection): the interpolation needs
  ``sum_i w_i r_i`` in ``P`` dimensions, carried as ``P`` extra value channels, and the ``"exact"``
  term ``-1/2 (u*u).(1/S_i)`` as ``P`` extra query/key channels: about ``H`` times the work of
  standard attention, which is what the maths asks for, still without materialising weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.checks import compute_dtype
from ..core.keyform import head_matrices, key_terms, shared_key_terms, shift_rows, weighted_sq_sum
from ..core.latent import NVLatent
from ..core.masks import additive_mask, latent_columns_mask

__all__ = ["fast_denoising_attention", "sdpa_nv", "fast_applicable", "EXCLUDED"]

EXCLUDED = -1e30  # per-key logit term of an excluded (padded) key


def fast_applicable(latent: NVLatent, attn_mask: Tensor | None, need_weights: bool, form: str, dropout_p: float = 0.0) -> bool:
    """Whether :func:`fast_denoising_attention` can serve this call (else use the reference)."""
    if need_weights or (form == "eval" and dropout_p > 0):
        return False
    if latent.copies != 1 and form == "eval":
        return False
    if latent.z.device.type == "meta":
        return False
    # the prior column must be visible in every row: no fully masked rows, no NaN handling needed
    if bool(latent.pad_mask[:, 0].any()):
        return False
    if attn_mask is not None:
        first = attn_mask[..., : latent.copies]
        blocked = first if first.dtype == torch.bool else torch.isneginf(first)
        if bool(blocked.any()):
            return False
    return True


def sdpa_nv(
    q: Tensor,
    keys: Tensor,
    b: Tensor,
    values: Tensor,
    *,
    scale: float,
    attn_mask: Tensor | None = None,
    causal_prior_first: bool = False,
    q_extra: Tensor | None = None,
    k_extra: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """``softmax(scale q.k + b [+ q_extra.k_extra] + mask) @ values`` in one SDPA call.

    Args:
        q: ``[B, H, Nt, d]``; keys ``[B, H, K, d]``; b ``[B, H|1, K]`` (``EXCLUDED`` = masked);
            values ``[B, H, K, c]``.
        attn_mask: additive float or bool (True = attend, SDPA's convention) over ``[.., Nt, K]``.
        causal_prior_first: column 0 is the prior, columns ``1..Nt`` the queries' own tokens; query
            ``t`` sees columns ``0..t+1``.
        q_extra, k_extra: ``[B, H, Nt, e]`` and ``[B, H, K, e]``; their dot product is added to the
            logits (unscaled).
    """
    B, H, Nt, d = q.shape
    K = keys.shape[2]
    if causal_prior_first and (K != Nt + 1 or attn_mask is not None):
        raise ValueError("sdpa_nv: causal_prior_first needs K = Nt + 1 and no attn_mask")
    e = 0 if q_extra is None else q_extra.shape[-1]
    c_v = values.shape[-1]
    # widths that are multiples of 8 (an odd head size such as d + 1 runs SDPA's kernels up to twice as slowly),
    # one width for queries, keys and values when they are close (CPU flash attention needs it); zero channels
    # change nothing. Far apart widths (per-token variance channels) stay apart: padding q and k would cost more
    W_qk, W_v = padded_width(d + 1 + e), padded_width(c_v)
    if abs(W_qk - W_v) <= 16:
        W_qk = W_v = max(W_qk, W_v)
    q_ext = q.new_zeros(B, H, Nt, W_qk)
    q_ext[..., :d] = q
    q_ext[..., d] = 1.0 / scale
    k_ext = keys.new_zeros(B, H, K, W_qk)
    k_ext[..., :d] = keys
    k_ext[..., d] = b.to(keys.dtype).expand(B, H, K)
    if e:
        q_ext[..., d + 1 : d + 1 + e] = q_extra / scale
        k_ext[..., d + 1 : d + 1 + e] = k_extra
    if c_v < W_v:
        v_ext = values.new_zeros(B, H, K, W_v)
        v_ext[..., :c_v] = values
        values = v_ext
    return _sdpa(q_ext, k_ext, values, scale=scale, mask=attn_mask, causal_trick=causal_prior_first, dropout_p=dropout_p)[..., :c_v]


def padded_width(n: int) -> int:
    """``n`` rounded up to a multiple of 8: the head size SDPA is given for ``n`` channels."""
    return -(-n // 8) * 8


def _heads(t: Tensor, H: int) -> Tensor:
    B, L, E = t.shape
    return t.view(B, L, H, E // H).transpose(1, 2)


def _aug_linear(m: Tensor, weight: Tensor, bias: Tensor | None, H: int, extra: int) -> Tensor:
    """``F.linear(m, W, b)`` with ``extra`` zero output channels appended per head: ``[B, C, H, d + extra]``.

    Extra channels (per-key logit terms, indicators) are then written in place, so no
    concatenated copy of the keys or values is ever made.
    """
    B, C, P = m.shape
    d = weight.shape[0] // H
    wa = weight.new_zeros(H, d + extra, P)
    wa[:, :d] = weight.view(H, d, P)
    ba = weight.new_zeros(H, d + extra)
    if bias is not None:
        ba[:, :d] = bias.view(H, d)
    return F.linear(m, wa.view(-1, P), ba.view(-1)).view(B, C, H, d + extra)


def _sdpa(q_ext: Tensor, k_ext: Tensor, v_ext: Tensor, *, scale: float, mask: Tensor | None, causal_trick: bool, dropout_p: float) -> Tensor:
    if causal_trick:
        B, H, _, c = q_ext.shape
        q_ext = torch.cat([q_ext.new_zeros(B, H, 1, c), q_ext], dim=2)
        return F.scaled_dot_product_attention(q_ext, k_ext, v_ext, dropout_p=dropout_p, is_causal=True, scale=scale)[:, :, 1:]
    return F.scaled_dot_product_attention(q_ext, k_ext, v_ext, attn_mask=mask, dropout_p=dropout_p, scale=scale)


def fast_denoising_attention(
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
    form: str = "eval",
    dropout_p: float = 0.0,
    scale: float,
) -> Tensor:
    """The fast path of :func:`nvformer.denoising_attention` (same arguments; returns ``out`` only).

    ``attn_mask`` is a bool (True = masked) or additive float mask over latent columns, or None.
    Check :func:`fast_applicable` first.
    """
    B, H, Nt, d = query.shape
    cd = compute_dtype(query.dtype)
    q = query.to(cd)
    pad = latent.sample_pad_mask
    sampled = form == "train"
    Kc = latent.z.shape[1] if sampled else latent.mu.shape[1]
    Wk, Wv = k_weight.to(cd), v_weight.to(cd)
    bk = None if k_bias is None else k_bias.to(cd)
    bv = None if v_bias is None else v_bias.to(cd)
    sigma2 = 1.0 / scale
    shared = (not sampled) and latent.shared_logvar is not None
    exact = formula == "exact" and not sampled

    mask = additive_mask(attn_mask, cd)  # SDPA gets an additive mask
    causal_trick = False
    if is_causal:
        if latent.copies == 1 and mask is None and Kc == Nt + 1:
            causal_trick = True
        else:
            future = latent_columns_mask(additive_mask(torch.ones(Nt, Nt, dtype=torch.bool, device=q.device).triu(1), cd), latent.copies)
            mask = future if mask is None else mask + future

    if sampled or shared:
        if sampled:
            m = latent.z.to(cd)
            b = latent.log_pi.double() - weighted_sq_sum(m, 0.5 * scale)
        else:
            S_tok = latent.shared_logvar.double().exp() + sigma2
            S0 = latent.logvar[0, 0].double().exp() + sigma2  # the prior is component 0 of every row
            m, m0, b = shared_key_terms(latent.mu, latent.log_pi, latent.shared_logvar, latent.logvar[0, 0], scale)
        b = shift_rows(b, pad, cd, EXCLUDED)
        n_k = 2 if exact else 1  # key channels: b (and the prior indicator for "exact")
        n_v = 0 if sampled else 1  # value channel: the prior indicator (its weight w_0)
        width = d + max(n_k, n_v)
        keys = _aug_linear(m, Wk, bk, H, width - d)
        values = _aug_linear(m, Wv, bv, H, width - d)
        if not sampled:
            keys[:, :1] = _aug_linear(m0, Wk, bk, H, width - d)
            values[:, :1] = _aug_linear(m0, Wv, bv, H, width - d)
            values[:, 0, :, d] = 1.0
        keys[..., d] = b[:, :, None]
        q_parts = [q, q.new_full((B, H, Nt, 1), sigma2)]
        if exact:
            keys[:, 0, :, d + 1] = 1.0
            G = head_matrices(k_weight.double(), None, 1.0 / S0 - 1.0 / S_tok, d).to(cd)  # [H, d, d]
            q_parts.append(-0.5 * sigma2 * torch.einsum("bhti,hij,bhtj->bht", q, G, q).unsqueeze(-1))
        if width - d > len(q_parts) - 1:
            q_parts.append(q.new_zeros(B, H, Nt, width - d - (len(q_parts) - 1)))
        out = _sdpa(torch.cat(q_parts, -1), keys.transpose(1, 2), values.transpose(1, 2), scale=scale, mask=mask,
                    causal_trick=causal_trick, dropout_p=dropout_p if sampled else 0.0)
        if sampled:
            return out[..., :d].to(query.dtype)
        ctx, w0 = out[..., :d], out[..., d : d + 1]
        M0 = head_matrices(k_weight.double(), v_weight.double(), (S0 - sigma2) / S0, d).to(cd)
        ctx = ctx + w0 * torch.einsum("hij,bhtj->bhti", M0, q)
        r_tok = (S_tok - sigma2) / S_tok
        if bool((r_tok > 0).any()):
            Mt = head_matrices(k_weight.double(), v_weight.double(), r_tok, d).to(cd)
            ctx = ctx + (1.0 - w0) * torch.einsum("hij,bhtj->bhti", Mt, q)
        return ctx.to(query.dtype)

    # per-token variances: P extra value channels (and P extra q/k channels for "exact")
    m, b = key_terms(latent.mu, latent.logvar, latent.log_pi, None, scale)  # shift_rows removes the large common part
    b = shift_rows(b, pad, cd, EXCLUDED)[:, None, :]
    m = m.to(cd)
    keys = _heads(F.linear(m, Wk, bk), H)
    values = _heads(F.linear(m, Wv, bv), H)
    P = m.shape[-1]
    S = latent.logvar.to(cd).exp() + sigma2  # [B, K, P]
    r = ((S - sigma2) / S)[:, None].expand(B, H, Kc, P)
    u = q @ Wk.view(H, d, P)[None]  # [B, H, Nt, P]
    q_extra = k_extra = None
    if exact:
        q_extra = -0.5 * u * u
        k_extra = (1.0 / S)[:, None].expand(B, H, Kc, P)
    out = sdpa_nv(q, keys, b, torch.cat([values, r], -1), scale=scale, attn_mask=mask,
                  causal_prior_first=causal_trick, q_extra=q_extra, k_extra=k_extra)
    ctx, c = out[..., :d], out[..., d:]
    ctx = ctx + (c * u) @ Wv.view(H, d, P).transpose(-1, -2)[None]
    return ctx.to(query.dtype)

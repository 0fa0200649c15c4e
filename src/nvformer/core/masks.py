"""Every mask convention of nvformer, and softmax over masked entries (docs/MATH.md section 3).

nvformer's own convention (as ``torch.nn.MultiheadAttention``): a bool mask is True where
attention is *not* allowed; a float mask is added to the logits. Hugging Face models hand their
attention modules either a 4D additive float mask (``eager``) or a 4D bool mask with True =
*attend* (``sdpa``), or a 2D padding mask with 1 = attend: :func:`hf_mask_bias` turns any of them
into nvformer's additive form. Latents put the prior component in column 0, which is always
visible: :func:`latent_columns_mask` maps a mask over token columns to latent columns.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_mask

__all__ = [
    "additive_mask",
    "hf_mask_bias",
    "hidden",
    "key_padding_from_bias",
    "latent_columns_mask",
    "masked_log_softmax",
    "mha_masks",
    "nothing_set",
    "safe_softmax",
]


def _fill_value(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min / 2


def hidden(bias: Tensor) -> Tensor:
    """True where the additive mask ``bias`` hides a key: at or below half its dtype's most negative
    number (Hugging Face masks write that number itself)."""
    return bias <= _fill_value(bias.dtype)


def nothing_set(mask: Tensor) -> bool:
    """True when the bool ``mask`` has no True entry (a shortcut's condition); False on the meta
    device, whose tensors have no values (the general path then runs)."""
    return mask.device.type != "meta" and not bool(mask.any())


def masked_log_softmax(x: Tensor, pad_mask: Tensor | None, dim: int = -1) -> Tensor:
    """``log_softmax`` over ``dim`` that ignores entries where ``pad_mask`` is True.

    Masked entries get ``-inf``. A slice with every entry masked gives ``-inf`` everywhere (and
    finite, zero gradients) instead of NaN.

    Args:
        x: ``[..., K]`` logits (``-inf`` allowed).
        pad_mask: broadcastable to ``x``, bool, True = excluded; or None.
    """
    neg_inf = torch.isneginf(x)
    excluded = neg_inf if pad_mask is None else (pad_mask | neg_inf)
    if nothing_set(excluded):  # the same numbers without the two masked passes
        return x - torch.logsumexp(x, dim=dim, keepdim=True)
    safe = x.masked_fill(excluded, _fill_value(x.dtype))
    out = safe - torch.logsumexp(safe, dim=dim, keepdim=True)
    return out.masked_fill(excluded, float("-inf"))


def safe_softmax(logits: Tensor, dim: int = -1) -> Tensor:
    """Softmax where a slice whose logits are all ``-inf`` gives zeros (not NaN).

    ``logits``: any shape, ``-inf`` marks excluded entries.
    """
    excluded = torch.isneginf(logits)
    safe = logits.masked_fill(excluded, _fill_value(logits.dtype))
    w = torch.softmax(safe, dim=dim)
    return w.masked_fill(excluded, 0.0)


def additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """Bool (True = masked out) or float mask -> float additive mask (``-inf`` where masked)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def latent_columns_mask(token_mask: Tensor | None, copies: int) -> Tensor | None:
    """Map an additive mask over token columns ``[..., Nt, N]`` to latent columns ``[..., Nt, (N+1)*copies]``.

    Prepends the prior column (always visible: 0) and repeats each column ``copies`` times.
    """
    if token_mask is None:
        return None
    prior_col = torch.zeros(token_mask.shape[:-1] + (1,), dtype=token_mask.dtype, device=token_mask.device)
    m = torch.cat([prior_col, token_mask], dim=-1)
    return m.repeat_interleave(copies, dim=-1) if copies > 1 else m


def mha_masks(B: int, H: int, Nt: int, S: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None, is_causal: bool,
              dtype: torch.dtype, device: torch.device, where: str) -> tuple[Tensor | None, Tensor | None]:
    """The masks of an ``nn.MultiheadAttention`` call, checked -> ``(pad [B, S] bool or None, extra)``.

    ``key_padding_mask``: ``[B, S]`` bool (True = pad) or float (additive, ``-inf`` = pad; finite
    values are added to the logits). ``attn_mask``: ``[Nt, S]`` or ``[B*H, Nt, S]``, bool (True = not
    allowed) or float (additive). ``is_causal``: key ``s`` hidden from query ``t`` when ``s > t``.
    ``extra`` is the additive mask over token columns, broadcastable to ``[B, H, Nt, S]``, or None.
    """
    pad, extra = None, None
    if key_padding_mask is not None:
        check_mask(key_padding_mask, "key_padding_mask", (B, S), where)
        if key_padding_mask.dtype == torch.bool:
            pad = key_padding_mask
        else:
            pad = torch.isneginf(key_padding_mask)
            extra = key_padding_mask.to(dtype).masked_fill(pad, 0.0)[:, None, None, :]
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            check_mask(attn_mask, "attn_mask", (Nt, S), where)
            m = additive_mask(attn_mask, dtype)[None, None]
        else:
            check_mask(attn_mask, "attn_mask", (B * H, Nt, S), where)
            m = additive_mask(attn_mask, dtype).view(B, H, Nt, S)
        extra = m if extra is None else extra + m
    if is_causal:
        causal = torch.ones(Nt, S, dtype=torch.bool, device=device).triu(1)
        m = additive_mask(causal, dtype)[None, None]
        extra = m if extra is None else extra + m
    return pad, extra


def _hf_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Hugging Face's bool masks follow SDPA (True = attend; nvformer's own are True = masked out).
    A float mask writes "masked" as its dtype's most negative value (-65504 in float16): widened to
    a wider dtype that is an ordinary number, so entries at or below half of it become ``-inf``."""
    if mask.dtype == torch.bool:
        return additive_mask(~mask, dtype)
    if mask.dtype != dtype:
        return mask.to(dtype).masked_fill(hidden(mask), float("-inf"))
    return mask


def hf_mask_bias(mask: Tensor | None, B: int, Nt: int, Nk: int, causal: bool, dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """A Hugging Face attention module's mask as an additive ``[B|1, 1|H, Nt, Nk]`` bias over token columns (or None).

    Accepts the 4D masks of the ``eager`` (additive float, of any precision) and ``sdpa`` (bool,
    True = attend) implementations, a 2D ``[B, Nk]`` padding mask (1 = attend), or None, which for
    a causal module means a causal mask aligned to the last query (as ``is_causal``).
    """
    if mask is None:
        if not causal or Nt == 1:
            return None
        t = torch.arange(Nt, device=device)[:, None] + (Nk - Nt)
        future = torch.arange(Nk, device=device)[None, :] > t
        return torch.zeros(Nt, Nk, dtype=dtype, device=device).masked_fill(future, float("-inf"))[None, None]
    if mask.dim() == 2:
        if mask.shape != (B, Nk):
            raise ValueError(f"NV attention: a 2D attention mask must have shape [{B}, {Nk}], got {list(mask.shape)}")
        return _hf_additive(mask.bool() if mask.dtype != torch.bool else mask, dtype)[:, None, None, :]
    if mask.dim() != 4:
        raise ValueError(f"NV attention: expected a 4D attention mask [B, 1, Nt, Nk], got shape {list(mask.shape)}")
    return _hf_additive(mask[..., -Nt:, :Nk], dtype)


def key_padding_from_bias(bias: Tensor | None, B: int, n_new: int) -> Tensor | None:
    """``[B, n_new]`` True where a new key is masked for every query (padding), from an additive bias."""
    if bias is None:
        return None
    blocked = hidden(bias[..., -n_new:])
    kpm = blocked.all(dim=-2).all(dim=1)
    return kpm.expand(B, n_new) if kpm.shape[0] == 1 else kpm

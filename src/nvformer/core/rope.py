"""Rotary position embeddings and grouped-query helpers (the conventions of Llama-like models).

Used by the Hugging Face forward to rotate queries and keys, to undo the rotation inside the
value interpolation of the evaluation form (docs/MATH.md section 3), and to repeat key/value
heads for grouped-query attention.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rotate_half", "apply_rope", "inverse_rope_combine", "repeat_kv"]


def rotate_half(x: Tensor) -> Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the last dim (the rotary convention of Llama-like models)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding ``x cos + rotate_half(x) sin``; ``x [B, H, N, d]``, ``cos/sin [B, N, d]``."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def inverse_rope_combine(q: Tensor, c_cos: Tensor, c_sin: Tensor) -> Tensor:
    """``(sum_i w_i R_i^T) q`` from the weighted sums of ``cos_i``/``sin_i``: ``q C_cos - rotate_half(q) C_sin``."""
    return q * c_cos - rotate_half(q) * c_sin


def repeat_kv(x: Tensor, groups: int) -> Tensor:
    """``[B, Hkv, K, c] -> [B, Hkv*groups, K, c]`` (grouped-query attention)."""
    if groups == 1:
        return x
    B, H, K, c = x.shape
    return x[:, :, None].expand(B, H, groups, K, c).reshape(B, H * groups, K, c)

"""Denoising attention (MATH.md section 3): the reference path and ``NVMultiheadAttention``.

Mask convention, everywhere in nvformer (as ``torch.nn.MultiheadAttention``): a bool mask is
True where attention is *not* allowed; a float mask is added to the logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_float, check_mask, check_tensor, compute_dtype
from .cached import shift_rows, weighted_sq_sum
from .kl import kl_dirichlet, kl_gaussian
from .nvib import NVIB, NVLatent
from .prior import Prior
from .sampling import safe_softmax

__all__ = [
    "denoising_attention",
    "additive_mask",
    "latent_columns_mask",
    "NVMultiheadAttention",
    "KLTerms",
    "kl_terms",
    "convert_mha",
]

FORMULAS = ("paper", "exact")


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


def _heads(t: Tensor, num_heads: int) -> Tensor:
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
        impl: ``"auto"`` (the fast path of :mod:`nvformer.fast` whenever it applies: weights not
            needed and the prior column visible in every row), ``"fast"`` (error if it does not
            apply) or ``"reference"`` (this function's own, obviously correct computation).

    Returns:
        ``(out [B, H, Nt, d], weights [B, H, Nt, K] or None)``; rows with nothing visible get
        zeros. Computed in at least float32, returned in ``query``'s dtype.
    """
    where = "denoising_attention"
    check_tensor(query, "query", 4, where, "[B, H, Nt, d]")
    if formula not in FORMULAS:
        raise ValueError(f"{where}: `formula` must be one of {FORMULAS}, got {formula!r}")
    if form is None:
        form = "train" if latent.sampled else "eval"
    if form not in ("train", "eval"):
        raise ValueError(f"{where}: `form` must be 'train' or 'eval', got {form!r}")
    if form == "eval" and latent.copies != 1:
        raise ValueError(f"{where}: the evaluation form needs an unsampled latent (copies=1), got copies={latent.copies}")
    B, H, Nt, d = query.shape
    P = latent.z.shape[-1]
    if tuple(k_weight.shape) != (H * d, P) or tuple(v_weight.shape) != (H * d, P):
        raise ValueError(
            f"{where}: `k_weight` and `v_weight` must have shape [{H * d}, {P}], got "
            f"{tuple(k_weight.shape)} and {tuple(v_weight.shape)}"
        )
    if latent.z.shape[0] != B:
        raise ValueError(f"{where}: `latent` has batch {latent.z.shape[0]} but `query` has batch {B}")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if impl not in ("auto", "fast", "reference"):
        raise ValueError(f"{where}: `impl` must be 'auto', 'fast' or 'reference', got {impl!r}")
    if impl != "reference":
        from .fast import fast_applicable, fast_denoising_attention

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
        k = _heads(F.linear(z, Wk, bk), H)  # [B, H, K, d]
        v = _heads(F.linear(z, Wv, bv), H)
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


@dataclass
class KLTerms:
    """Summed KL terms of every NV module in a model: ``gaussian`` and ``dirichlet``, each ``[B]``."""

    gaussian: Tensor
    dirichlet: Tensor
    modules: int

    def total(self, lambda_g: float = 1.0, lambda_d: float = 1.0) -> Tensor:
        """``[B]`` ``lambda_g * KL_G + lambda_d * KL_D``."""
        return lambda_g * self.gaussian + lambda_d * self.dirichlet.to(self.gaussian.dtype)


class NVMultiheadAttention(nn.Module):
    """Drop-in for ``torch.nn.MultiheadAttention`` whose keys and values come from an NV latent.

    An :class:`NVIB` layer turns the key/value input into a Dirichlet-process posterior (prior
    component first) and :func:`denoising_attention` reads it. Self-attention: queries from the
    un-noised input, keys/values from its latent. Causal self-attention: position ``t`` sees
    components ``1..t+1`` and the prior (always visible). Cross-attention: queries from the
    decoder, latent of the memory.

    Constructor arguments follow ``nn.MultiheadAttention`` (``embed_dim, num_heads, dropout,
    bias, kdim, vdim, batch_first``; default ``batch_first=True``); ``add_bias_kv`` and
    ``add_zero_attn`` are not supported. NV arguments: ``prior`` and the :class:`NVIB` keyword
    arguments (``delta, kappa, mu_tau, stdev_tau, alpha_tau, prior_component,
    alpha_threshold, threshold_mode, min_var``), plus ``formula`` (``"paper"`` / ``"exact"``).

    After each forward ``last_latent`` holds the latent (unless ``store_latent=False``) and
    :meth:`kl` returns its KL terms; :func:`kl_terms` sums them over a model.
    """

    # Attributes read by torch's TransformerEncoderLayer fast path: with these values it declines
    # the fused kernel (which would bypass this forward) and calls ``self_attn(...)``.
    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        prior: Prior | None = None,
        formula: str = "paper",
        store_latent: bool = True,
        **nvib_kwargs,
    ) -> None:
        super().__init__()
        where = "NVMultiheadAttention"
        if add_bias_kv or add_zero_attn:
            raise ValueError(f"{where}: `add_bias_kv` and `add_zero_attn` have no NV counterpart and are not supported")
        if embed_dim % num_heads:
            raise ValueError(f"{where}: `embed_dim` ({embed_dim}) must be divisible by `num_heads` ({num_heads})")
        kdim = embed_dim if kdim is None else kdim
        vdim = embed_dim if vdim is None else vdim
        if kdim != vdim:
            raise ValueError(f"{where}: keys and values are read from one latent, so `kdim` must equal `vdim` (got {kdim}, {vdim})")
        if formula not in FORMULAS:
            raise ValueError(f"{where}: `formula` must be one of {FORMULAS}, got {formula!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{where}: `dropout` must be in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.kdim, self.vdim = embed_dim, num_heads, kdim, vdim
        self.head_dim = embed_dim // num_heads
        self.dropout, self.batch_first, self.formula = float(dropout), batch_first, formula
        self.store_latent = store_latent
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(kdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.nvib = NVIB(kdim, num_heads, prior=prior, head_dim=self.head_dim, **nvib_kwargs, **factory)
        self.last_latent: NVLatent | None = None
        self._alpha_skip_source: list[NVMultiheadAttention] = []

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, prior: Prior | None = None, **kwargs) -> NVMultiheadAttention:
        """Convert an ``nn.MultiheadAttention`` with the identity initialisation.

        Copies the query/key/value/output projections; ``kwargs`` are the NV arguments (knobs,
        ``formula``, ...). The result is in the same train/eval mode, device and dtype.
        """
        if not isinstance(mha, nn.MultiheadAttention):
            raise ValueError(f"NVMultiheadAttention.from_mha: expected nn.MultiheadAttention, got {type(mha).__name__}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("NVMultiheadAttention.from_mha: `add_bias_kv` / `add_zero_attn` are not supported")
        w = mha.out_proj.weight
        new = cls(
            mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
            kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first, device=w.device, dtype=w.dtype,
            prior=prior, **kwargs,
        )
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.chunk(3, dim=0)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for lin, weight in ((new.q_proj, wq), (new.k_proj, wk), (new.v_proj, wv)):
                lin.weight.copy_(weight)
            if mha.in_proj_bias is not None:
                for lin, b in zip((new.q_proj, new.k_proj, new.v_proj), mha.in_proj_bias.chunk(3)):
                    lin.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def set_alpha_skip(self, source: NVMultiheadAttention | None) -> None:
        """Add ``source``'s last token log pseudo-counts to this layer's (alpha skip; None to unset)."""
        self._alpha_skip_source = [] if source is None else [source]

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, dropout={self.dropout}, batch_first={self.batch_first}, formula={self.formula!r}"

    # ------------------------------------------------------------------ forward
    def _token_mask(
        self, B: int, Nt: int, S: int, key_padding_mask: Tensor | None, attn_mask: Tensor | None, is_causal: bool, cd: torch.dtype, device: torch.device
    ) -> tuple[Tensor | None, Tensor | None]:
        """Validated masks -> (bool key padding ``[B, S]``, additive ``[B|1, H|1, Nt, S]`` or None)."""
        where = "NVMultiheadAttention.forward"
        H = self.num_heads
        pad, extra = None, None
        if key_padding_mask is not None:
            check_mask(key_padding_mask, "key_padding_mask", (B, S), where)
            if key_padding_mask.dtype == torch.bool:
                pad = key_padding_mask
            else:
                pad = torch.isneginf(key_padding_mask)
                extra = key_padding_mask.to(cd).masked_fill(pad, 0.0)[:, None, None, :]
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                check_mask(attn_mask, "attn_mask", (Nt, S), where)
                m = additive_mask(attn_mask, cd)[None, None]
            else:
                check_mask(attn_mask, "attn_mask", (B * H, Nt, S), where)
                m = additive_mask(attn_mask, cd).view(B, H, Nt, S)
            extra = m if extra is None else extra + m
        if is_causal:
            causal = torch.ones(Nt, S, dtype=torch.bool, device=device).triu(1)
            m = additive_mask(causal, cd)[None, None]
            extra = m if extra is None else extra + m
        return pad, extra

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
        latent: NVLatent | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Same signature and return as ``nn.MultiheadAttention.forward``.

        Args:
            query: ``[B, Nt, E]`` (``[Nt, B, E]`` if not ``batch_first``; ``[Nt, E]`` unbatched).
            key: ``[B, S, kdim]``; the vectors the latent is built on.
            value: must be ``key`` itself (keys and values come from one latent).
            key_padding_mask: ``[B, S]`` bool (True = pad) or float (additive, ``-inf`` = pad).
            attn_mask: ``[Nt, S]`` or ``[B*H, Nt, S]``, bool (True = not allowed) or float.
            is_causal: apply a causal mask (position ``t`` sees keys ``<= t``); the prior column
                stays visible. May be combined with ``attn_mask``.
            latent: a precomputed :class:`NVLatent` to attend to instead of building one from ``key``
                (e.g. one cross-attention latent shared by all decoder layers).

        Returns:
            ``(out, weights)``: ``out`` shaped like ``query``; ``weights`` ``[B, Nt, K]`` (averaged)
            or ``[B, H, Nt, K]`` over latent columns (prior first, ``K = (S+1)*copies``), or None.
        """
        where = "NVMultiheadAttention.forward"
        check_tensor(query, "query", (2, 3), where, "[B, Nt, E]" if self.batch_first else "[Nt, B, E]")
        if query.is_nested:
            raise ValueError(f"{where}: nested tensors are not supported (nvformer.convert_mha disables torch's nested-tensor fast path)")
        check_float(query, "query", where)
        if value is not key:
            raise ValueError(f"{where}: NV attention reads keys and values from one set of vectors; pass the same tensor as `key` and `value`")
        unbatched = query.dim() == 2
        if unbatched:
            query, key = query.unsqueeze(0), key.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        check_tensor(key, "key", 3, where, f"[B, S, {self.kdim}]")
        B, Nt, E = query.shape
        if E != self.embed_dim:
            raise ValueError(f"{where}: `query` must have last dim {self.embed_dim}, got {tuple(query.shape)}")
        if key.shape[0] != B or key.shape[-1] != self.kdim:
            raise ValueError(f"{where}: `key` must have shape [{B}, S, {self.kdim}], got {tuple(key.shape)}")
        S = key.shape[1]
        cd = compute_dtype(query.dtype)
        # self-attention: the attention function applies causality itself (the fast path needs no
        # mask for it); an attn_mask given as well is applied on top
        own_causal = is_causal and Nt == S and latent is None
        pad, extra = self._token_mask(B, Nt, S, key_padding_mask, attn_mask, is_causal and not own_causal, cd, query.device)

        if latent is None:
            skip = None
            if self._alpha_skip_source:
                prev = self._alpha_skip_source[0].last_latent
                if prev is not None and tuple(prev.log_alpha.shape) == (B, S + 1):
                    skip = prev.log_alpha[:, 1:].masked_fill(prev.pad_mask[:, 1:], 0.0)
            latent = self.nvib(key, key_padding_mask=pad, alpha_skip=skip)
        if self.store_latent:
            self.last_latent = latent

        q = _heads(self.q_proj(query), self.num_heads)
        mask = latent_columns_mask(extra, latent.copies)
        out, weights = denoising_attention(
            q, latent, self.k_proj.weight, self.k_proj.bias, self.v_proj.weight, self.v_proj.bias,
            attn_mask=mask, is_causal=own_causal, formula=self.formula, dropout_p=self.dropout if self.training else 0.0,
            scale=self.nvib.scale, need_weights=need_weights,
        )
        out = self.out_proj(out.transpose(1, 2).reshape(B, Nt, self.embed_dim))
        if unbatched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(1)
        return out, weights.squeeze(0) if unbatched else weights

    def kl(self, reduction: str = "mean") -> tuple[Tensor, Tensor]:
        """``(KL_G [B], KL_D [B])`` of the last latent (see :func:`kl_gaussian`, :func:`kl_dirichlet`)."""
        if self.last_latent is None:
            raise RuntimeError("NVMultiheadAttention.kl: no forward pass has stored a latent yet")
        lat = self.last_latent
        return kl_gaussian(lat, self.nvib.prior, reduction=reduction), kl_dirichlet(lat, self.nvib.prior, self.nvib.delta)


def kl_terms(model: nn.Module, reduction: str = "mean") -> KLTerms:
    """Sum the KL terms of the last forward of every NV attention module in ``model``.

    Covers :class:`NVMultiheadAttention` and converted Hugging Face attention modules; a latent
    shared by several modules (the cross-attention NVIB) is counted once.
    """
    g = d = None
    count = 0
    seen: set[int] = set()
    for m in model.modules():
        lat = getattr(m, "last_latent", None)
        nvib = getattr(m, "nvib", None)
        if lat is None or not isinstance(nvib, NVIB) or id(lat) in seen:
            continue
        seen.add(id(lat))
        kg = kl_gaussian(lat, nvib.prior, reduction=reduction)
        kd = kl_dirichlet(lat, nvib.prior, nvib.delta)
        g = kg if g is None else g + kg
        d = kd if d is None else d + kd
        count += 1
    if g is None or d is None:
        raise RuntimeError("kl_terms: the model has no NV attention module with a stored latent (run a forward first)")
    return KLTerms(gaussian=g, dirichlet=d, modules=count)


def convert_mha(model: nn.Module, prior: Prior | None = None, alpha_skip: bool = False, **kwargs) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` in a PyTorch model by :meth:`NVMultiheadAttention.from_mha`.

    In place; returns ``model``. Also turns off the nested-tensor fast path of any
    ``nn.TransformerEncoder`` (it would hand nested tensors to the attention modules).
    ``alpha_skip=True`` links the self-attention modules of each ``nn.TransformerEncoder`` in
    order (alpha skip connections). ``kwargs`` are the NV arguments (knobs, ``formula``, ...).
    """
    if isinstance(model, nn.MultiheadAttention):
        raise ValueError("convert_mha: pass a model containing nn.MultiheadAttention modules; use NVMultiheadAttention.from_mha for one module")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if not targets:
        raise ValueError(f"convert_mha: {type(model).__name__} has no nn.MultiheadAttention to convert")
    for name, mha in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, NVMultiheadAttention.from_mha(mha, prior=prior, **kwargs))
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder):
            m.use_nested_tensor = False
            if alpha_skip:
                layers = [layer.self_attn for layer in m.layers]
                for prev, cur in zip(layers, layers[1:]):
                    cur.set_alpha_skip(prev)
    return model

"""``NVMultiheadAttention``: the ``nn.MultiheadAttention`` drop-in, its KL terms, and the
conversion of plain PyTorch models (docs/MATH.md sections 1-4).

A thin module over :class:`~nvformer.nn.nvib.NVIB` and
:func:`~nvformer.nn.functional.denoising_attention`; masks follow :mod:`nvformer.core.masks`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import NVConfig, NVSite
from ..core.checks import check_choice, check_dropout, check_float, check_heads, check_int, check_tensor, compute_dtype
from ..core.kl import kl_dirichlet, kl_gaussian
from ..core.latent import NVLatent
from ..core.masks import latent_columns_mask, mha_masks
from ..core.prior import Prior, prior_for
from .functional import FORMULAS, denoising_attention, heads
from .nvib import NVIB

__all__ = ["KLTerms", "NVMultiheadAttention", "convert_mha", "kl_terms", "layer_index", "torch_site", "unconvert_mha"]


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
        check_heads(embed_dim, num_heads, where)
        kdim = embed_dim if kdim is None else check_int(kdim, "kdim", where)
        vdim = embed_dim if vdim is None else check_int(vdim, "vdim", where)
        if kdim != vdim:
            raise ValueError(f"{where}: keys and values are read from one latent, so `kdim` must equal `vdim` (got {kdim}, {vdim})")
        check_choice(formula, "formula", where, FORMULAS)
        check_dropout(dropout, where)
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.kdim, self.vdim = embed_dim, num_heads, kdim, vdim
        self.head_dim = embed_dim // num_heads
        self.dropout, self.batch_first, self.formula = float(dropout), batch_first, formula
        self.store_latent = store_latent
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(kdim, embed_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(kdim, embed_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if nvib_kwargs.get("prior_scaling", "constant") != "constant":
            raise ValueError(f"{where}: `prior_scaling` {nvib_kwargs['prior_scaling']!r} is supported on Hugging Face models only")
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

    @torch.no_grad()
    def to_mha(self) -> nn.MultiheadAttention:
        """The ``nn.MultiheadAttention`` with this module's projections (the inverse of
        :meth:`from_mha`; packed ``in_proj_weight`` when ``kdim == embed_dim``), same mode, device and dtype."""
        w = self.out_proj.weight
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout, bias=self.q_proj.bias is not None,
                                    kdim=self.kdim, vdim=self.vdim, batch_first=self.batch_first, device=w.device, dtype=w.dtype)
        if mha._qkv_same_embed_dim:
            mha.in_proj_weight.copy_(torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]))
        else:
            for target, lin in ((mha.q_proj_weight, self.q_proj), (mha.k_proj_weight, self.k_proj), (mha.v_proj_weight, self.v_proj)):
                target.copy_(lin.weight)
        if mha.in_proj_bias is not None:
            mha.in_proj_bias.copy_(torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]))
        mha.out_proj.load_state_dict(self.out_proj.state_dict())
        return mha.train(self.training)

    def set_alpha_skip(self, source: NVMultiheadAttention | None) -> None:
        """Add ``source``'s last token log pseudo-counts to this layer's (alpha skip; None to unset)."""
        self._alpha_skip_source = [] if source is None else [source]

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, kdim={self.kdim}, dropout={self.dropout}, batch_first={self.batch_first}, formula={self.formula!r}"

    # ------------------------------------------------------------------ forward
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
        pad, extra = mha_masks(B, self.num_heads, Nt, S, key_padding_mask, attn_mask, is_causal and not own_causal, cd, query.device, where)

        if latent is None:
            skip = None
            if self._alpha_skip_source:
                prev = self._alpha_skip_source[0].last_latent
                if prev is not None and tuple(prev.log_alpha.shape) == (B, S + 1):
                    skip = prev.log_alpha[:, 1:].masked_fill(prev.pad_mask[:, 1:], 0.0)
            latent = self.nvib(key, key_padding_mask=pad, alpha_skip=skip)
        if self.store_latent:
            self.last_latent = latent

        q = heads(self.q_proj(query), self.num_heads)
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


def torch_site(model: nn.Module, name: str) -> str:
    """The site of the attention module ``name`` of a PyTorch model: ``"cross"`` for a
    ``TransformerDecoderLayer``'s ``multihead_attn``, ``"decoder"`` for its ``self_attn``, else
    ``"encoder"``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.TransformerDecoderLayer):
        return "cross" if attr == "multihead_attn" else "decoder"
    return "encoder"


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)


def convert_mha(model: nn.Module, config: NVConfig = NVConfig(), prior: Prior | Mapping[str, Prior] | None = None) -> nn.Module:
    """Replace every ``nn.MultiheadAttention`` of the chosen sites of a PyTorch model by
    :meth:`NVMultiheadAttention.from_mha` (use :func:`nvformer.convert`).

    In place; returns ``model``. Sites follow :func:`torch_site`; each module's knobs come from
    ``config.knobs_for(site, layer, name)``, its prior from ``prior`` (one :class:`Prior`, or the
    ``{name: Prior}`` of :func:`nvformer.estimate_prior`). Also turns off the nested-tensor fast
    path of any ``nn.TransformerEncoder`` (it would hand nested tensors to the attention modules);
    ``config.alpha_skip`` links the self-attention modules of each ``nn.TransformerEncoder`` in
    order (alpha skip connections).
    """
    if isinstance(model, nn.MultiheadAttention):
        raise ValueError("nvformer.convert: pass a model containing nn.MultiheadAttention modules; use NVMultiheadAttention.from_mha for one module")
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if not targets:
        raise ValueError(f"nvformer.convert: {type(model).__name__} has no nn.MultiheadAttention to convert")
    chosen = [(name, m, torch_site(model, name)) for name, m in targets if torch_site(model, name) in config.sites]
    if not chosen:
        present = sorted({torch_site(model, name) for name, _ in targets})
        raise ValueError(f"nvformer.convert: {type(model).__name__} has no attention module at site(s) {list(config.sites)}; its sites are {present}")
    if config.prior_scaling != "constant":
        raise ValueError(f"nvformer.convert: prior_scaling={config.prior_scaling!r} is supported on Hugging Face models; "
                         "PyTorch models use 'constant'")
    built = []  # everything is built (and checked) before the model changes
    for name, mha, site in chosen:
        layer = layer_index(name)
        knobs = config.knobs_for(site, layer, name)
        new = NVMultiheadAttention.from_mha(mha, prior=prior_for(prior, name, mha.kdim), formula=config.formula,
                                            **config.nvib_settings(), **knobs.as_dict())
        new._nv = NVSite(site=site, layer=layer, owner=name, formula=config.formula)
        built.append((name, new))
    for name, new in built:
        _replace(model, name, new)
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder):
            m._nv_nested = m.use_nested_tensor
            m.use_nested_tensor = False
            if config.alpha_skip:
                layers = [layer.self_attn for layer in m.layers]
                for prev, cur in zip(layers, layers[1:]):
                    cur.set_alpha_skip(prev)
    return model


def unconvert_mha(model: nn.Module) -> nn.Module:
    """Undo :func:`convert_mha` in place: every :class:`NVMultiheadAttention` becomes an
    ``nn.MultiheadAttention`` with its current projections (packed as the original was)."""
    for name, m in [(n, m) for n, m in model.named_modules() if isinstance(m, NVMultiheadAttention)]:
        _replace(model, name, m.to_mha())
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and hasattr(m, "_nv_nested"):
            m.use_nested_tensor = m.__dict__.pop("_nv_nested")
    return model


def layer_index(name: str) -> int | None:
    """The layer index in a module path (``"...layers.3.self_attn"`` -> 3), or None."""
    m = re.search(r"\.(\d+)\.", f".{name}.")
    return int(m.group(1)) if m else None

"""Dirichlet attention in Hugging Face models, through ``transformers.AttentionInterface``
(imported on first use): :func:`convert_dirichlet` and its inverse."""

from __future__ import annotations

from torch import Tensor, nn

from ..core.masks import hf_mask_bias, key_padding_from_bias
from ..core.rope import repeat_kv
from ..dirichlet.functional import DirichletSpec, dirichlet_attention, working_dtype
from ..dirichlet.module import DirichletState
from .convert import attention_modules, is_hf_model

__all__ = ["HF_NAME", "convert_dirichlet", "is_dirichlet_model", "unconvert_dirichlet"]


HF_NAME = "nvformer_dirichlet"


def _hf_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None, scaling: float | None = None,
                  dropout: float = 0.0, position_bias: Tensor | None = None, **kwargs):
    """The ``transformers`` attention interface: ``[B, H, N, d]`` inputs, returns ``([B, Nq, H, d], weights)``.

    ``position_bias`` (T5's relative position bias, passed by keyword) is added to the scores, as
    T5's own attention functions do. ``last_kl`` sums the KL over heads and the queries that are
    not padding (docs/MATH.md section 5).
    """
    st = getattr(module, "dirichlet", None)
    if not isinstance(st, DirichletState):
        raise RuntimeError(f"nvformer Dirichlet attention: {type(module).__name__} was not converted with convert_dirichlet")
    B, H, Nq, _ = query.shape
    Nk = key.shape[2]
    key, value = repeat_kv(key, H // key.shape[1]), repeat_kv(value, H // value.shape[1])  # grouped-query attention
    sample, need_kl = st.modes(module.training)
    wd = working_dtype(query.dtype, sample=sample, kl=need_kl)
    bias = hf_mask_bias(attention_mask, B, Nq, Nk, bool(getattr(module, "is_causal", False)), wd, query.device)
    # self-attention: queries at padded positions are no part of the ELBO (as in DirichletAttention)
    pad_queries = key_padding_from_bias(bias, B, Nk) if (bias is not None and Nq == Nk) else None
    if position_bias is not None:
        pb = position_bias[..., -Nq:, :Nk].to(wd)
        bias = pb if bias is None else bias + pb
    out, w, kl = dirichlet_attention(query, key, value, bias, st.spec, st.tau, sample=sample, kl=need_kl, scale=scaling,
                                     dropout_p=dropout if module.training else 0.0)
    if kl is not None and pad_queries is not None:
        kl = kl.masked_fill(pad_queries[:, None, :], 0.0)
    st.last_kl = None if kl is None else kl.sum((1, 2))
    return out.transpose(1, 2).contiguous(), w


def convert_dirichlet(model: nn.Module, spec: DirichletSpec = DirichletSpec()) -> nn.Module:
    """Give every attention module of a Hugging Face model (the families of
    :func:`nvformer.convert`) Dirichlet attention weights, in place (undo with :func:`nvformer.unconvert`).

    Registers the attention function with ``transformers.AttentionInterface`` (additive masks)
    and switches the model to it; each attention module gets a ``dirichlet`` submodule holding
    its ``tau`` (trained with the model when ``spec.learn_tau``) and ``last_kl``.
    """
    if not is_hf_model(model):
        raise ValueError(f"convert_dirichlet: {type(model).__name__} is not a Hugging Face model; give a PyTorch model's "
                         "nn.MultiheadAttention Dirichlet weights with DirichletAttention.from_mha")
    if not isinstance(spec, DirichletSpec):
        raise ValueError(f"convert_dirichlet: `spec` must be a DirichletSpec, got {type(spec).__name__}")
    if is_dirichlet_model(model):
        raise ValueError("convert_dirichlet: the model already has Dirichlet attention (nvformer.unconvert it first)")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(HF_NAME, _hf_attention)
    AttentionMaskInterface.register(HF_NAME, eager_mask)
    mods = attention_modules(model)
    if not mods:
        raise ValueError("convert_dirichlet: no supported attention module found")
    device = next(model.parameters()).device
    for _, module, _, _ in mods:
        module.dirichlet = DirichletState(spec).to(device)
    model._nv_dirichlet_previous = model.config._attn_implementation
    model.set_attn_implementation(HF_NAME)
    return model


def is_dirichlet_model(model: nn.Module) -> bool:
    """A model converted by :func:`convert_dirichlet`."""
    return hasattr(model, "_nv_dirichlet_previous")


def unconvert_dirichlet(model: nn.Module) -> nn.Module:
    """Undo :func:`convert_dirichlet`: remove the ``dirichlet`` submodules and restore the attention implementation."""
    for _, module, _, _ in attention_modules(model):
        module._modules.pop("dirichlet", None)
    model.set_attn_implementation(model.__dict__.pop("_nv_dirichlet_previous"))
    return model

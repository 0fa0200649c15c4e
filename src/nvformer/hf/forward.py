"""The NV forward shared by every converted Hugging Face attention module.

A converted module's class is a dynamic subclass of its original class whose ``forward`` is
:func:`nv_attention_forward`: it reads the original arguments through the family's
:class:`~nvformer.hf.adapters.Adapter`, builds the NV latent of the key/value input with the
module's :class:`~nvformer.NVIB` child, and computes denoising attention in the cache form of
:mod:`nvformer.core.keyform`. KV caches hold ``[k, b]`` (one extra key channel) and ``[v, extras]``
for the token components; the prior component is never cached and is prepended at attention
time, so ``cache.get_seq_length()``, beam reordering and cropping work unchanged
(docs/DESIGN.md, "Hugging Face").

Precision. What the original module computes (the query, key and value projections, rotary
embeddings) is computed as it does, in the model's dtype; what NV adds runs in at least float32
(``cd``): the NVIB (kept in at least float32 by :func:`~nvformer.hf.convert.convert_hf`), the
per-key terms ``b_i`` (float64 sums, :mod:`nvformer.core.keyform`), the attention and the value
interpolation. So a bfloat16 or float16 model attends in float32 and returns its own dtype; its
KV cache holds keys in float32 (the extra channel ``b_i`` cancels to float32 accuracy at the
identity) and values in the model's dtype. Float masks are read in their own dtype's convention
(:func:`nvformer.core.masks.hf_mask_bias`).
"""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import compute_dtype
from ..core.keyform import (
    attend,
    head_key_terms,
    head_matrices,
    input_key_terms,
    key_terms,
    max_norm,
    prior_weight_underflows,
    scale_heads,
    shared_key_terms,
)
from ..core.latent import NVLatent
from ..core.masks import hf_mask_bias, hidden, key_padding_from_bias
from ..core.rope import apply_rope, inverse_rope_combine, repeat_kv
from ..core.scratch import scratch
from ..nn.sdpa import EXCLUDED, padded_width, sdpa_nv
from .adapters import Adapter


def _shared_variance(nvib: nn.Module) -> None:
    if not nvib._structure()[1]:  # cached by the weight's version counter
        raise ValueError(
            "NV attention on Hugging Face models supports token variances shared across tokens "
            "(logvar projection weight = 0, as the identity initialisation sets it); this module's "
            "logvar projection has non-zero weights"
        )


def _token_terms(nvib: nn.Module, sigma2: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(shift, tok_logvar, tok_log_s)``: the pseudo-count bias subtracted from every column (float64), and the
    tokens' shared ``[P]`` log variance (floored like the NVIB's) and ``log S_tok = log(var + sigma2)``, float64,
    differentiable (for :func:`nvformer.fit_knobs`, ``stdev_tau``)."""
    tok_logvar = nvib.logvar_proj.bias.double().clamp_min(math.log(nvib.min_var))
    return nvib.alpha_bias.detach().double(), tok_logvar, (tok_logvar.exp() + sigma2).log()


def _derived(self: nn.Module, name: str, weights: tuple[Tensor, ...], make, fresh: bool = False, key: tuple | None = None):
    """A per-module cache of matrices derived from weights and knobs (per-head d x d matrices):
    recomputed only when the NVIB's knobs/prior or the weights change (version counters); ``fresh``:
    computed without the cache (per-head knobs, whose parameters are buffers that fitting may differentiate).
    ``key``: the caller's own key for a call without gradients, covering every input of ``make``
    (:func:`_fused_forward` builds one per forward for all its caches); ``weights`` then go unread."""
    if key is None:
        nvib = self.nvib
        deps = (*weights, nvib.logvar_proj.bias, nvib.prior.var)  # S_tok and S_0 come from these
        if fresh or (torch.is_grad_enabled() and any(w.requires_grad for w in deps)):
            return make()  # a gradient must reach the weights or the knobs (nvformer.fit_knobs): never cached
        key = (nvib.version, *((w._version, w.data_ptr()) for w in deps))
    cache = self.__dict__.setdefault("_nv_derived", {})
    hit = cache.get(name)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = make()
    cache[name] = (key, value)
    return value


def _latent(self: nn.Module, kv_in: Tensor, kpm: Tensor | None, raw_mask: Tensor | None) -> NVLatent:
    """The NVIB latent of ``kv_in``; one latent per forward for the shared cross-attention NVIB."""
    nvib = self.nvib
    if self._nv.site == "cross":
        last = getattr(nvib, "_nv_last", None)
        if last is not None and last[0] is kv_in and last[1] is raw_mask and last[2] == self.training and last[3] == nvib.version:
            return last[4]
        lat = nvib(kv_in.to(nvib.mu_proj.weight.dtype), key_padding_mask=kpm)
        nvib._nv_last = (kv_in, raw_mask, self.training, nvib.version, lat)
        return lat
    return nvib(kv_in.to(nvib.mu_proj.weight.dtype), key_padding_mask=kpm)


def _cache_for(self: nn.Module, cache, cross: bool):
    """(the cache object this module updates or reads, whether the cross states are cached)."""
    if cache is None:
        return None, False
    if hasattr(cache, "cross_attention_cache"):  # EncoderDecoderCache
        if cross:
            return cache.cross_attention_cache, bool(cache.is_updated.get(self.layer_idx))
        return cache.self_attention_cache, False
    return cache, False


def nv_attention_forward(self: nn.Module, *args, **kwargs):
    """Denoising attention with the original module's signature and return value."""
    ad: Adapter = self._nv.adapter
    call = ad.call_arguments(self, args, kwargs)
    x = ad.hidden_states(self, call)
    B, Nt, _ = x.shape
    cross = self._nv.site == "cross"
    nvib = self.nvib
    if cross:
        kv_in = call.get(ad.arg_kv) if ad.arg_kv else None
        raw_mask = call.get(ad.arg_kv_mask) if ad.arg_kv_mask else call.get(ad.arg_mask)
    else:
        kv_in, raw_mask = x, call.get(ad.arg_mask)
    cache_obj = ad.cache(self, call)
    layer_cache, cached_cross = _cache_for(self, cache_obj, cross)
    if cross and kv_in is None and not cached_cross:
        raise ValueError(f"NV cross-attention ({type(self).__name__}) needs `{ad.arg_kv}`")

    (q_w, q_b), (k_w, k_b), (v_w, v_b) = ad.qkv(self)
    if x.dtype != q_w.dtype:
        raise ValueError(f"NV attention ({type(self).__name__}): input dtype {x.dtype} does not match the module's weights ({q_w.dtype})")
    d = ad.head_size(self)
    scale = float(self.scaling)
    cd = compute_dtype(x.dtype)
    Hq, Hkv = q_w.shape[0] // d, k_w.shape[0] // d
    training = self.training
    if nvib.training != training:  # e.g. a submodule's mode was set by hand
        nvib.train(training)
    sampled = training or nvib.prediction == "sample"  # nvformer.set_prediction(model, "sample")
    if not sampled:
        _shared_variance(nvib)
    heads = (not sampled) and nvib.head_alpha_tau is not None  # per-head knobs (NVIB.set_head_knobs)
    if heads and nvib.head_alpha_tau.numel() != k_w.shape[0] // ad.head_size(self):
        raise ValueError(f"NV attention ({type(self).__name__}): {nvib.head_alpha_tau.numel()} per-head knobs for {k_w.shape[0] // ad.head_size(self)} key/value heads")
    interp = (not sampled) and (bool((nvib.head_stdev_tau > 0).any()) if heads else nvib.stdev_tau > 0)
    rope = call.get(ad.arg_rope) if ad.arg_rope else None
    if rope is not None and self._nv.formula == "exact" and not sampled:
        raise ValueError("formula='exact' is not available for rotary-position models (its extra term is key-dependent under RoPE); use 'paper'")

    q = F.linear(x, q_w, q_b).view(B, Nt, Hq, d).transpose(1, 2)
    if rope is not None:
        cos, sin = rope
        q = apply_rope(q, cos, sin)
    q = q.to(cd)
    past = cache_obj.get_seq_length(self.layer_idx) if (cache_obj is not None and not cross) else 0

    sigma2 = 1.0 / scale
    n_extra = d if (interp and rope is not None) else 0

    groups = Hq // Hkv

    def terms(lat):
        """(m for token columns, m for the prior column, b [B, C], or [B, Hkv, C] with per-head knobs) of a latent."""
        shift, tok_logvar, _ = _token_terms(nvib, sigma2)
        if sampled:
            m, b = key_terms(lat.mu, lat.logvar, lat.log_w, lat.z, scale, shift)
            return m, m[:, :1], b
        if heads:
            _, m0, b = head_key_terms(lat.mu, lat.log_w, nvib.head_logvar_bias, lat.logvar[0, 0], scale, shift,
                                      nvib.head_alpha_bias - nvib.alpha_bias.double())
            return lat.mu, m0, b
        return shared_key_terms(lat.mu, lat.log_w, tok_logvar, lat.logvar[0, 0], scale, shift)

    def per_key(b, cols):
        """The per-key terms ``b`` of columns ``cols`` as ``[B, Hkv, n]`` in ``cd``."""
        return b[:, :, cols].to(cd) if b.dim() == 3 else b[:, cols].to(cd)[:, None, :].expand(B, Hkv, -1)

    if heads:  # token keys and values through per-head input scalings f_h = sigma2 / S_h (the prior column keeps k_w, v_w)
        f_heads = sigma2 / (nvib.head_logvar_bias.double().exp() + sigma2)
        kw_tok, vw_tok = scale_heads(k_w, f_heads), scale_heads(v_w, f_heads)
    else:
        kw_tok, vw_tok = k_w, v_w

    def project(m, w, bias, n):
        """Per-key vectors projected as the original module projects (in its weights' dtype), not yet cast to ``cd``."""
        return F.linear(m.to(w.dtype), w, bias).view(B, n, Hkv, d).transpose(1, 2)

    if _fused_applicable(self, cross, sampled, heads, n_extra, ad):
        return _fused_forward(self, ad, x, q, raw_mask, rope, terms, (k_w, k_b, v_w, v_b), cache_obj, layer_cache, d=d, scale=scale,
                              cd=cd, Hkv=Hkv, groups=groups, interp=interp)
    shift, tok_logvar, tok_log_s = _token_terms(nvib, sigma2)

    padding_only = False
    tok_bias = None
    if cross and cached_cross:
        lat = nvib(x.new_zeros(B, 0, nvib.dim, dtype=nvib.mu_proj.weight.dtype))  # the prior component alone
        entry = layer_cache.layers[self.layer_idx]
        k_ext, v_ext = entry.keys, entry.values
    else:
        n_new = kv_in.shape[1]
        tok_bias = hf_mask_bias(raw_mask, B, Nt, past + n_new, self.is_causal and not cross, cd, x.device)
        kpm = key_padding_from_bias(tok_bias, B, n_new)
        lat = _latent(self, kv_in, kpm, raw_mask)
        m, m0, b = terms(lat)
        b = b.masked_fill(~torch.isfinite(b), EXCLUDED)  # padded keys: finite, so SDPA's GEMM stays NaN-free
        if layer_cache is None and not n_extra:
            # no KV cache: every column (prior first) in one projection, no concatenation
            keys = project(m, kw_tok, k_b, n_new + 1)
            values = project(m, vw_tok, v_b, n_new + 1)
            if not sampled:
                keys[:, :, :1] = project(m0, k_w, k_b, 1)
                values[:, :, :1] = project(m0, v_w, v_b, 1)
            if rope is not None:
                keys[:, :, 1:] = apply_rope(keys[:, :, 1:], cos, sin)
            keys, values = keys.to(cd), values.to(cd)
            bvec = per_key(b, slice(None))
            Nk = n_new
            # a mask that only hides padded keys is already in b: SDPA then needs no mask at all
            padding_only = (tok_bias is not None and not (self.is_causal and not cross) and ad.arg_position_bias is None
                            and _hides_only_padding(tok_bias, kpm))
        else:
            k_tok = project(m[:, 1:], kw_tok, k_b, n_new)
            v_tok = project(m[:, 1:], vw_tok, v_b, n_new)
            if rope is not None:
                k_tok = apply_rope(k_tok, cos, sin)
            k_ext = torch.cat([k_tok.to(cd), per_key(b, slice(1, None))[..., None]], dim=-1)
            extras = []
            if n_extra:
                half = d // 2
                extras = [t[..., :half].to(v_tok.dtype).unsqueeze(1).expand(B, Hkv, n_new, half) for t in (cos, sin)]
            # values (and the rotary extras, which Hugging Face passes in the model's dtype) are cached in
            # their own dtype; keys in `cd`, because the channel b holds per-key terms that need float32
            v_ext = torch.cat([v_tok, *extras], dim=-1)
            if layer_cache is not None:
                k_ext, v_ext = layer_cache.update(k_ext, v_ext, self.layer_idx)
                if cross:
                    cache_obj.is_updated[self.layer_idx] = True
    self.last_latent = lat

    if _cached_fast_path(self, layer_cache, cross, sampled, heads, n_extra, ad):
        # decoding with a KV cache: the prior column's extended key and value come from a per-module
        # cache (they depend only on the knobs, the prior and the weights), the cached [k | b] keys are
        # used as SDPA's extended keys as they are, grouped heads are not repeated (enable_gqa)
        k0e, v0e = _derived(self, f"P0{cd}", _prior_column_deps(self, k_w, k_b, v_w, v_b),
                            lambda: _prior_column(self, terms, k_w, k_b, v_w, v_b, Hkv, d, cd))
        bias = None if tok_bias is None else torch.cat([tok_bias.new_zeros(tok_bias.shape[:-1] + (1,)), tok_bias], dim=-1)
        out = self.__dict__.get("_nv_compiled", extended_sdpa)(q, k0e, v0e, k_ext, v_ext, None, bias=bias, causal=False, scale=scale, groups=groups)
        return _finish(self, ad, x, out, q, w0=out[..., d : d + 1], k_w=k_w, v_w=v_w, S_tok=tok_log_s.exp(), sigma2=sigma2,
                       d=d, groups=groups, cd=cd, interp=interp, rope=None, w=None)

    if layer_cache is not None or n_extra or (cross and cached_cross):
        # the prior component: column 0, recomputed at every call, never cached
        if cross and cached_cross:
            _, m0, b = terms(lat)
        b_all = b
        k0, v0 = project(m0, k_w, k_b, 1).to(cd), project(m0, v_w, v_b, 1).to(cd)
        if n_extra:
            v0 = torch.cat([v0, v0.new_zeros(B, Hkv, 1, n_extra)], dim=-1)
        Nk = k_ext.shape[2]
        keys = torch.cat([k0, k_ext[..., :d].to(cd)], dim=2)
        bvec = torch.cat([per_key(b_all, slice(0, 1)), k_ext[..., d].to(cd)], dim=2)
        values = torch.cat([v0, v_ext.to(cd)], dim=2)
    keys, values = repeat_kv(keys, groups), repeat_kv(values, groups)
    bvec = repeat_kv(bvec.unsqueeze(-1), groups).squeeze(-1)

    if padding_only:
        bias = None
    elif cross and cached_cross:
        bias = hf_mask_bias(raw_mask, B, Nt, Nk, False, cd, x.device)
    else:
        bias = tok_bias  # already built over the past + new keys, which are all Nk key columns
    token_mask = bias if (cross and cached_cross) else tok_bias  # the token columns each query sees (None: all Nk)
    position_bias = None
    if ad.arg_position_bias:
        position_bias = call.get(ad.arg_position_bias)
        if position_bias is None:
            if getattr(self, "has_relative_attention_bias", False):
                position_bias = self.compute_bias(Nt, Nk, device=x.device, past_seen_tokens=past)
            else:
                position_bias = torch.zeros(1, Hq, Nt, Nk, device=x.device, dtype=x.dtype)
        pb = position_bias[..., -Nt:, :Nk].to(cd)
        bias = pb if bias is None else bias + pb
    if bias is not None:
        bias = torch.cat([torch.zeros(bias.shape[:-1] + (1,), dtype=cd, device=x.device), bias], dim=-1)

    S_tok = (nvib.head_logvar_bias.double().exp() + sigma2) if heads else tok_log_s.exp()  # [Hkv, P] with per-head knobs, else [P]
    S_0 = _prior_logvar(nvib).double().exp() + sigma2
    prior_logit = None
    if self._nv.formula == "exact" and not sampled:
        G = _derived(self, f"G{cd}", (k_w,), lambda: head_matrices(k_w.double(), None, 1.0 / S_0 - 1.0 / S_tok, d).to(cd).repeat_interleave(groups, 0),
                     fresh=heads)
        prior_logit = -0.5 * torch.einsum("bhti,hij,bhtj->bht", q, G, q)

    if nvib.prior_scaling == "length":  # the prior's pseudo-count times the tokens each query sees (docs/MATH.md section 4)
        if sampled:
            raise ValueError("NV attention: prior_scaling='length' applies to the evaluation form (mean prediction) only")
        if token_mask is None:
            seen = torch.full((B, Hq, Nt), float(Nk), dtype=cd, device=x.device)
        else:
            seen = (~hidden(token_mask)).sum(-1).to(cd).expand(B, Hq, Nt)
        prior_logit = seen.clamp_min(1.0).log() if prior_logit is None else prior_logit + seen.clamp_min(1.0).log()

    dropout_p = ad.dropout_p(self) if training else 0.0
    if getattr(self.config, "_attn_implementation", "sdpa") == "eager":
        # the reference computation, which also returns the weights (prior column first)
        out, w = attend(q, keys, bvec, values, scale=scale, bias=bias, prior_logit=prior_logit, dropout_p=dropout_p)
        w0 = w[..., :1]
    else:
        # fast path: one SDPA call; per-key terms as a key channel, the prior weight as a value channel
        w = None
        if not sampled:
            ind = torch.zeros(B, Hq, Nk + 1, 1, dtype=cd, device=x.device)
            ind[:, :, 0] = 1.0
            values = torch.cat([values, ind], dim=-1)
        causal_trick = raw_mask is None and self.is_causal and not cross and Nt == Nk and Nt > 1 and position_bias is None
        q_extra = k_extra = None
        if prior_logit is not None:
            q_extra = prior_logit.unsqueeze(-1)
            k_extra = torch.zeros(B, Hq, Nk + 1, 1, dtype=cd, device=x.device)
            k_extra[:, :, 0] = 1.0
        out = sdpa_nv(q, keys, bvec, values, scale=scale, attn_mask=None if causal_trick else bias,
                      causal_prior_first=causal_trick, q_extra=q_extra, k_extra=k_extra, dropout_p=dropout_p)
        w0 = out[..., -1:] if not sampled else None
    # the sampled form has no value interpolation (interp and heads are False there too)
    return _finish(self, ad, x, out, q, w0=None if sampled else w0, k_w=k_w, v_w=v_w, S_tok=S_tok, sigma2=sigma2, d=d,
                   groups=groups, cd=cd, interp=interp, rope=rope, w=w, position_bias=position_bias, heads=heads)


def _cached_fast_path(self: nn.Module, layer_cache, cross: bool, sampled: bool, heads: bool, n_extra: int, ad: Adapter) -> bool:
    """Whether a self-attention call with a KV cache takes the decoding fast path: evaluation form,
    layer-wide knobs, the ``"paper"`` formula, the constant prior, no position bias, SDPA attention
    (every other case takes the general path, which computes the same)."""
    return (layer_cache is not None and not cross and not sampled and not heads and not n_extra and ad.arg_position_bias is None
            and self._nv.formula == "paper" and self.nvib.prior_scaling == "constant"
            and getattr(self.config, "_attn_implementation", "sdpa") != "eager")


def _prior_column_deps(self: nn.Module, *weights: Tensor | None) -> tuple[Tensor, ...]:
    """What the prior column depends on besides the NVIB's knobs (:func:`_derived` adds the token and prior variances)."""
    p = self.nvib.prior
    return (*(w for w in weights if w is not None), p.mean, p.log_alpha, self.nvib.alpha_bias)


def _prior_column(self: nn.Module, terms, k_w, k_b, v_w, v_b, Hkv: int, d: int, cd: torch.dtype) -> tuple[Tensor, Tensor]:
    """The prior component's extended key ``[k_0 | b_0]`` and value ``[v_0 | 1]`` (``[1, Hkv, 1, d + 1]``
    each, in ``cd``), as the general path computes them from the latent's column 0."""
    nvib = self.nvib
    lat0 = nvib(torch.zeros(1, 0, nvib.dim, dtype=nvib.mu_proj.weight.dtype, device=k_w.device))
    _, m0, b = terms(lat0)
    k0 = F.linear(m0.to(k_w.dtype), k_w, k_b).view(1, 1, Hkv, d).transpose(1, 2).to(cd)
    v0 = F.linear(m0.to(v_w.dtype), v_w, v_b).view(1, 1, Hkv, d).transpose(1, 2).to(cd)
    b = b.masked_fill(~torch.isfinite(b), EXCLUDED)  # the prior component switched off: excluded, as the general path does
    b0 = b[:, :1].to(cd)[:, None, :, None].expand(1, Hkv, 1, 1)
    return torch.cat([k0, b0], -1), torch.cat([v0, torch.ones_like(v0[..., :1])], -1)


def _prior_logvar(nvib: nn.Module) -> Tensor:
    """``[P]`` log variance of the prior component, as the NVIB's latent holds it (its column 0)."""
    return nvib.prior.var.log().to(nvib.mu_proj.weight.dtype)


def extended_sdpa(q: Tensor, k0e: Tensor, v0e: Tensor, keys: Tensor, values: Tensor, b: Tensor | None, *, bias: Tensor | None,
                   causal: bool, scale: float, groups: int, reuse: bool = False) -> Tensor:
    """Denoising attention in one SDPA call over ``[prior | tokens]`` with the per-key terms as a key channel.

    ``q [B, Hq, Nt, d]`` (in the compute dtype); the prior column's ``k0e`` ``[k_0 | b_0]`` and ``v0e``
    ``[v_0 | 1]`` (``[1, Hkv, 1, d + 1]``); token ``keys`` ``[B, Hkv, N, d]`` with their terms ``b [B, N]``,
    or ``[B, Hkv, N, d + 1]`` already extended (``b`` None, a KV cache's ``[k | b]``); ``values [B, Hkv, N, d]``.
    Queries, keys and values are written once into buffers of one width, a multiple of 8 (zero channels
    change nothing; SDPA is faster on it). ``bias``: additive ``[.., Nt, N + 1]`` or None; ``causal``:
    query ``t`` sees the prior and tokens ``0..t`` (``Nt = N``, no bias), through SDPA's own causal mask
    and one dummy query row. Returns ``[B, Hq, Nt, W]``: the context in ``[..., :d]``, the prior's weight in
    ``[..., d]``. ``reuse`` (only without a graph: SDPA's backward would read them): the three buffers are the
    thread's scratch buffers (:func:`~nvformer.core.scratch.scratch`), not fresh tensors.
    """
    B, Hq, Nt, d = q.shape
    Hkv, N = keys.shape[1], keys.shape[2]
    W = padded_width(d + 1)
    cd, dev = q.dtype, q.device
    off = 1 if causal else 0
    shapes = [(B, Hq, Nt + off, W), (B, Hkv, N + 1, W), (B, Hkv, N + 1, W)]
    bufs = scratch("extended-sdpa", shapes, cd, dev) if reuse else None
    q_e, keys_e, values_e = bufs if bufs else (torch.empty(s, dtype=cd, device=dev) for s in shapes)
    q_e[:, :, off:, :d] = q
    q_e[:, :, off:, d] = 1.0 / scale
    q_e[:, :, off:, d + 1 :] = 0.0
    if off:
        q_e[:, :, 0] = 0.0
    keys_e[:, :, :1, : d + 1] = k0e
    if b is None:
        keys_e[:, :, 1:, : d + 1] = keys
    else:
        keys_e[:, :, 1:, :d] = keys
        keys_e[:, :, 1:, d] = b.to(cd)[:, None, :]
    keys_e[..., d + 1 :] = 0.0
    values_e[:, :, :1, : d + 1] = v0e
    values_e[:, :, 1:, :d] = values
    values_e[:, :, 1:, d:] = 0.0
    values_e[:, :, :1, d + 1 :] = 0.0
    out = F.scaled_dot_product_attention(q_e, keys_e, values_e, attn_mask=bias, is_causal=causal, scale=scale, enable_gqa=groups > 1)
    return out[:, :, 1:] if off else out


_FLASH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def split_prior_applicable(q: Tensor, groups: int, no_cache: bool, rows_see_tokens: bool, needs_grad: bool) -> bool:
    """Whether :func:`split_prior_sdpa` can serve a fused call: no KV cache, every query sees a token, one
    query head per key head, no gradient, and a CPU tensor (the one SDPA kernel that returns its
    log-normaliser; elsewhere :func:`extended_sdpa` serves)."""
    return _FLASH_LSE is not None and no_cache and rows_see_tokens and groups == 1 and not needs_grad and q.device.type == "cpu"


def split_prior_sdpa(q: Tensor, k0e: Tensor, v0e: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None, *, causal: bool, scale: float,
                     b0_rel: Tensor) -> tuple[Tensor, Tensor]:
    """Denoising attention over ``[prior | tokens]`` as one SDPA call over the tokens alone plus the prior column
    in closed form: what :func:`extended_sdpa` computes, without widening the heads by the term channel.

    With token logits ``s_i = scale q.k_i + b_i`` and ``L`` their log-sum-exp (returned by the kernel), and the
    prior's ``s_0 = scale q.k_0 + b_0``, the softmax over both gives the prior the weight ``w_0 = sigmoid(s_0 - L)``
    and ``ctx = (1 - w_0) ctx_tok + w_0 v_0``. Only differences of terms matter: ``mask`` carries the token terms
    less a common constant (and the attention mask; ``[B, N]`` when it is one row per sequence, or additive
    ``[.., Nt, N]``, or None when they are all 0 and nothing is masked), ``b0_rel [H]`` the prior's less the same.

    ``q [B, H, Nt, d]``, ``keys``/``values [B, H, N, d]``, all in the compute dtype; ``k0e [1, H, 1, d + 1]`` is
    ``[k_0 | b_0]``, ``v0e [1, H, 1, d + 1]`` ``[v_0 | 1]``; ``causal``: query ``t`` sees tokens ``0..t`` (the prior
    always), on top of ``mask``. Check :func:`split_prior_applicable` first.
    Returns ``(ctx [B, H, Nt, d], w_0 [B, H, Nt, 1])``.
    """
    d = q.shape[-1]
    if mask is not None:
        mask = mask.to(q.dtype)
        mask = mask[:, None, None, :] if mask.dim() == 2 else mask
    ctx, lse = _FLASH_LSE(q, keys, values, 0.0, causal, attn_mask=mask, scale=scale)
    bufs = scratch("prior-logit", [q.shape], q.dtype, q.device)  # q . k_0 without a fresh [B, H, Nt, d] product
    s0 = (torch.mul(q, k0e[..., :d], out=bufs[0]) if bufs else q * k0e[..., :d]).sum(-1)
    w0 = torch.sigmoid(s0.mul_(scale).add_(b0_rel.to(q.dtype)[:, None]).sub_(lse)).unsqueeze(-1)
    return ctx.lerp_(v0e[..., :d], w0), w0


def input_terms(x: Tensor, A: Tensor | None, L: Tensor | None, cd: torch.dtype) -> Tensor | None:
    """The fused path's per-key terms less their constant, ``sum_p A_p x_p^2 + L_p x_p`` ``[B, N]`` in ``cd`` for
    ``x [B, N, P]`` (:func:`~nvformer.core.keyform.input_key_terms`; None when ``A`` and ``L`` are both None: all 0).
    One weighted sum with nothing to cancel (``A`` and ``L`` are differences taken on ``[P]`` vectors), summed in
    ``cd``; without a graph its ``[B, N, P]`` temporary is the thread's scratch buffer."""
    if A is None and L is None:
        return None
    xf = x.to(cd)
    if A is None:
        return xf @ L
    if torch.is_grad_enabled():
        return torch.linalg.vecdot(xf * A if L is None else torch.addcmul(L, xf, A), xf)
    bufs = scratch("input-terms", [xf.shape], cd, xf.device)
    out = {"out": bufs[0]} if bufs else {}
    t = torch.mul(xf, A, **out) if L is None else torch.addcmul(L, xf, A, **out)
    return t.mul_(xf).sum(-1)


def _fused_applicable(self: nn.Module, cross: bool, sampled: bool, heads: bool, n_extra: int, ad: Adapter) -> bool:
    """Whether a self-attention call takes the fused path (:func:`_fused_forward`): the evaluation form
    with layer-wide knobs, the ``"paper"`` formula, the constant prior, a structured NVIB (mean
    projection ``c I``, shared token variance: the identity initialisation's form) whose parameters
    need no gradient, no threshold, the prior component on, no position bias, no rotary value
    channels, SDPA attention. Every other call takes the general path, which computes the same."""
    nvib = self.nvib
    if (cross or sampled or heads or n_extra or ad.arg_position_bias is not None or self._nv.formula != "paper"
            or nvib.prior_scaling != "constant" or nvib.alpha_threshold is not None or not nvib.prior_component
            or getattr(self.config, "_attn_implementation", "sdpa") == "eager"):
        return False
    if torch.is_grad_enabled() and any(p.requires_grad for p in nvib.parameters()):
        return False  # nvformer.fit_knobs: the gradient must reach the NVIB's parameters through its latent
    c, zero = nvib._structure()
    return c is not None and zero


def _fused_terms(self: nn.Module, k_w: Tensor, k_b: Tensor | None, v_w: Tensor, v_b: Tensor | None, cd: torch.dtype) -> tuple:
    """The fused path's projections and per-key coefficients (:func:`~nvformer.core.keyform.input_key_terms`):
    ``(kw, kb, vw, vb, A, L, const)``, the projections being the original weights themselves when the input
    scaling is 1 and the mean bias 0 (the identity), ``A`` and ``L`` None when all zero."""
    nvib = self.nvib
    scaling, mean_shift, A, L, const = input_key_terms(nvib._structure()[0], nvib.mu_proj.bias, nvib.logvar_proj.bias, nvib.alpha_lin,
                                                       nvib.alpha_quad, 1.0 / float(self.scaling), nvib.min_var, cd)
    identity = bool((scaling == 1.0).all()) and not bool(mean_shift.any())

    def proj(w: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if identity:
            return w, bias
        shifted = w.double() @ mean_shift + (0.0 if bias is None else bias.double())
        return (w.double() * scaling).to(w.dtype), shifted.to(w.dtype)

    return (*proj(k_w, k_b), *proj(v_w, v_b), A.to(cd) if bool(A.any()) else None, L.to(cd) if bool(L.any()) else None, const)


def _fused_forward(self: nn.Module, ad: Adapter, x: Tensor, q: Tensor, raw_mask: Tensor | None, rope, terms, weights: tuple, cache_obj,
                   layer_cache, *, d: int, scale: float, cd: torch.dtype, Hkv: int, groups: int, interp: bool):
    """Self-attention in the evaluation form (:func:`_fused_applicable`), with or without a KV cache,
    computed from the token inputs ``x [B, N, P]`` directly (:func:`_fused_terms`): no latent is
    formed, keys and values are the original projections of ``x`` at the identity, the per-key terms
    one weighted sum over ``x`` (a constant at the identity), the prior column comes from a per-module
    cache. A KV cache receives ``[k | b]`` and ``v`` as in the general path. The latent is built only
    if ``last_latent`` is read."""
    nvib = self.nvib
    B, N, _ = x.shape
    k_w, k_b, v_w, v_b = weights
    past = cache_obj.get_seq_length(self.layer_idx) if layer_cache is not None else 0
    causal = layer_cache is None and self.is_causal and raw_mask is None and N > 1
    tok_bias, kpm, bias, rows_see_tokens = _mask_terms(raw_mask, B, N, past + N, self.is_causal, cd, x.device, causal, layer_cache is None)
    # without gradients, one key for every cache below: the whole NVIB's state and the projections' versions
    state = None if torch.is_grad_enabled() else _nvib_state(nvib)
    key = None if state is None else state + tuple(v for w in weights if w is not None for v in (w._version, w.data_ptr()))
    deps = () if key else (*(w for w in weights if w is not None), nvib.mu_proj.weight, nvib.mu_proj.bias, nvib.alpha_lin, nvib.alpha_quad,
                           nvib.alpha_bias)
    kw, kb, vw, vb, A, L, const = _derived(self, f"F{cd}", deps, lambda: _fused_terms(self, k_w, k_b, v_w, v_b, cd), key=key)
    p0_deps = () if key else _prior_column_deps(self, k_w, k_b, v_w, v_b)
    k0e, v0e = _derived(self, f"fP0{cd}", p0_deps, lambda: _prior_column(self, terms, k_w, k_b, v_w, v_b, Hkv, d, cd), key=key)
    keys = F.linear(x, kw, kb).view(B, N, Hkv, d).transpose(1, 2)
    if rope is not None:
        keys = apply_rope(keys, *rope)
    values = F.linear(x, vw, vb).view(B, N, Hkv, d).transpose(1, 2)
    self.last_latent = _DeferredLatent(self, x, kpm, state)
    shortcut = A is None and L is None and not interp and rows_see_tokens  # every token's term is `const`: maybe the tokens alone
    reach = (lambda: _derived(self, f"R0{cd}", p0_deps, lambda: _prior_reach(k0e), key=key)) if shortcut else None
    if shortcut and layer_cache is None and prior_weight_underflows(q, keys, reach(), const, scale):
        # equal per-key terms and a prior weight of exactly 0 for every query: the attention over the tokens alone,
        # as the original module computes it (no extended channels, the original mask)
        out = F.scaled_dot_product_attention(q, keys.to(cd), values.to(cd), attn_mask=None if causal else tok_bias, is_causal=causal,
                                             scale=scale, enable_gqa=groups > 1)
        return _output(self, ad, x, out, None, None)
    b_rel = input_terms(x, A, L, cd)  # the per-key terms less `const` (None: all 0)
    compiled = self.__dict__.get("_nv_compiled")
    needs_grad = torch.is_grad_enabled() and any(v.requires_grad for v in (x, q, keys, values))
    if compiled is None and split_prior_applicable(q, groups, layer_cache is None, rows_see_tokens, needs_grad):
        tok = None if causal else tok_bias  # SDPA's own causal mask serves a causal call
        if b_rel is None:
            mask = tok
        elif bias is None and not causal:  # the mask hides padded keys only: with the terms, one [B, N] row
            mask = b_rel if kpm is None else b_rel.masked_fill(kpm, EXCLUDED)
        else:
            mask = b_rel[:, None, None, :] if tok is None else tok + b_rel[:, None, None, :]
        ctx, w0 = split_prior_sdpa(q, k0e, v0e, keys.to(cd), values.to(cd), mask, causal=causal, scale=scale,
                                   b0_rel=k0e[0, :, 0, d].double() - const)
        return _fused_finish(self, ad, x, ctx, w0, q, k_w, v_w, scale=scale, d=d, groups=groups, cd=cd, interp=interp)
    if b_rel is None:
        b = None if layer_cache is not None else torch.full((B, N), const, dtype=torch.float64, device=x.device)  # None: written below
    else:
        b = b_rel.double() + const
    if kpm is not None and b is not None:
        b = b.masked_fill(kpm, EXCLUDED)
    if layer_cache is not None:  # keys in `cd` with their terms as one more channel, values in their own dtype
        before = _key_bound_before(self, layer_cache, past, const) if shortcut else None
        k_ext = torch.empty(B, Hkv, N, d + 1, dtype=cd, device=x.device)
        k_new = k_ext[..., :d]
        k_new.copy_(keys)
        if b is None:  # every term is `const` (padding EXCLUDED), rounded to `cd` as the general path rounds b
            k_ext[..., d] = const
            if kpm is not None:
                k_ext[..., d].masked_fill_(kpm[:, None, :], EXCLUDED)
        else:
            k_ext[..., d] = b.to(cd)[:, None, :]
        keys, values = layer_cache.update(k_ext, values, self.layer_idx)
        b = None
        k_norm = _cached_key_norm(self, before, keys, k_new, kpm, past, const, tok_bias, d) if shortcut else None
        if k_norm is not None and prior_weight_underflows(q, k_norm, reach(), const, scale):
            # the same with a cache, when every cached key's term is `const` too (no knob change since it was cached)
            out = F.scaled_dot_product_attention(q, keys[..., :d], values.to(cd), attn_mask=tok_bias, scale=scale, enable_gqa=groups > 1)
            return _output(self, ad, x, out, None, None)
    if compiled is not None:
        out = compiled(q, k0e, v0e, keys, values, b, bias=bias, causal=causal, scale=scale, groups=groups)
    else:
        out = extended_sdpa(q, k0e, v0e, keys, values, b, bias=bias, causal=causal, scale=scale, groups=groups, reuse=not torch.is_grad_enabled())
    return _fused_finish(self, ad, x, out, out[..., d : d + 1], q, k_w, v_w, scale=scale, d=d, groups=groups, cd=cd, interp=interp)


def _fused_finish(self: nn.Module, ad: Adapter, x: Tensor, out: Tensor, w0: Tensor, q: Tensor, k_w: Tensor, v_w: Tensor, *, scale: float,
                  d: int, groups: int, cd: torch.dtype, interp: bool):
    """:func:`_finish` for a fused call: the context in ``out[..., :d]``, the prior's weight ``w0``, no rotary channels."""
    S_tok = _token_terms(self.nvib, 1.0 / scale)[2].exp() if interp else None
    return _finish(self, ad, x, out, q, w0=w0, k_w=k_w, v_w=v_w, S_tok=S_tok, sigma2=1.0 / scale, d=d, groups=groups, cd=cd,
                   interp=interp, rope=None, w=None)


def _prior_reach(k0e: Tensor) -> tuple[float, float]:
    """``(b_0, |k_0|)`` of the prior column's extended key ``[k_0 | b_0]`` (the largest over heads), for :func:`~nvformer.core.keyform.prior_weight_underflows`."""
    return float(k0e[..., -1].max()), float(k0e[..., :-1].norm(dim=-1).amax())


class _KeyBound(NamedTuple):
    """What a fused decoding step knows of one layer's cached keys, kept from step to step so that a step
    looks at its new keys only: it describes the cache's keys tensor ``keys`` (a weak reference) at
    in-place version ``version``, cached with per-key term ``const``."""

    keys: weakref.ref
    version: int
    const: float
    norm: float  # the largest cached key norm
    excluded: tuple  # ((offset, [B, 1|H, n] bool), ...): cached entries whose term is EXCLUDED (padding); every other is `const`


def _layer_keys(cache, idx: int) -> Tensor | None:
    """The keys tensor a Hugging Face cache holds for layer ``idx`` (None if it has none to show)."""
    layers = getattr(cache, "layers", None)
    return getattr(layers[idx], "keys", None) if layers is not None and idx < len(layers) else None


def _key_bound_before(self: nn.Module, layer_cache, past: int, const: float) -> tuple[float, tuple] | None:
    """``(norm, excluded)`` of the keys cached before this step (:class:`_KeyBound`), or None when the kept
    bound no longer describes them: another cache, a reordered or cropped one (new tensors), keys written in
    place, a knob change (another ``const``)."""
    if past == 0:
        return 0.0, ()
    kept: _KeyBound | None = self.__dict__.get("_nv_key_bound")
    prev = _layer_keys(layer_cache, self.layer_idx)
    if kept is None or prev is None or kept.keys() is not prev or prev._version != kept.version or kept.const != const:
        return None
    return kept.norm, kept.excluded


def _cached_key_norm(self: nn.Module, before: tuple[float, tuple] | None, keys: Tensor, k_new: Tensor, kpm: Tensor | None,
                     past: int, const: float, tok_bias: Tensor | None, d: int) -> float | None:
    """The largest cached key norm when every cached key ``keys [B, H, N, d + 1]`` (after this step's update with
    ``k_new [B, H, n, d]``, padded where ``kpm [B, n]``) has the term ``const`` in the cache's extra channel, or
    is padding (``EXCLUDED``) that the mask ``tok_bias`` hides from every query: the mask alone then says what
    the terms say. None otherwise. Keeps the layer's :class:`_KeyBound` for the next step. With a bound from the
    last step only the new keys are looked at; otherwise the whole cache is."""
    self.__dict__.pop("_nv_key_bound", None)
    if before is None:
        b = keys[..., d]
        same = b == torch.tensor(const, dtype=b.dtype).item()  # `const` as the cache holds it (in b's dtype)
        excluded = ()
        if not bool(same.all()):
            excl = b == EXCLUDED
            if not bool((excl | same).all()):
                return None
            excluded = ((0, excl),)
        norm = max_norm(keys[..., :d])
    else:
        norm, excluded = max(before[0], max_norm(k_new)), before[1] + (((past, kpm[:, None, :]),) if kpm is not None and bool(kpm.any()) else ())
    if not all(_padding_unseen(tok_bias, off, excl) for off, excl in excluded):
        return None
    self.__dict__["_nv_key_bound"] = _KeyBound(weakref.ref(keys), keys._version, const, norm, excluded)
    return norm


_UNSEEN_MEMO: list = [None]  # (mask, {id(excl): (excl, offset, answer)}) for the last mask: every layer asks of the same padding


def _padding_unseen(tok_bias: Tensor | None, off: int, excl: Tensor) -> bool:
    """Whether the mask ``tok_bias [B|1, 1|H, Nt, N]`` hides the cached keys ``off + j`` marked in ``excl [B, 1|H, n]``
    from every query (remembered per mask object and ``excl``)."""
    if tok_bias is None:
        return False
    memo = _UNSEEN_MEMO[0]
    if memo is None or memo[0]() is not tok_bias:
        memo = _UNSEEN_MEMO[0] = (weakref.ref(tok_bias), {})
    hit = memo[1].get(id(excl))
    if hit is not None and hit[0] is excl and hit[1] == off:
        return hit[2]
    unseen = hidden(tok_bias[..., off : off + excl.shape[-1]]).all(dim=-2)
    answer = excl.shape[-1] <= tok_bias.shape[-1] - off and not bool((excl & ~unseen).any())
    memo[1][id(excl)] = (excl, off, answer)
    return answer


_MASK_MEMO: list = [None]  # the last mask's terms: every layer of a forward receives the same mask object


def _mask_terms(raw_mask: Tensor | None, B: int, Nt: int, Nk: int, is_causal: bool, cd: torch.dtype, device: torch.device,
                causal: bool, no_cache: bool) -> tuple[Tensor | None, Tensor | None, Tensor | None, bool]:
    """``(tok_bias, kpm, bias, rows_see_tokens)`` of a fused call: the mask as an additive bias over the
    token columns (:func:`~nvformer.core.masks.hf_mask_bias`), the new keys' padding ``[B, Nt]`` (None:
    none), SDPA's mask over ``[prior | tokens]`` (None when SDPA's causal mask serves (``causal``) or
    when the mask only hides padded keys, which their per-key terms already exclude), and whether every
    query sees at least one token. Computed once per mask object and version (a forward passes one
    mask to every layer)."""
    key = (raw_mask._version if raw_mask is not None else None, B, Nt, Nk, is_causal, cd, device, causal, no_cache)
    memo = _MASK_MEMO[0]
    if raw_mask is not None and memo is not None and memo[0]() is raw_mask and memo[1] == key:
        return memo[2]
    tok_bias = hf_mask_bias(raw_mask, B, Nt, Nk, is_causal, cd, device)
    kpm = key_padding_from_bias(tok_bias, B, Nt)
    bias = None
    if tok_bias is not None and not causal:
        if not (no_cache and not is_causal and _hides_only_padding(tok_bias, kpm)):
            bias = torch.cat([tok_bias.new_zeros(tok_bias.shape[:-1] + (1,)), tok_bias], dim=-1)
    rows_see_tokens = tok_bias is None or bool((~hidden(tok_bias)).any(-1).all())
    result = (tok_bias, kpm, bias, rows_see_tokens)
    if raw_mask is not None:
        _MASK_MEMO[0] = (weakref.ref(raw_mask, _forget_mask), key, result)
    return result


def _hides_only_padding(tok_bias: Tensor, kpm: Tensor | None) -> bool:
    """Whether the token mask ``tok_bias [B|1, 1|H, Nt, N]`` hides exactly the padded keys ``kpm [B, N]``
    from every query: the per-key terms exclude those already, so SDPA needs no mask."""
    return kpm is not None and bool((hidden(tok_bias) == kpm[:, None, None, :]).all())


def _forget_mask(ref: weakref.ref) -> None:
    """Drop the memo's tensors with the mask they came from (called when the mask is freed)."""
    memo = _MASK_MEMO[0]
    if memo is not None and memo[0] is ref:
        _MASK_MEMO[0] = None


class _DeferredLatent:
    """The latent of a fused forward (:func:`_fused_forward`), built from its input when first read
    (``module.last_latent``), with the NVIB as it was: reading it after the knobs, the prior or the NVIB's
    weights changed is an error, not another latent."""

    def __init__(self, module: nn.Module, x: Tensor, kpm: Tensor | None, state: tuple | None = None) -> None:
        self.module, self.x, self.kpm = module, x, kpm
        self.grad = torch.is_grad_enabled()
        self.state = _nvib_state(module.nvib) if state is None else state

    def build(self):
        nvib = self.module.nvib
        if _nvib_state(nvib) != self.state:
            raise RuntimeError(f"{type(self.module).__name__}.last_latent: the NVIB changed (knobs, prior or weights) since the "
                               "forward that produced it; run the forward again")
        with torch.set_grad_enabled(self.grad):
            return nvib(self.x.to(nvib.mu_proj.weight.dtype), key_padding_mask=self.kpm)


def _nvib_state(nvib: nn.Module) -> tuple:
    """The NVIB's knob version with the in-place version and storage of every parameter and prior buffer: what a
    deferred latent checks before it is built (one walk over the module tree, as ``parameters()`` would make)."""
    return (nvib.version, *_tensor_versions(nvib, "_parameters"), *_tensor_versions(nvib.prior, "_buffers"))


def _tensor_versions(root: nn.Module, kind: str) -> list[int]:
    """``(version, data_ptr)`` of every tensor in ``kind`` (``"_parameters"`` or ``"_buffers"``) of ``root`` and
    its submodules, flattened (a plain walk: ``parameters()``' generators cost more than the work on a hot path)."""
    out, stack = [], [root]
    while stack:
        m = stack.pop()
        out += [v for t in getattr(m, kind).values() if t is not None for v in (t._version, t.data_ptr())]
        stack.extend(c for c in m._modules.values() if c is not None)
    return out


def _get_last_latent(self: nn.Module):
    lat = self.__dict__.get("_nv_latent")
    if isinstance(lat, _DeferredLatent):
        lat = lat.build()
        self.__dict__["_nv_latent"] = lat
    return lat


def _set_last_latent(self: nn.Module, value) -> None:
    self.__dict__["_nv_latent"] = value


last_latent = property(_get_last_latent, _set_last_latent, doc="The NVLatent of the last forward (built on first read after a fused forward), or None.")


def _finish(self: nn.Module, ad: Adapter, x: Tensor, out: Tensor, q: Tensor, *, w0: Tensor | None, k_w: Tensor, v_w: Tensor,
            S_tok: Tensor, sigma2: float, d: int, groups: int, cd: torch.dtype, interp: bool, rope, w: Tensor | None,
            position_bias: Tensor | None = None, heads: bool = False):
    """The evaluation form's value interpolation on the attention output ``out`` (context in ``[..., :d]``,
    the prior weight ``w0``; none for the sampled form), the output projection, and the original
    module's return value."""
    ctx = out[..., :d]
    if w0 is not None:
        def m0() -> Tensor:
            S_0 = _prior_logvar(self.nvib).double().exp() + sigma2
            return head_matrices(k_w.double(), v_w.double(), (S_0 - sigma2) / S_0, d).to(cd).repeat_interleave(groups, 0)

        def mt() -> Tensor:
            return head_matrices(k_w.double(), v_w.double(), (S_tok - sigma2) / S_tok, d).to(cd).repeat_interleave(groups, 0)

        # the prior's weight is exactly 0 in floating point at the identity (alpha_tau = 1e4): its term (and gradient) is 0
        prior_seen = bool(w0.any())
        if prior_seen and interp and rope is None:  # both matrices in one batched product: (1 - w0) M_tok q + w0 M_0 q
            both = _derived(self, f"MM{cd}", (k_w, v_w), lambda: torch.cat([mt(), m0()], dim=1), fresh=heads)
            if not torch.is_grad_enabled():
                return _output(self, ad, x, _interpolate_no_graph(both, q, ctx, w0), position_bias, w)
            r = torch.einsum("hij,bhtj->bhti", both, q)
            return _output(self, ad, x, ctx + torch.lerp(r[..., :d], r[..., d:], w0), position_bias, w)
        if prior_seen:
            ctx = ctx + w0 * torch.einsum("hij,bhtj->bhti", _derived(self, f"M0{cd}", (k_w, v_w), m0), q)
        if interp:
            Mt = _derived(self, f"Mt{cd}", (k_w, v_w), mt, fresh=heads)
            if rope is not None:
                half = d // 2
                c_cos, c_sin = out[..., d : d + half], out[..., d + half : d + 2 * half]
                qt = inverse_rope_combine(q, torch.cat([c_cos, c_cos], -1), torch.cat([c_sin, c_sin], -1))
            else:
                qt = (1.0 - w0) * q  # the prior is visible in every row, so token weights sum to 1 - w0
            ctx = ctx + torch.einsum("hij,bhtj->bhti", Mt, qt)
    return _output(self, ad, x, ctx, position_bias, w)


def _interpolate_no_graph(both: Tensor, q: Tensor, ctx: Tensor, w0: Tensor) -> Tensor:
    """``ctx + (1 - w0) M_tok q + w0 M_0 q`` without a graph, for ``both = [M_tok | M_0]`` ``[H, 2d, d]``, ``q``, ``ctx``
    ``[B, H, Nt, d]`` and ``w0 [B, H, Nt, 1]``: one batched product over the heads into the thread's scratch buffer
    (a view of ``q``, no copy), and the result written in ``[B, Nt, H, d]`` memory, the output projection's layout
    (returned as its ``[B, H, Nt, d]`` view, so the reshape before the projection copies nothing)."""
    B, H, Nt, d = q.shape
    qh = q.permute(1, 0, 2, 3).reshape(H, B * Nt, d)  # a view when q is the projection's [B, Nt, H, d] output transposed
    bufs = scratch("interpolation", [(H, B * Nt, 2 * d)], q.dtype, q.device)
    r = torch.bmm(qh, both.transpose(1, 2), out=bufs[0]) if bufs else torch.bmm(qh, both.transpose(1, 2))
    r = r.view(H, B, Nt, 2 * d).permute(1, 0, 2, 3)
    out = torch.empty(B, Nt, H, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    torch.lerp(r[..., :d], r[..., d:], w0, out=out)
    return out.add_(ctx)


def _output(self: nn.Module, ad: Adapter, x: Tensor, ctx: Tensor, position_bias: Tensor | None, w: Tensor | None):
    """The output projection of the context ``ctx [B, H, Nt, d]`` and the original module's return value."""
    B, Hq, Nt, d = ctx.shape
    ctx = ctx.transpose(1, 2).reshape(B, Nt, Hq * d).to(x.dtype)
    result = ad.out(self, ctx)
    if ad.returns_position_bias:
        return result, position_bias, w if w is None else w.to(x.dtype)
    return result, w if w is None else w.to(x.dtype)

"""The NVIB layer (Henderson & Fehr, ICLR 2023): docs/MATH.md section 1 (layer, sampling) and
section 4 (identity initialisation and knobs). It returns a :class:`~nvformer.core.latent.NVLatent`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..config import Knobs
from ..core.checks import check_choice, check_float, check_int, check_mask, check_real, check_tensor, compute_dtype
from ..core.keyform import weighted_sq_sum
from ..core.knobmap import identity_values
from ..core.latent import NVLatent
from ..core.masks import masked_log_softmax
from ..core.prior import Prior
from ..core.sampling import sample_log_gamma

__all__ = ["NVIB"]


class NVIB(nn.Module):
    """Nonparametric variational information bottleneck over a set of vectors.

    Maps ``x [B, N, P]`` to an :class:`NVLatent` with ``N + 1`` components (prior first):

        mu_i = W_mu x_i + b_mu,   log var_i = W_s x_i + b_s,
        log a_i = w_lin . x_i + w_quad . (x_i * x_i) + b_a   (+ log a_i of the previous layer).

    The parameters start at the identity initialisation of docs/MATH.md section 4, set by the knobs:
    ``W_mu = mu_tau I``, ``b_mu = (1 - mu_tau) mu_p``, ``W_s = 0``,
    ``b_s = log((stdev_tau sigma_p)^2)`` (floored at ``log(min_var)``), ``w_lin = 0``,
    ``w_quad = scale / 2`` (``= 1/(2 sqrt d)``), ``b_a = alpha_tau * s_alpha``. At
    ``mu_tau=1, stdev_tau=0`` and large ``alpha_tau`` denoising attention over the latent equals
    standard attention over ``x``.

    Training: ``z_i = mu_i + sigma_i eps`` and ``pi ~ Dir(a)`` (implicit reparameterisation); with
    ``kappa > 1`` every component is split into ``kappa`` copies with pseudo-count ``a_i / kappa``
    and its own Gaussian sample (drawing ``pi ~ Dir(a_i/kappa, ...)`` over all copies is the same
    distribution as ``rho ~ Dir(a)`` times per-component ``Dir(a_i/kappa 1_kappa)`` sub-weights).
    Evaluation: ``z = mu``, ``pi = a / sum(a)``, optionally thresholded; with ``prediction =
    "sample"`` (:func:`nvformer.set_prediction`) evaluation forwards sample as in training, for
    a Monte Carlo predictive.

    Args:
        dim: ``P``, width of the input vectors.
        num_heads: heads of the attention that reads the latent (sets ``d = dim // num_heads``).
        prior: a :class:`Prior` of width ``P``; default ``Prior(dim)`` (standard normal,
            ``log alpha_p = 0``, ``s_alpha = 1``).
        delta: strength of the conditional prior in ``KL_D`` (pseudo-count per token).
        kappa: samples per component in training.
        alpha_tau, stdev_tau, mu_tau: the knobs (docs/MATH.md section 4). The layer's defaults are the
            authors' for training from scratch (``alpha_tau = 10``); :func:`nvformer.convert` uses
            :data:`nvformer.IDENTITY` (``alpha_tau = 1e4``) for pretrained models.
        head_dim: ``d`` if it is not ``dim // num_heads``.
        scale: the attention logit scale (default ``1 / sqrt(d)``); ``1/scale`` plays ``sqrt(d)``.
        prior_component: include the prior component (False masks it out: "prior switched off").
        alpha_threshold: evaluation only; drop token components whose pseudo-count is
            ``<= alpha_threshold`` (``threshold_mode="absolute"``, the authors use 0.1) or whose
            weight ``a_i / sum a`` is ``<= alpha_threshold`` (``"relative"``). None = keep all.
            The prior component is never dropped.
        min_var: floor of the variances (so ``stdev_tau = 0`` stays finite in ``KL_G``).
        prior_scaling: ``"constant"`` or ``"length"`` (:class:`nvformer.NVConfig`; read by the Hugging Face
            attention, which scales the prior's pseudo-count by the tokens each query sees).
        kv_heads: the key/value heads of the attention (grouped-query attention), addressed by per-head knobs.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        prior: Prior | None = None,
        delta: float = 1.0,
        kappa: int = 1,
        *,
        alpha_tau: float = 10.0,
        stdev_tau: float = 0.0,
        mu_tau: float = 1.0,
        head_dim: int | None = None,
        scale: float | None = None,
        prior_component: bool = True,
        alpha_threshold: float | None = None,
        threshold_mode: str = "absolute",
        min_var: float = 1e-20,
        prior_scaling: str = "constant",
        kv_heads: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        where = "NVIB"
        check_int(dim, "dim", where)
        check_int(num_heads, "num_heads", where)
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"{where}: `dim` ({dim}) must be divisible by `num_heads` ({num_heads}), or pass `head_dim`")
            head_dim = dim // num_heads
        check_int(head_dim, "head_dim", where)
        check_int(kappa, "kappa", where)
        check_choice(threshold_mode, "threshold_mode", where, ("absolute", "relative"))
        check_choice(prior_scaling, "prior_scaling", where, ("constant", "length"))
        self.prior_scaling = prior_scaling  # "length": the attention adds log(visible tokens) to the prior column (HF evaluation form)
        if alpha_threshold is not None:
            check_real(alpha_threshold, "alpha_threshold", where, above=0.0)
        if prior is not None and not isinstance(prior, Prior):
            raise ValueError(f"{where}: `prior` must be a nvformer.Prior or None, got {type(prior).__name__}")
        if kv_heads is not None:
            check_int(kv_heads, "kv_heads", where)
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        self.kv_heads = kv_heads or num_heads  # the key/value heads that per-head knobs address (grouped-query attention: fewer)
        self.scale = check_real(scale, "scale", where, above=0.0) if scale is not None else 1.0 / math.sqrt(head_dim)
        self.delta = check_real(delta, "delta", where, minimum=0.0)
        self.kappa = kappa
        self.prior_component = bool(prior_component)
        self.alpha_threshold = alpha_threshold
        self.threshold_mode = threshold_mode
        self.min_var = check_real(min_var, "min_var", where, above=0.0)
        self.prediction = "mean"  # evaluation forwards: "mean" (z = mu) or "sample" (as in training)
        try:
            knobs = Knobs(alpha_tau=alpha_tau, stdev_tau=stdev_tau, mu_tau=mu_tau)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        self.alpha_tau, self.stdev_tau, self.mu_tau = knobs.alpha_tau, knobs.stdev_tau, knobs.mu_tau

        factory = {"device": device, "dtype": dtype}
        if prior is None:
            prior = Prior(dim)
        prior.check_dim(dim, where)
        self.prior = prior.to(**{k: v for k, v in factory.items() if v is not None})
        self.mu_proj = nn.Linear(dim, dim, **factory)
        self.logvar_proj = nn.Linear(dim, dim, **factory)
        self.alpha_lin = nn.Parameter(torch.empty(dim, **factory))
        self.alpha_quad = nn.Parameter(torch.empty(dim, **factory))
        self.alpha_bias = nn.Parameter(torch.empty((), **factory))
        # per-head knobs (set_head_knobs): None, or float64 [kv_heads] values of alpha_tau and stdev_tau that replace the
        # layer's for the attention of each key/value head; their parameters as buffers that follow .to() (not saved in
        # state_dict: adapters save the knobs)
        self.head_alpha_tau: Tensor | None = None
        self.head_stdev_tau: Tensor | None = None
        self.register_buffer("head_alpha_bias", None, persistent=False)
        self.register_buffer("head_logvar_bias", None, persistent=False)
        self.reset_parameters()

    # ------------------------------------------------------------------ knobs and initialisation
    @torch.no_grad()
    def identity_parameters(self, knobs: Knobs | None = None, prior: Prior | None = None, who: str = "NVIB") -> dict[str, Tensor] | None:
        """The vector parameters the identity initialisation (docs/MATH.md section 4) gives for
        ``knobs`` and ``prior`` (default: the current ones), checked before anything is written:
        ``{"mu_bias", "logvar_bias", "alpha_bias"}``; None on the meta device.

        A knob whose parameters are not finite in the parameters' dtype (``stdev_tau = 1e200``:
        ``(stdev_tau sigma_p)^2`` overflows) is a ``ValueError`` naming it.
        """
        k = self.knobs() if knobs is None else knobs
        p = self.prior if prior is None else prior
        if p.mean.device.type == "meta" or self.mu_proj.weight.device.type == "meta":
            return None
        dtype = self.mu_proj.weight.dtype
        values = identity_values(k.alpha_tau, k.stdev_tau, k.mu_tau, p.mean, p.var, p.log_alpha_std, self.min_var)
        for knob, value, quantity in (("mu_tau", values.pop("mu_weight"), "the mean projection mu_tau I"),
                                      ("mu_tau", values["mu_bias"], "the token means' bias (1 - mu_tau) mu_p"),
                                      ("stdev_tau", values["logvar_bias"], "the token variances (stdev_tau sigma_p)^2"),
                                      ("alpha_tau", values["alpha_bias"], "the pseudo-count bias alpha_tau s_alpha")):
            if not bool(torch.isfinite(value.to(dtype)).all()):
                raise ValueError(f"{who}: knob `{knob}` = {getattr(k, knob)} makes {quantity} overflow {dtype} with this prior")
        return values

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Apply the identity initialisation of docs/MATH.md section 4 with the current knobs and prior."""
        values = self.identity_parameters()
        self.version = getattr(self, "version", 0) + 1  # lets callers invalidate derived caches
        if values is None:
            return
        eye = torch.eye(self.dim, device=self.mu_proj.weight.device, dtype=self.mu_proj.weight.dtype)
        self.mu_proj.weight.copy_(eye * self.mu_tau)
        self.mu_proj.bias.copy_(values["mu_bias"])
        self.logvar_proj.weight.zero_()
        self.logvar_proj.bias.copy_(values["logvar_bias"])
        self.alpha_lin.zero_()
        self.alpha_quad.fill_(self.scale / 2.0)
        self.alpha_bias.copy_(values["alpha_bias"])
        self._apply_head_knobs()

    @torch.no_grad()
    def _apply_head_knobs(self) -> None:
        """The per-head parameters of the per-head knobs (identity initialisation per head), or none."""
        if self.head_alpha_tau is None:
            self.head_alpha_bias = self.head_logvar_bias = None
            return
        p, dev = self.prior, self.mu_proj.weight.device
        v = identity_values(self.head_alpha_tau.to(dev)[:, None], self.head_stdev_tau.to(dev)[:, None], 1.0, p.mean, p.var, p.log_alpha_std,
                            self.min_var)
        self.head_alpha_bias = v["alpha_bias"][:, 0].to(torch.float64)
        self.head_logvar_bias = v["logvar_bias"].to(compute_dtype(self.mu_proj.weight.dtype))

    def check_head_knobs(self, alpha_tau=None, stdev_tau=None, who: str = "NVIB.set_head_knobs") -> tuple[Tensor, Tensor]:
        """The per-head values :meth:`set_head_knobs` would set (float64 ``[kv_heads]`` each), checked;
        nothing changes."""
        vals = []
        for name, given, layer in (("alpha_tau", alpha_tau, self.alpha_tau), ("stdev_tau", stdev_tau, self.stdev_tau)):
            try:
                t = torch.as_tensor(layer if given is None else given, dtype=torch.float64).detach().cpu()
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"{who}: `{name}` must be numbers, got {given!r}") from None
            if t.dim() == 0:
                t = t.expand(self.kv_heads)
            if t.shape != (self.kv_heads,):
                raise ValueError(f"{who}: `{name}` must be a number or {self.kv_heads} values (one per key/value head), got shape {tuple(t.shape)}")
            if not bool(torch.isfinite(t).all()) or (name == "stdev_tau" and bool((t < 0).any())):
                raise ValueError(f"{who}: `{name}` must be finite{' and >= 0' if name == 'stdev_tau' else ''}, got {t.tolist()}")
            vals.append(t.clone())
        for a, sd in zip(*vals):
            self.identity_parameters(self.knobs().replace(alpha_tau=float(a), stdev_tau=float(sd)), who=who)
        return vals[0], vals[1]

    def set_head_knobs(self, alpha_tau=None, stdev_tau=None) -> None:
        """Per-head knobs: one ``alpha_tau`` and one ``stdev_tau`` per key/value head (sequences or
        tensors of length :attr:`kv_heads`; a number = the same for every head; a missing one takes
        the layer's value), which replace the layer's knobs for the attention of that head in the
        evaluation form (docs/MATH.md section 4). ``set_head_knobs()`` (both None) removes them.
        Checked before anything changes; heads set to the layer's knobs compute what the layer computes."""
        if alpha_tau is None and stdev_tau is None:
            self.head_alpha_tau = self.head_stdev_tau = None
        else:
            self.head_alpha_tau, self.head_stdev_tau = self.check_head_knobs(alpha_tau, stdev_tau)
        self.version = getattr(self, "version", 0) + 1
        self._apply_head_knobs()

    def head_knobs(self) -> dict[str, list[float]] | None:
        """``{"alpha_tau": [...], "stdev_tau": [...]}`` per key/value head, or None (the layer's knobs for every head)."""
        if self.head_alpha_tau is None:
            return None
        return {"alpha_tau": self.head_alpha_tau.tolist(), "stdev_tau": self.head_stdev_tau.tolist()}

    def set_knobs(self, *, alpha_tau: float | None = None, stdev_tau: float | None = None, mu_tau: float | None = None) -> None:
        """Change the knobs (None = keep) and re-apply the identity initialisation (overwrites the
        projections). All values, and the parameters they give, are checked before anything changes."""
        try:
            knobs = self.knobs().replace(alpha_tau=alpha_tau, stdev_tau=stdev_tau, mu_tau=mu_tau)
        except ValueError as e:
            raise ValueError(f"NVIB.set_knobs: {e}") from None
        self.identity_parameters(knobs, who="NVIB.set_knobs")
        self.alpha_tau, self.stdev_tau, self.mu_tau = knobs.alpha_tau, knobs.stdev_tau, knobs.mu_tau
        self.reset_parameters()

    def set_prior(self, prior: Prior) -> None:
        """Replace the prior (same width) and re-apply the identity initialisation; the prior is
        checked (width, and finite parameters with the current knobs) before anything changes."""
        if not isinstance(prior, Prior):
            raise ValueError(f"NVIB.set_prior: `prior` must be a nvformer.Prior, got {type(prior).__name__}")
        prior.check_dim(self.dim, "NVIB.set_prior")
        self.identity_parameters(prior=prior, who="NVIB.set_prior")
        self.prior = prior.to(device=self.mu_proj.weight.device, dtype=self.mu_proj.weight.dtype)
        self.reset_parameters()

    def _structure(self) -> tuple[float | None, bool]:
        """``(c, zero)``: ``mu_proj.weight == c I`` (else None) and ``logvar_proj.weight == 0``.

        Cached by the weights' in-place version counters, so an optimiser step or
        ``load_state_dict`` is noticed and the check (one pass over two ``P x P`` matrices) reruns.
        """
        wm, ws = self.mu_proj.weight, self.logvar_proj.weight
        key = (wm._version, ws._version, wm.data_ptr(), ws.data_ptr())
        cached = getattr(self, "_structure_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        if wm.device.type == "meta":
            result: tuple[float | None, bool] = (None, False)
        else:
            with torch.no_grad():
                c = float(wm[0, 0])
                diag_ok = bool((wm.diagonal() == c).all()) and bool((wm.count_nonzero() == (self.dim if c != 0 else 0)))
                result = (c if diag_ok else None, bool((ws == 0).all()))
        self._structure_cache = (key, result)
        return result

    def knobs(self) -> Knobs:
        """The current :class:`~nvformer.Knobs`."""
        return Knobs(alpha_tau=self.alpha_tau, stdev_tau=self.stdev_tau, mu_tau=self.mu_tau)

    @torch.no_grad()
    def in_identity_form(self) -> bool:
        """True if every parameter is what :meth:`reset_parameters` sets from the current knobs and
        prior (so knobs and prior alone describe this layer: nothing was trained)."""
        ref = NVIB(self.dim, self.num_heads, self.prior, self.delta, self.kappa, head_dim=self.head_dim, scale=self.scale,
                   min_var=self.min_var, device=self.mu_proj.weight.device, dtype=self.mu_proj.weight.dtype, **self.knobs().as_dict())
        mine, theirs = self.state_dict(), ref.state_dict()
        return all(torch.equal(mine[k], theirs[k]) for k in theirs)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}, kappa={self.kappa}, "
            f"delta={self.delta}, alpha_tau={self.alpha_tau}, stdev_tau={self.stdev_tau}, mu_tau={self.mu_tau}"
            + ("" if self.head_alpha_tau is None else ", per-head knobs")
        )

    # ------------------------------------------------------------------ forward
    def log_alpha_tokens(self, x: Tensor) -> Tensor:
        """``[B, N]`` log pseudo-counts of the token components, in float64.

        float64 because the quadratic term must cancel ``-scale ||z||^2 / 2`` in the attention
        logits after a large bias ``alpha_tau * s_alpha`` has been added (in float32 a bias of
        1000 would leave only 1e-4 of resolution). Products stay in the input's dtype (at least
        float32) and only the sums are float64 (:func:`nvformer.core.keyform.weighted_sq_sum`).
        """
        cd = compute_dtype(x.dtype)
        xf = x.to(cd)
        lin = (xf * self.alpha_lin.to(cd)).sum(-1, dtype=torch.float64)
        return lin + weighted_sq_sum(xf, self.alpha_quad.to(cd)) + self.alpha_bias.to(torch.float64)

    def _prior_rows(self, batch: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        p = self.prior
        mu0 = p.mean.to(like.dtype).expand(batch, 1, self.dim)
        lv0 = p.var.log().to(like.dtype).expand(batch, 1, self.dim)
        la0 = p.log_alpha.to(torch.float64).expand(batch, 1)
        return mu0, lv0, la0

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, alpha_skip: Tensor | None = None) -> NVLatent:
        """Build the latent.

        Args:
            x: ``[B, N, P]`` input vectors.
            key_padding_mask: ``[B, N]`` bool, True = pad (as in ``nn.MultiheadAttention``).
            alpha_skip: ``[B, N]`` log pseudo-counts of the token components of the previous NV
                layer, added to this layer's (alpha skip connection, Behjati et al. 2023).

        Returns:
            :class:`NVLatent` with ``C = N + 1`` components.
        """
        where = "NVIB.forward"
        check_tensor(x, "x", 3, where, f"[B, N, {self.dim}]")
        check_float(x, "x", where)
        if x.shape[-1] != self.dim:
            raise ValueError(f"{where}: `x` must have shape [B, N, {self.dim}], got {tuple(x.shape)}")
        B, N, _ = x.shape
        if key_padding_mask is not None:
            check_mask(key_padding_mask, "key_padding_mask", (B, N), where, allow_float=False)
        if alpha_skip is not None and (not isinstance(alpha_skip, Tensor) or tuple(alpha_skip.shape) != (B, N)):
            raise ValueError(f"{where}: `alpha_skip` must be a tensor of shape [{B}, {N}], got {tuple(getattr(alpha_skip, 'shape', ())) or type(alpha_skip).__name__}")

        c, zero_s = self._structure()
        # structured shortcuts (no P x P matmul) when no gradient must reach the weights
        no_weight_grad = not (torch.is_grad_enabled() and self.mu_proj.weight.requires_grad)
        if c is not None and no_weight_grad:
            mu_tok = torch.addcmul(self.mu_proj.bias, x, torch.full((), c, dtype=x.dtype, device=x.device)) if c != 1.0 else x + self.mu_proj.bias
        else:
            mu_tok = self.mu_proj(x)
        shared = None
        if zero_s and not (torch.is_grad_enabled() and self.logvar_proj.weight.requires_grad):
            shared = self.logvar_proj.bias.clamp_min(math.log(self.min_var))
            lv_tok = shared.expand(B, N, self.dim)
        else:
            lv_tok = self.logvar_proj(x).clamp_min(math.log(self.min_var))
        la_tok = self.log_alpha_tokens(x)
        if alpha_skip is not None:
            la_tok = la_tok + alpha_skip.to(la_tok.dtype)
        mu0, lv0, la0 = self._prior_rows(B, mu_tok)
        mu = torch.cat([mu0, mu_tok], dim=1)
        if shared is not None:  # one [1, C, P] tensor, expanded over the batch (no B x C x P copy)
            logvar = torch.cat([lv0[:1], shared.to(lv0.dtype).expand(1, N, self.dim)], dim=1).expand(B, N + 1, self.dim)
        else:
            logvar = torch.cat([lv0, lv_tok], dim=1)
        log_alpha = torch.cat([la0, la_tok], dim=1)

        prior_pad = torch.full((B, 1), not self.prior_component, dtype=torch.bool, device=x.device)
        tok_pad = key_padding_mask if key_padding_mask is not None else torch.zeros(B, N, dtype=torch.bool, device=x.device)
        pad_mask = torch.cat([prior_pad, tok_pad], dim=1)
        log_alpha = log_alpha.masked_fill(pad_mask, float("-inf"))

        if self.training or self.prediction == "sample":
            if self.head_alpha_tau is not None:
                raise ValueError("NVIB: per-head knobs apply to the evaluation form (mean prediction) only; remove them "
                                 "(set_head_knobs()) to train or sample")
            lat = self._sample(mu, logvar, log_alpha, pad_mask)
        else:
            lat = self._mean_latent(mu, logvar, log_alpha, pad_mask)
        lat.shared_logvar = shared
        return lat

    def _sample(self, mu: Tensor, logvar: Tensor, log_alpha: Tensor, pad_mask: Tensor) -> NVLatent:
        k = self.kappa
        mu_k = mu.repeat_interleave(k, dim=1) if k > 1 else mu
        lv_k = logvar.repeat_interleave(k, dim=1) if k > 1 else logvar
        z = mu_k + torch.exp(0.5 * lv_k) * torch.randn_like(mu_k)
        la_k = log_alpha.repeat_interleave(k, dim=1) - math.log(k) if k > 1 else log_alpha
        pad_k = pad_mask.repeat_interleave(k, dim=1) if k > 1 else pad_mask
        log_g = sample_log_gamma(la_k.masked_fill(pad_k, float("-inf")))
        log_pi = masked_log_softmax(log_g, pad_k)
        return NVLatent(mu, logvar, log_alpha, pad_mask, z, log_pi, log_w=log_g, kappa=k, copies=k, sampled=True)

    def _mean_latent(self, mu: Tensor, logvar: Tensor, log_alpha: Tensor, pad_mask: Tensor) -> NVLatent:
        keep_pad = pad_mask
        if self.alpha_threshold is not None:
            thr = math.log(self.alpha_threshold)
            score = log_alpha if self.threshold_mode == "absolute" else masked_log_softmax(log_alpha, pad_mask)
            drop = score <= thr
            drop[:, 0] = False
            keep_pad = pad_mask | drop
        log_pi = masked_log_softmax(log_alpha, keep_pad)
        log_w = log_alpha.masked_fill(keep_pad, float("-inf"))
        return NVLatent(mu, logvar, log_alpha, pad_mask, mu, log_pi, log_w=log_w, kappa=self.kappa, copies=1, sampled=False)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def sample_prior(self, lengths: Tensor) -> NVLatent:
        """Draw a latent from the prior (docs/MATH.md section 2, "Prior sampling").

        Sequence ``b`` gets ``n_b = lengths[b]`` token components ``z ~ N(mu_p, var_p)`` treated as
        points (variance ``min_var``) with equal pseudo-counts ``(alpha_p + delta (K - 1)) / K``,
        ``K = n_b + 1``, after the usual prior component.

        Args:
            lengths: ``[B]`` int, number of token components per sequence (>= 1).

        Returns:
            :class:`NVLatent` with ``C = max(lengths) + 1`` components, unsampled form.
        """
        if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise ValueError(f"NVIB.sample_prior: `lengths` must be a 1-D integer tensor, got "
                             f"{getattr(lengths, 'dtype', type(lengths).__name__)} {tuple(getattr(lengths, 'shape', ()))}")
        if bool((lengths < 1).any()):
            raise ValueError("NVIB.sample_prior: every entry of `lengths` must be >= 1")
        p = self.prior
        device, dtype = p.mean.device, self.mu_proj.weight.dtype
        lengths = lengths.to(device)
        B, n = lengths.shape[0], int(lengths.max())
        std = p.var.sqrt().to(dtype)
        z_tok = p.mean.to(dtype) + std * torch.randn(B, n, self.dim, device=device, dtype=dtype)
        tok_pad = torch.arange(n, device=device)[None, :] >= lengths[:, None]
        K = (lengths + 1).to(torch.float64)
        alpha_p = p.log_alpha.to(torch.float64).exp()
        la_tok = torch.log((alpha_p + self.delta * (K - 1)) / K)[:, None].expand(B, n)
        mu0, lv0, la0 = self._prior_rows(B, z_tok)
        mu = torch.cat([mu0, z_tok], 1)
        logvar = torch.cat([lv0, torch.full_like(z_tok, math.log(self.min_var))], 1)
        prior_pad = torch.full((B, 1), not self.prior_component, dtype=torch.bool, device=device)
        pad_mask = torch.cat([prior_pad, tok_pad], 1)
        log_alpha = torch.cat([la0, la_tok], 1).masked_fill(pad_mask, float("-inf"))
        return self._mean_latent(mu, logvar, log_alpha, pad_mask)

"""The NVAE: a Transformer VAE whose latent is an NVIB posterior (Henderson & Fehr, ICLR 2023).

``tokens -> Transformer encoder -> bottleneck -> Transformer decoder (causal self-attention,
cross-attention over the bottleneck's memory) -> next-token logits``. Three bottlenecks share
everything else, so the baselines differ from the NVAE only where they should:

* ``"nvib"`` (the NVAE): :class:`nvformer.NVIB` turns the encoder's vectors into a
  Dirichlet-process posterior (one Gaussian component per token plus the prior component, with
  pseudo-counts); every decoder layer's cross-attention is denoising attention over it
  (:func:`nvformer.denoising_attention`: samples in training, the Gaussian integrated out at
  evaluation). Loss ``CE + lambda_G(t) KL_G + lambda_D(t) KL_D`` with ``CE`` the mean token
  cross-entropy of the batch and the KL terms averaged over sentences (the authors' scaling:
  ``KL_G`` averages over the ``P`` dimensions).
* ``"none"``: a plain Transformer autoencoder (cross-attention over the encoder's vectors).
* ``"pooled"``: a single-vector Gaussian VAE: mean-pooled encoder vectors give ``mu`` and
  ``log var`` of one latent vector ``z`` (standard normal prior), the decoder attends to ``z``.
  Loss ``CE + lambda_G(t) KL(N(mu, var) || N(0, I))``, the KL averaged over the ``P``
  dimensions as ``KL_G`` is, so that ``lambda_G`` means the same for both VAEs.

``lambda(t)`` follows :func:`anneal` (constant, monotonic or cyclic). Sampling from the prior
draws the number of latent vectors from the training length distribution
(``NVAE.length_counts``, filled by :meth:`NVAE.observe_lengths`) and decodes greedily;
interpolation mixes the two sentences' components with weights ``pi_1 (1 - t)`` and ``pi_2 t``
(for ``"pooled"``: ``z = (1 - t) mu_1 + t mu_2``; for ``"none"``: the same mixture weights over
the union of the two memories).

Token conventions follow a Marian-style tokenizer (as ``nvformer_studies`` trains):
sequences end with EOS; the decoder starts from ``start_id`` (the pad id).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.checks import check_choice, check_dropout, check_int, check_mapping, check_real
from ..core.kl import kl_dirichlet, kl_gaussian
from ..core.latent import NVLatent
from ..core.masks import masked_log_softmax
from ..core.prior import Prior
from ..nn.functional import denoising_attention
from ..nn.nvib import NVIB

__all__ = ["BOTTLENECKS", "SCHEDULES", "NVAE", "NVAEConfig", "NVAEOutput", "Memory", "anneal", "gaussian_kl_standard", "sinusoidal_positions"]

BOTTLENECKS = ("nvib", "none", "pooled")
SCHEDULES = ("constant", "monotonic", "cyclic")


# ---------------------------------------------------------------------------------------------- pure functions


def anneal(step: int, schedule: str, *, warmup: int = 1000, cycle: int = 2000, ratio: float = 0.5) -> float:
    """KL weight factor in ``[0, 1]`` at optimiser step ``step`` (multiply by ``lambda``).

    ``constant``: 1. ``monotonic``: ``min(1, step / warmup)``. ``cyclic`` (Fu et al. 2019):
    within each cycle of ``cycle`` steps, ``min(1, tau / ratio)`` with ``tau`` the position in the
    cycle in ``[0, 1)``: a linear ramp over the first ``ratio`` of the cycle, then 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"anneal: `schedule` must be one of {SCHEDULES}, got {schedule!r}")
    if step < 0:
        raise ValueError(f"anneal: `step` must be >= 0, got {step}")
    if schedule == "constant":
        return 1.0
    if schedule == "monotonic":
        if warmup < 1:
            raise ValueError(f"anneal: `warmup` must be >= 1, got {warmup}")
        return min(1.0, step / warmup)
    if cycle < 1 or not 0 < ratio <= 1:
        raise ValueError(f"anneal: need `cycle` >= 1 and 0 < `ratio` <= 1, got {cycle}, {ratio}")
    tau = (step % cycle) / cycle
    return min(1.0, tau / ratio)


def sinusoidal_positions(n: int, dim: int, *, device=None, dtype=torch.float32) -> Tensor:
    """``[n, dim]`` sinusoidal position encodings (Vaswani et al. 2017): even columns
    ``sin(t / 10000^(2i/dim))``, odd columns ``cos`` of the same angle."""
    if dim % 2:
        raise ValueError(f"sinusoidal_positions: `dim` must be even, got {dim}")
    t = torch.arange(n, device=device, dtype=torch.float64)[:, None]
    inv = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)
    out = torch.zeros(n, dim, device=device, dtype=torch.float64)
    out[:, 0::2] = torch.sin(t * inv)
    out[:, 1::2] = torch.cos(t * inv)
    return out.to(dtype)


def gaussian_kl_standard(mu: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mu, diag exp(logvar)) || N(0, I))`` averaged over the last dimension: ``[...]``."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean(-1)


# ---------------------------------------------------------------------------------------------- config / outputs


@dataclass(frozen=True)
class NVAEConfig:
    """Sizes and regularisation of an :class:`NVAE`.

    Args:
        vocab_size: tokenizer vocabulary.
        bottleneck: ``"nvib"`` (NVAE), ``"none"`` (autoencoder) or ``"pooled"`` (Gaussian VAE).
        d_model, heads, encoder_layers, decoder_layers, ffn, dropout: Transformer sizes.
        max_length: longest sequence (tokens, EOS included) the model accepts and generates.
        pad_id, eos_id, start_id: token ids (decoder start defaults to the pad id, as Marian).
        prior_var, prior_log_alpha: the NVIB prior ``N(0, prior_var I)``, pseudo-count ``exp(prior_log_alpha)``.
        delta, kappa: NVIB conditional-prior strength and samples per component.
        alpha_threshold: evaluation-time pruning of components with pseudo-count ``<= threshold``
            (absolute, the authors' 0.1); None keeps all.
        init_stdev: initial posterior standard deviation as a fraction of the prior's (the NVIB
            ``stdev_tau`` knob): small, so that reconstruction is learnt before the annealed KL
            widens the posteriors (at 1 the latent starts as noisy as the prior and the decoder
            learns to ignore it).
        lambda_g, lambda_d: KL weights (``lambda_d`` is unused except by ``"nvib"``).
        schedule, warmup, cycle, ratio: KL annealing (:func:`anneal`).
    """

    vocab_size: int
    bottleneck: str = "nvib"
    d_model: int = 128
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    ffn: int = 512
    dropout: float = 0.1
    max_length: int = 64
    pad_id: int = 0
    eos_id: int = 1
    start_id: int = 0
    prior_var: float = 1.0
    prior_log_alpha: float = 0.0
    delta: float = 1.0
    kappa: int = 1
    alpha_threshold: float | None = 0.1
    init_stdev: float = 0.1
    lambda_g: float = 0.1
    lambda_d: float = 0.1
    schedule: str = "monotonic"
    warmup: int = 400
    cycle: int = 300
    ratio: float = 0.5

    def __post_init__(self) -> None:
        where = "NVAEConfig"
        check_choice(self.bottleneck, "bottleneck", where, BOTTLENECKS)
        check_choice(self.schedule, "schedule", where, SCHEDULES)
        for name in ("vocab_size", "d_model", "heads", "encoder_layers", "decoder_layers", "ffn", "max_length", "kappa", "warmup", "cycle"):
            check_int(getattr(self, name), name, where)
        if self.d_model % self.heads or self.d_model % 2:
            raise ValueError(f"{where}: `d_model` ({self.d_model}) must be even and divisible by `heads` ({self.heads})")
        for name in ("pad_id", "eos_id", "start_id"):
            if check_int(getattr(self, name), name, where, minimum=0) >= self.vocab_size:
                raise ValueError(f"{where}: `{name}` must be a token id below `vocab_size` ({self.vocab_size}), got {getattr(self, name)}")
        check_dropout(self.dropout, where)
        for name in ("prior_var", "init_stdev"):
            check_real(getattr(self, name), name, where, above=0.0)
        for name in ("delta", "lambda_g", "lambda_d"):
            check_real(getattr(self, name), name, where, minimum=0.0)
        check_real(self.prior_log_alpha, "prior_log_alpha", where)
        check_real(self.ratio, "ratio", where, above=0.0, maximum=1.0)
        if self.alpha_threshold is not None:
            check_real(self.alpha_threshold, "alpha_threshold", where, above=0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NVAEConfig:
        """Strict: a mapping of the fields (``vocab_size`` required); unknown fields and invalid values are errors naming them."""
        where = "NVAEConfig.from_dict"
        kw = check_mapping(d, (f.name for f in fields(cls)), where)
        if "vocab_size" not in kw:
            raise ValueError(f"{where}: `vocab_size` is required")
        return cls(**kw)


@dataclass
class Memory:
    """What the decoder's cross-attention reads.

    For ``"nvib"``: ``latent`` (an :class:`NVLatent`). Otherwise ``z [B, M, P]``, ``pad [B, M]``
    (True = padding) and optional ``log_w [B, M]`` additive log-weights (interpolation mixtures).
    """

    latent: NVLatent | None = None
    z: Tensor | None = None
    pad: Tensor | None = None
    log_w: Tensor | None = None

    @property
    def batch(self) -> int:
        return (self.latent.mu if self.latent is not None else self.z).shape[0]


@dataclass
class NVAEOutput:
    """``logits [B, T, V]``; ``loss`` (scalar: token-mean cross-entropy + weighted mean KL terms);
    per-sentence ``recon`` (summed token cross-entropy), ``kl_g``, ``kl_d`` ``[B]``; ``tokens [B]``
    (target tokens per sentence); ``memory``; ``weights`` = the KL weights used."""

    logits: Tensor
    loss: Tensor
    recon: Tensor
    kl_g: Tensor
    kl_d: Tensor
    tokens: Tensor
    memory: Memory
    weights: tuple[float, float]


# ---------------------------------------------------------------------------------------------- modules


class CrossAttention(nn.Module):
    """Multi-head cross-attention over a :class:`Memory`: denoising attention over an NV latent,
    or scaled dot-product attention with optional additive log-weights over plain vectors."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: Tensor, memory: Memory) -> Tensor:
        B, T, P = x.shape
        q = self.q_proj(x).view(B, T, self.heads, P // self.heads).transpose(1, 2)
        p = self.dropout if self.training else 0.0
        if memory.latent is not None:
            out, _ = denoising_attention(q, memory.latent, self.k_proj.weight, self.k_proj.bias, self.v_proj.weight, self.v_proj.bias,
                                         dropout_p=p, need_weights=False)
        else:
            M = memory.z.shape[1]
            k = self.k_proj(memory.z).view(B, M, self.heads, -1).transpose(1, 2)
            v = self.v_proj(memory.z).view(B, M, self.heads, -1).transpose(1, 2)
            bias = torch.zeros(B, M, dtype=q.dtype, device=q.device)
            if memory.log_w is not None:
                bias = bias + memory.log_w.to(q.dtype)
            if memory.pad is not None:
                bias = bias.masked_fill(memory.pad, float("-inf"))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, None, None, :], dropout_p=p)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, P))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: causal self-attention, cross-attention over the memory, FFN."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross = CrossAttention(dim, heads, dropout)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(3))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: Memory, pad: Tensor | None) -> Tensor:
        T = x.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        h = self.norms[0](x)
        x = x + self.drop(self.self_attn(h, h, h, attn_mask=causal, key_padding_mask=pad, need_weights=False)[0])
        x = x + self.drop(self.cross(self.norms[1](x), memory))
        return x + self.drop(self.ffn(self.norms[2](x)))


class NVAE(nn.Module):
    """Transformer VAE with an NVIB bottleneck, or one of the two baselines (module docstring).

    Args:
        config: :class:`NVAEConfig`.

    Shapes: ``input_ids [B, S]`` (each row ends with EOS, right-padded with ``pad_id``),
    ``attention_mask [B, S]`` (1 = token). Every method follows the module's device and dtype.
    """

    def __init__(self, config: NVAEConfig) -> None:
        super().__init__()
        c = self.config = config
        P = c.d_model
        self.embed = nn.Embedding(c.vocab_size, P, padding_idx=c.pad_id)
        with torch.no_grad():  # unit-scale inputs after the sqrt(P) factor; O(1) logits from the tied output layer
            nn.init.normal_(self.embed.weight, std=P**-0.5)
            self.embed.weight[c.pad_id].zero_()
        layer = nn.TransformerEncoderLayer(P, c.heads, c.ffn, c.dropout, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.encoder_layers, norm=nn.LayerNorm(P), enable_nested_tensor=False)
        self.decoder = nn.ModuleList(DecoderLayer(P, c.heads, c.ffn, c.dropout) for _ in range(c.decoder_layers))
        self.final_norm = nn.LayerNorm(P)
        self.drop = nn.Dropout(c.dropout)
        self.register_buffer("positions", sinusoidal_positions(c.max_length + 1, P), persistent=False)
        self.register_buffer("length_counts", torch.zeros(c.max_length + 1, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        if c.bottleneck == "nvib":
            prior = Prior(P, var=c.prior_var, log_alpha=c.prior_log_alpha)
            self.nvib = NVIB(P, c.heads, prior=prior, delta=c.delta, kappa=c.kappa, alpha_tau=0.0, stdev_tau=c.init_stdev, mu_tau=1.0,
                             alpha_threshold=c.alpha_threshold)
            with torch.no_grad():  # learned pseudo-counts log a = w . x + b (the paper's exp-linear form), a = 1 at start
                self.nvib.alpha_quad.zero_()
                nn.init.normal_(self.nvib.alpha_lin, std=0.02)
                nn.init.normal_(self.nvib.logvar_proj.weight, std=0.02)
        elif c.bottleneck == "pooled":
            self.to_mu = nn.Linear(P, P)
            self.to_logvar = nn.Linear(P, P)
            with torch.no_grad():
                self.to_logvar.bias.fill_(2 * math.log(c.init_stdev))

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def _embed(self, ids: Tensor) -> Tensor:
        if ids.shape[1] > self.config.max_length + 1:
            raise ValueError(f"NVAE: sequences of at most {self.config.max_length} tokens, got {ids.shape[1]}")
        pos = self.positions[: ids.shape[1]].to(self.embed.weight.dtype)
        return self.drop(self.embed(ids) * math.sqrt(self.config.d_model) + pos)

    def _check_inputs(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        if input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"NVAE: `input_ids` must be a [B, S] integer tensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_id
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"NVAE: `attention_mask` {tuple(attention_mask.shape)} does not match `input_ids` {tuple(input_ids.shape)}")
        attention_mask = attention_mask.bool()
        if not bool(attention_mask.any(-1).all()):
            raise ValueError("NVAE: every sequence needs at least one token")
        return attention_mask

    @torch.no_grad()
    def observe_lengths(self, attention_mask: Tensor) -> None:
        """Add the token counts of a batch (``attention_mask [B, S]``, 1 = token) to the training
        length distribution, which :meth:`sample_prior` draws the number of latent vectors from."""
        if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2 or attention_mask.is_floating_point():
            raise ValueError(f"NVAE.observe_lengths: `attention_mask` must be a [B, S] bool or integer tensor, got "
                             f"{getattr(attention_mask, 'dtype', type(attention_mask).__name__)} {tuple(getattr(attention_mask, 'shape', ()))}")
        n = attention_mask.long().sum(-1).clamp_max(self.config.max_length)
        self.length_counts += torch.bincount(n, minlength=self.config.max_length + 1).to(self.length_counts)

    def kl_weights(self, step: int | None = None) -> tuple[float, float]:
        """``(lambda_G, lambda_D)`` at ``step`` (default: the model's own step counter)."""
        c = self.config
        f = anneal(int(self.step) if step is None else step, c.schedule, warmup=c.warmup, cycle=c.cycle, ratio=c.ratio)
        return c.lambda_g * f, c.lambda_d * f

    # ------------------------------------------------------------------ encode / decode
    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Memory, Tensor, Tensor]:
        """``(memory, kl_g [B], kl_d [B])``. In training mode the NVIB / pooled latent is sampled;
        in evaluation mode it is the posterior mean (NVIB: the evaluation form, components with
        pseudo-count below ``alpha_threshold`` pruned)."""
        mask = self._check_inputs(input_ids, attention_mask)
        pad = ~mask
        h = self.encoder(self._embed(input_ids), src_key_padding_mask=pad)
        B = h.shape[0]
        zero = h.new_zeros(B)
        c = self.config
        if c.bottleneck == "nvib":
            lat = self.nvib(h, key_padding_mask=pad)
            return Memory(latent=lat), kl_gaussian(lat, self.nvib.prior), kl_dirichlet(lat, self.nvib.prior, self.nvib.delta).to(h.dtype)
        if c.bottleneck == "pooled":
            w = mask.to(h.dtype)[..., None]
            pooled = (h * w).sum(1) / w.sum(1)
            mu, logvar = self.to_mu(pooled), self.to_logvar(pooled)
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
            return Memory(z=z[:, None], pad=None), gaussian_kl_standard(mu, logvar), zero
        return Memory(z=h, pad=pad), zero, zero

    def decode(self, decoder_input_ids: Tensor, memory: Memory, decoder_pad: Tensor | None = None) -> Tensor:
        """Next-token logits ``[B, T, V]`` of ``decoder_input_ids [B, T]`` given ``memory``."""
        x = self._embed(decoder_input_ids)
        for layer in self.decoder:
            x = layer(x, memory, decoder_pad)
        return F.linear(self.final_norm(x), self.embed.weight)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> NVAEOutput:
        """Reconstruct ``input_ids`` (teacher forcing); see :class:`NVAEOutput`."""
        mask = self._check_inputs(input_ids, attention_mask)
        memory, kl_g, kl_d = self.encode(input_ids, mask)
        dec_in = torch.cat([torch.full_like(input_ids[:, :1], self.config.start_id), input_ids[:, :-1]], 1)
        dec_pad = torch.cat([torch.zeros_like(mask[:, :1]), ~mask[:, :-1]], 1)
        logits = self.decode(dec_in, memory, dec_pad)
        labels = input_ids.masked_fill(~mask, -100)
        ce = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
        recon = ce.sum(-1)
        lg, ld = self.kl_weights()
        loss = recon.sum() / mask.sum() + (lg * kl_g.float() + ld * kl_d.float()).mean()
        return NVAEOutput(logits, loss, recon, kl_g, kl_d, mask.sum(-1), memory, (lg, ld))

    @torch.no_grad()
    def generate(self, memory: Memory, max_new_tokens: int | None = None) -> list[list[int]]:
        """Greedy decoding from ``memory``: token ids per sequence (EOS and after removed)."""
        c = self.config
        n = c.max_length if max_new_tokens is None else min(check_int(max_new_tokens, "max_new_tokens", "NVAE.generate"), c.max_length)
        B = memory.batch
        ids = torch.full((B, 1), c.start_id, dtype=torch.long, device=self.device)
        done = torch.zeros(B, dtype=torch.bool, device=self.device)
        for _ in range(n):
            nxt = self.decode(ids, memory)[:, -1].argmax(-1)
            nxt = nxt.masked_fill(done, c.pad_id)
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= nxt == c.eos_id
            if bool(done.all()):
                break
        out = []
        for row in ids[:, 1:].tolist():
            out.append(row[: row.index(c.eos_id)] if c.eos_id in row else row)
        return out

    # ------------------------------------------------------------------ the VAE operations
    @torch.no_grad()
    def reconstruct(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> list[list[int]]:
        """Greedy reconstructions from the posterior mean (evaluation mode is the caller's choice)."""
        memory, _, _ = self.encode(input_ids, attention_mask)
        return self.generate(memory)

    @torch.no_grad()
    def sample_prior(self, n: int, generator: torch.Generator | None = None) -> list[list[int]]:
        """``n`` greedy decodes of latents drawn from the prior.

        NVAE: the number of latent vectors per sample is drawn from the training length
        distribution, then :meth:`nvformer.NVIB.sample_prior`. Pooled VAE: ``z ~ N(0, I)``. Pass a
        seeded CPU ``generator`` for reproducible samples.
        """
        c = self.config
        if c.bottleneck == "none":
            raise ValueError("NVAE.sample_prior: a plain autoencoder (bottleneck='none') has no prior to sample from")
        check_int(n, "n", "NVAE.sample_prior")
        g = generator if generator is not None else torch.Generator().manual_seed(int(torch.seed() % 2**31))
        if c.bottleneck == "pooled":
            z = torch.randn(n, 1, c.d_model, generator=g).to(device=self.device, dtype=self.embed.weight.dtype)
            return self.generate(Memory(z=z))
        counts = self.length_counts.double().cpu()
        if counts.sum() == 0:
            raise ValueError("NVAE.sample_prior: no training lengths observed: call model.observe_lengths(attention_mask) on the training "
                             "batches first (nvformer_studies.nvae.training.train does, and saved models keep the counts)")
        lengths = torch.multinomial(counts, n, replacement=True, generator=g).clamp_min(1)
        state = torch.random.get_rng_state()
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=g)))
        try:
            lat = self.nvib.sample_prior(lengths.to(self.device))
        finally:
            torch.random.set_rng_state(state)
        return self.generate(Memory(latent=lat))

    @torch.no_grad()
    def interpolate(self, ids_a: Tensor, ids_b: Tensor, ts: list[float], mask_a: Tensor | None = None,
                    mask_b: Tensor | None = None) -> list[list[list[int]]]:
        """Greedy decodes along ``t`` in ``ts`` between pairs ``(a_i, b_i)``: ``out[k][i]`` for ``ts[k]``.

        NVAE and autoencoder: the memory is the union of both sentences' components with mixture
        weights ``pi_a (1 - t)`` and ``pi_b t`` (``pi`` uniform over tokens for the autoencoder);
        pooled VAE: ``z = (1 - t) mu_a + t mu_b``. Uses posterior means (call ``eval()`` first).
        """
        if ids_a.shape[0] != ids_b.shape[0]:
            raise ValueError(f"NVAE.interpolate: {ids_a.shape[0]} first but {ids_b.shape[0]} second sentences")
        if any(not 0.0 <= t <= 1.0 for t in ts):
            raise ValueError(f"NVAE.interpolate: every t must be in [0, 1], got {ts}")
        ma, _, _ = self.encode(ids_a, mask_a)
        mb, _, _ = self.encode(ids_b, mask_b)
        return [self.generate(mix_memories(ma, mb, t)) for t in ts]


def _log(x: float) -> float:
    return math.log(x) if x > 0 else float("-inf")


def mix_memories(a: Memory, b: Memory, t: float) -> Memory:
    """The memory with ``a``'s components weighted ``(1 - t)`` and ``b``'s weighted ``t``.

    NV latents (evaluation form): concatenated components, ``log pi = log pi_a + log(1 - t)`` and
    ``log pi_b + log t`` (masked where the weight is 0). Plain memories with padding: uniform
    weights over each sentence's vectors, scaled the same way. Single pooled vectors:
    ``(1 - t) z_a + t z_b``.
    """
    if a.latent is not None:
        la, lb = a.latent, b.latent
        if la.sampled or lb.sampled:
            raise ValueError("mix_memories: NV latents must be in evaluation form (call eval())")
        log_pi = torch.cat([la.log_pi + _log(1 - t), lb.log_pi + _log(t)], 1)
        pad = torch.cat([la.pad_mask | ~torch.isfinite(la.log_pi) | (t >= 1), lb.pad_mask | ~torch.isfinite(lb.log_pi) | (t <= 0)], 1)
        log_pi = masked_log_softmax(log_pi.masked_fill(pad, float("-inf")), pad)
        lat = NVLatent(torch.cat([la.mu, lb.mu], 1), torch.cat([la.logvar, lb.logvar], 1),
                       torch.cat([la.log_alpha, lb.log_alpha], 1), pad, torch.cat([la.z, lb.z], 1), log_pi,
                       log_w=log_pi, kappa=la.kappa, copies=1, sampled=False)
        return Memory(latent=lat)
    if a.pad is None:  # pooled: one vector each
        return Memory(z=(1 - t) * a.z + t * b.z)

    def uniform(m: Memory) -> Tensor:
        n = (~m.pad).sum(-1, keepdim=True).to(m.z.dtype)
        return (-n.log()).expand_as(m.pad).masked_fill(m.pad, float("-inf"))

    log_w = torch.cat([uniform(a) + _log(1 - t), uniform(b) + _log(t)], 1)
    pad = torch.cat([a.pad, b.pad], 1) | ~torch.isfinite(log_w)
    return Memory(z=torch.cat([a.z, b.z], 1), pad=pad, log_w=log_w.masked_fill(pad, 0.0))

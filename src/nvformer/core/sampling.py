"""Pure sampling maths used by the NVIB layer and Dirichlet attention (no module state).

Everything here works in log space: pseudo-counts ``a`` are handed around as ``log a`` so that
they never overflow (``log a`` of a width-4096 model is ~200, far beyond fp32's ``exp`` range).
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from .masks import masked_log_softmax, safe_softmax
from .scratch import scratch

__all__ = ["sample_dirichlet", "sample_log_gamma", "sample_log_dirichlet", "standard_gamma"]

# Above this log-concentration the Gamma(a, 1) sample is drawn from its log-normal limit
# log g ~ N(log a, 1/a): the neglected bias of the mean, -1/(2a), is below 1e-9 there.
_LOG_A_NORMAL_LIMIT = 20.0
# Below this log-concentration a is treated as exp(floor), so that log(U)/a and its gradient stay finite
# (float32: |log U| <= 88 and 88 e^80 < 3.4e38).
_LOG_A_MIN = {torch.float64: -300.0, torch.float32: -80.0}


_SPLIT_MIN = 1 << 16  # entries per part below which _gamma_grad does not split
_REDRAW_VECTORISED = 2048  # rejected entries from which the redraw is another vectorised round
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


_UNIFORM_BITS = {torch.float32: (torch.int32, 24), torch.float64: (torch.int64, 53)}  # the bits torch's own uniform_ uses


def _uniform(out: Tensor, bits: Tensor | None = None) -> Tensor:
    """Fill ``out`` with ``Uniform[0, 1)`` numbers and return it. On CPU, from integer random bits (``random_``)
    scaled as torch's ``uniform_`` scales them (24 bits for float32, 53 for float64: the same distribution, the
    same grid of values), which torch's CPU generator fills about twice as fast as ``uniform_``; ``bits``: an
    integer buffer of ``out``'s size to draw them into (else a fresh one)."""
    if out.device.type != "cpu" or out.dtype not in _UNIFORM_BITS:
        return out.uniform_()
    itype, k = _UNIFORM_BITS[out.dtype]
    bits = torch.empty(out.shape, dtype=itype, device=out.device) if bits is None else bits
    bits.random_().bitwise_and_((1 << k) - 1)  # random_ gives 31 (int32) or 63 (int64) random bits
    return out.copy_(bits).mul_(2.0**-k)  # exact: every k-bit integer is a float of out's dtype


def _gamma_grad(shape: Tensor, x: Tensor) -> Tensor:
    """``torch._standard_gamma_grad(shape, x)`` (the implicit gradient ``dx/ds``), split into equal
    parts over up to ``torch.get_num_threads()`` threads on CPU: torch's kernel runs on one thread
    whatever that setting, and it is the slowest step of a Dirichlet-attention backward. Each part
    is the same elementwise computation, so the result is the unsplit one bit for bit."""
    parts = min(torch.get_num_threads(), shape.numel() // _SPLIT_MIN)
    if parts < 2 or shape.device.type != "cpu":
        return torch._standard_gamma_grad(shape, x)
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < parts - 1:
            _pool = ThreadPoolExecutor(parts - 1, thread_name_prefix="nvformer-gamma-grad")
        pool = _pool
    s, v = shape.reshape(-1), x.reshape(-1)
    out = torch.empty_like(s)
    edges = [len(s) * i // parts for i in range(parts + 1)]

    def run(i: int) -> None:
        out[edges[i] : edges[i + 1]] = torch._standard_gamma_grad(s[edges[i] : edges[i + 1]], v[edges[i] : edges[i + 1]])

    futures = [pool.submit(run, i) for i in range(1, parts)]
    run(0)
    for f in futures:
        f.result()
    return out.view(shape.shape)


def _marsaglia_tsang(shape: Tensor, spare: bool = False, plus_one: bool = False, reuse: bool = True,
                     transient: bool = False) -> tuple[Tensor, Tensor | None]:
    """One vectorised round of Marsaglia & Tsang's (2000) rejection sampler for ``Gamma(s, 1)``,
    ``s >= 1``, with a fresh draw for every entry the round rejects (no gradient). With
    ``plus_one``, ``s`` is ``shape + 1`` (one pass fewer than adding it first).

    Proposal ``x = d v``, ``v = (1 + c z)^3``, ``d = s - 1/3``, ``c = 1 / sqrt(9 d)``,
    ``z ~ N(0, 1)``; accepted by the squeeze ``u < b(z) = 1 - 0.0331 z^4`` (false wherever
    ``v <= 0``, since ``z^4 >= 36`` there), else by the exact test ``v > 0`` and
    ``log u < z^2 / 2 + d (1 - v + log v)``, evaluated in float64 on the (about 10%) entries the
    squeeze leaves (it cancels to ``~ -z^2/2`` for large ``d``). Accepted proposals are exact
    ``Gamma(s)`` draws; the (about 2-5%) rejected entries are drawn again, by another such round
    while they are many (at least ``_REDRAW_VECTORISED``), else by ``torch._standard_gamma``, an
    exact sampler too, so every entry is exactly ``Gamma(s)``. The entries the squeeze leaves are handled
    by flat indices (one index tensor, not one per dimension). With ``reuse``, the temporaries ``d``, ``z``,
    ``b(z)`` and the squeeze's mask live in the thread's scratch buffers (:func:`~nvformer.core.scratch.scratch`); the redraw
    round, which runs while they are in use, allocates its own. ``transient`` (the caller uses the draws
    and drops them before the next draw on its thread, without a graph): the returned tensors live in
    scratch buffers too.

    With ``spare``, also returns ``log w`` with ``w ~ Uniform(0, 1]`` independent of the draws: where
    the squeeze accepted, ``w = 1 - u / b(z)`` (given acceptance, ``u`` is uniform on ``[0, b(z))``
    whatever ``z``, hence whatever ``x``: the spent uniform is recycled); a fresh uniform elsewhere.
    """
    flat = shape.reshape(-1)
    # few full-size temporaries, updated in place or reused (every fresh one is a fresh allocation, often page faults)
    n = flat.numel()
    work = scratch("marsaglia-tsang", [(n,)] * 3, flat.dtype, flat.device) if reuse else None
    keep = scratch("marsaglia-tsang", [(n,)], torch.bool, flat.device) if work is not None else None
    shift = 2.0 / 3.0 if plus_one else -1.0 / 3.0
    d = torch.add(flat, shift, out=work[0]) if work else flat + shift
    z = work[1].normal_() if work else torch.randn_like(d)  # the same numbers from the same generator either way
    outs = scratch("marsaglia-tsang-out", [(n,)] * 2, flat.dtype, flat.device) if transient and work else None
    bits = scratch("marsaglia-tsang", [(n,)], _UNIFORM_BITS[flat.dtype][0], flat.device) if work and flat.dtype in _UNIFORM_BITS else None
    u = _uniform(outs[0] if outs else torch.empty_like(d), bits[0] if bits else None)  # becomes log w, returned: scratch only if transient
    one = torch.ones((), dtype=d.dtype, device=d.device)
    x = torch.mul(d, 9.0, out=outs[1]) if outs else torch.mul(d, 9.0)
    x = x.rsqrt_()  # c; outputs written over their inputs (out=): a fresh tensor costs page faults
    x = torch.addcmul(one, x, z, out=x).pow_(3).mul_(d)  # d (1 + c z)^3
    bound = torch.square(z, out=work[2]) if work else z.square()
    bound = torch.addcmul(one, bound, bound, value=-0.0331, out=bound)  # 1 - 0.0331 z^4
    left = (torch.ge(u, bound, out=keep[0]) if keep else u >= bound).nonzero().squeeze(1)  # not accepted by the squeeze
    u_left = u.index_select(0, left) if left.numel() else None
    log_w = u.div_(bound).neg_().log1p_() if spare else None  # garbage where not squeezed: replaced below
    if left.numel():
        d_l, z_l = d.index_select(0, left).double(), z.index_select(0, left).double()
        t = torch.rsqrt(9.0 * d_l).mul_(z_l)  # v = (1 + t)^3
        log1p_t = torch.log1p(t)  # NaN where v < 0, -inf where v = 0: the test below is then False (rejected)
        # z^2 / 2 + d (1 - v + log v) = z^2 / 2 + d - d v + 3 d log(1 + t)
        h = torch.sub(d_l, t.add_(1.0).pow_(3).mul_(d_l)).addcmul_(d_l, log1p_t, value=3.0).addcmul_(z_l, z_l, value=0.5)
        accept = u_left.double().log_() < h
        redo = left[~accept]
        if redo.numel():
            again = flat.index_select(0, redo)
            if redo.numel() >= _REDRAW_VECTORISED:
                drawn = _marsaglia_tsang(again, plus_one=plus_one, reuse=False)[0]
            else:
                drawn = torch._standard_gamma(again + 1.0 if plus_one else again)
            x.index_copy_(0, redo, drawn)
        if spare:
            log_w.index_copy_(0, left, torch.rand(left.shape, dtype=x.dtype, device=x.device).neg_().log1p_())
    return x.view(shape.shape), (log_w.view(shape.shape) if spare else None)


class _StandardGamma(torch.autograd.Function):
    """``Gamma(s, 1)`` draws with the implicit reparameterisation gradient ``dx/ds = -(dF/ds) / f``
    (``F``, ``f``: the distribution's CDF and density at the draw; ``torch._standard_gamma_grad``,
    :func:`_gamma_grad`),
    and (``spare``) the log of an independent ``Uniform(0, 1]`` (no gradient); ``s = shape + 1``
    with ``plus_one`` (:func:`_marsaglia_tsang`)."""

    @staticmethod
    def forward(ctx, shape: Tensor, spare: bool, plus_one: bool) -> tuple[Tensor, Tensor | None]:  # noqa: D102
        x, log_w = _marsaglia_tsang(shape, spare, plus_one)
        ctx.save_for_backward(shape, x)
        ctx.plus_one = plus_one
        if log_w is not None:
            ctx.mark_non_differentiable(log_w)
        return x, log_w

    @staticmethod
    def backward(ctx, grad: Tensor, _: Tensor | None) -> tuple[Tensor, None, None]:  # noqa: D102
        shape, x = ctx.saved_tensors
        return grad * _gamma_grad(shape + 1.0 if ctx.plus_one else shape, x), None, None


def standard_gamma(shape: Tensor) -> Tensor:
    """Reparameterised ``x ~ Gamma(shape, 1)`` for ``shape >= 1`` (any tensor shape, float32 or
    float64; a vectorised Marsaglia-Tsang round, :func:`_marsaglia_tsang`), differentiable in
    ``shape`` by the implicit gradient, as ``torch.distributions.Gamma.rsample``."""
    return _StandardGamma.apply(shape, False, False)[0]


def _boosted(x: Tensor, log_u: Tensor, a: Tensor, dtype: torch.dtype) -> Tensor:
    """``log g = log x + log(u) / a``: the boost of ``x ~ Gamma(a + 1)`` to ``g ~ Gamma(a)``."""
    if torch.is_grad_enabled() and (x.requires_grad or a.requires_grad):
        return torch.addcdiv(x.clamp_min(torch.finfo(dtype).tiny).log(), log_u, a)
    return x.clamp_min_(torch.finfo(dtype).tiny).log_().addcdiv_(log_u, a)  # no graph: in place, no further temporaries


def sample_log_gamma(log_concentration: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Reparameterised sample of ``log g``, ``g ~ Gamma(a, 1)``, given ``log a``; any shape.

    Computed in ``dtype`` (float64 by default, as the NVIB layer samples; float32 for Dirichlet
    attention, where it runs over every [query, key] pair) and returned in the input dtype (at
    least float32). Three regimes, each exact in distribution or negligibly far from it, so that no
    pseudo-count over/underflows in either dtype:

    * ``log a <= 20``: ``g = X * U**(1/a)`` with ``X ~ Gamma(a + 1)`` drawn as
      :func:`standard_gamma` does (implicit reparameterisation gradients) and
      ``U ~ Uniform(0, 1]`` independent of it (the standard boost for small shapes, Marsaglia &
      Tsang 2000; mostly the sampler's own spent acceptance uniform, recycled); in log
      space ``log g = log X + log(U) / a``, finite for any ``a``; ``log a`` is floored at -300 in
      float64 (``a ~ 5e-131``) and -80 in float32 (``a ~ 2e-35``; ``log(U) / a`` then stays below
      float32's largest number): such a component's weight is 0 in any dtype, and gradients stay finite.
    * ``log a > 20``: ``log g = log a + eps / sqrt(a)``, ``eps ~ N(0, 1)``: the log-normal limit of
      a Gamma with ``a > 4.8e8`` (the bias ``-1/(2a)`` is below 1e-9), with pathwise gradients.
    * ``-inf`` entries (masked components) stay ``-inf``.
    """
    return _sample_log_gamma(log_concentration, dtype, "sample_log_gamma")[0]


def _widened(a: float, side: float) -> float:
    """``log a`` moved by ``side`` times a relative 1e-6, beyond float32's rounding of ``log`` (``-inf`` for 0)."""
    if a == 0.0:
        return -math.inf
    la = math.log(a)
    return la + side * 1e-6 * (1.0 + abs(la))


def _sample_log_gamma(log_concentration: Tensor, dtype: torch.dtype, where: str,
                      concentration: Tensor | None = None, transient: bool = False) -> tuple[Tensor, Tensor | None]:
    """:func:`sample_log_gamma` and the bool mask of its ``-inf`` (masked) entries (None: there are
    none). ``concentration``: ``exp(log_concentration)`` if the caller has it (0 where masked), used
    instead of exponentiating again wherever no regime boundary is crossed; with it,
    ``log_concentration`` may be None: it is then formed only if a regime boundary is crossed.
    ``transient``: the caller drops the result before its thread's next draw; where no gradient is
    needed, the result may then live in a scratch buffer (:func:`_marsaglia_tsang`)."""
    if dtype not in _LOG_A_MIN:
        raise ValueError(f"{where}: `dtype` must be torch.float32 or torch.float64, got {dtype}")
    bounds = None  # (lo, hi) of log a, when known from a scan of a
    if log_concentration is None and isinstance(concentration, Tensor) and concentration.device.type != "meta" and concentration.numel():
        lo, hi = (float(v) for v in torch.aminmax(concentration.detach()))
        if math.exp(_LOG_A_MIN[dtype]) <= lo and hi <= math.exp(_LOG_A_NORMAL_LIMIT):  # no shortcut applies: log a is not needed
            a = concentration.to(dtype)
            if transient and not (torch.is_grad_enabled() and a.requires_grad):
                x, log_u = _marsaglia_tsang(a, True, True, transient=True)
            else:
                x, log_u = _StandardGamma.apply(a, True, True)
            return _boosted(x, log_u, a, dtype).to(torch.promote_types(concentration.dtype, torch.float32)), None
        if 0.0 <= lo and hi < math.inf:  # no NaN, nothing negative: bounds of log a follow (log 0 = -inf: a masked entry), widened
            bounds = (_widened(lo, -1.0), _widened(hi, 1.0))  # by more than log's rounding, so that every shortcut needed is taken
    if log_concentration is None and isinstance(concentration, Tensor):
        log_concentration = concentration.log()
    if not isinstance(log_concentration, Tensor):
        raise ValueError(f"{where}: `log_concentration` must be a tensor, got {type(log_concentration).__name__}")
    out_dtype = torch.promote_types(log_concentration.dtype, torch.float32)
    lc = log_concentration.to(dtype)
    # One pass decides every shortcut: masked entries (lo = -inf), floored ones, log-normal ones.
    general = lc.device.type == "meta" or lc.numel() == 0  # no values to look at: every pass runs
    lo, hi = (-math.inf, math.inf) if general else bounds if bounds is not None else (float(v) for v in torch.aminmax(lc.detach()))
    if not general and not hi < math.inf:  # NaN fails the comparison too
        raise ValueError(f"{where}: `log_concentration` must not be NaN or +inf (-inf marks a masked entry)")
    masked = torch.isneginf(lc) if lo == -math.inf else None
    if masked is not None:
        lc = lc.masked_fill(masked, 0.0)
    if lo < _LOG_A_MIN[dtype]:
        lc = lc.clamp_min(_LOG_A_MIN[dtype])
    big = hi > _LOG_A_NORMAL_LIMIT

    if concentration is not None and not big and lo >= _LOG_A_MIN[dtype] and masked is None:
        a_small = concentration.to(dtype)
    else:
        a_small = (lc.clamp(max=_LOG_A_NORMAL_LIMIT) if big else lc).exp()
    x, log_u = _StandardGamma.apply(a_small, True, True)  # x ~ Gamma(a + 1); log_u: the log of a Uniform(0, 1] independent of x
    log_g = _boosted(x, log_u, a_small, dtype)
    if big:  # the log-normal limit, drawn only where it applies
        lc_big = lc.clamp(min=_LOG_A_NORMAL_LIMIT)
        log_g = torch.where(lc > _LOG_A_NORMAL_LIMIT, lc_big + torch.randn_like(lc_big) * torch.exp(-0.5 * lc_big), log_g)
    if masked is not None:
        log_g = log_g.masked_fill(masked, float("-inf"))
    return log_g.to(out_dtype), masked


def sample_log_dirichlet(log_concentration: Tensor, pad_mask: Tensor | None = None, dim: int = -1,
                         dtype: torch.dtype = torch.float64) -> Tensor:
    """Reparameterised ``log pi`` with ``pi ~ Dir(a)`` over ``dim``, given ``log a``.

    ``pi = g / sum(g)`` with ``g_i ~ Gamma(a_i)`` (:func:`sample_log_gamma`, computed in ``dtype``),
    normalised with ``logsumexp``. Entries where ``pad_mask`` is True (or ``log a = -inf``) get
    ``log pi = -inf``.

    Args:
        log_concentration: ``[..., K]`` log pseudo-counts.
        pad_mask: bool, broadcastable, True = excluded.
        dtype: float64 (default) or float32, the precision of the Gamma draws.
    """
    if pad_mask is not None:
        if not isinstance(pad_mask, Tensor) or pad_mask.dtype != torch.bool:
            raise ValueError(f"sample_log_dirichlet: `pad_mask` must be a bool tensor (True = excluded), got {getattr(pad_mask, 'dtype', pad_mask)!r}")
        log_concentration = log_concentration.masked_fill(pad_mask, float("-inf"))
    return masked_log_softmax(sample_log_gamma(log_concentration, dtype), pad_mask, dim=dim)


def sample_dirichlet(log_concentration: Tensor | None, dtype: torch.dtype = torch.float64, concentration: Tensor | None = None) -> Tensor:
    """Reparameterised ``pi ~ Dir(a)`` over the last dimension, given ``log a`` (``-inf``: excluded,
    weight 0; a row with no other entry: all 0): the weights that :func:`sample_log_dirichlet`'s
    logarithms give, normalised by one softmax instead of ``logsumexp`` and ``exp`` (for callers
    that need the weights, as Dirichlet attention does). Gamma draws in ``dtype``; returned in the
    input dtype (at least float32). ``concentration``: ``a`` itself, if the caller has it, saves
    exponentiating ``log a`` again (used where no regime of :func:`sample_log_gamma` changes); with it,
    ``log_concentration`` may be None (``log a`` is then formed only where a regime needs it; a masked
    entry is ``a = 0``)."""
    if log_concentration is None and not isinstance(concentration, Tensor):
        raise ValueError("sample_dirichlet: give `log_concentration`, or `concentration` (a tensor) with `log_concentration=None`")
    log_g, masked = _sample_log_gamma(log_concentration, dtype, "sample_dirichlet", concentration, transient=True)
    return torch.softmax(log_g, -1) if masked is None else safe_softmax(log_g)  # a fresh tensor: log_g may be scratch

"""Property-based checks (hypothesis): shapes, finiteness, zero attention on masked positions."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nvformer as nv


@st.composite
def cases(draw):
    H = draw(st.integers(1, 3))
    d = draw(st.integers(1, 4))
    B = draw(st.integers(1, 3))
    Nt = draw(st.integers(1, 5))
    S = draw(st.integers(1, 6))
    self_attn = draw(st.booleans())
    if self_attn:
        S = Nt
    causal = self_attn and draw(st.booleans())
    pad = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=S, max_size=S), min_size=B, max_size=B)))
    attn = torch.tensor(draw(st.lists(st.lists(st.booleans(), min_size=S, max_size=S), min_size=Nt, max_size=Nt)))
    knobs = dict(
        mu_tau=draw(st.floats(-1.0, 2.0)),
        stdev_tau=draw(st.floats(0.0, 1.5)),
        alpha_tau=draw(st.floats(-15.0, 15.0)),
        kappa=draw(st.integers(1, 3)),
        prior_component=draw(st.booleans()),
        formula=draw(st.sampled_from(["paper", "exact"])),
    )
    return dict(H=H, d=d, B=B, Nt=Nt, S=S, self_attn=self_attn, causal=causal, pad=pad, attn=attn, knobs=knobs,
                train=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_shapes_finiteness_and_masked_positions(c):
    torch.manual_seed(c["seed"])
    E = c["H"] * c["d"]
    m = nv.NVMultiheadAttention(E, c["H"], **c["knobs"]).train(c["train"])
    q = torch.randn(c["B"], c["Nt"], E) * 2
    kv = q if c["self_attn"] else torch.randn(c["B"], c["S"], E) * 2
    out, w = m(q, kv, kv, key_padding_mask=c["pad"], attn_mask=c["attn"], is_causal=c["causal"], average_attn_weights=False)
    copies = c["knobs"]["kappa"] if c["train"] else 1
    K = (c["S"] + 1) * copies
    assert out.shape == q.shape and w.shape == (c["B"], c["H"], c["Nt"], K)
    assert torch.isfinite(out).all() and torch.isfinite(w).all()

    # which latent columns may receive weight
    blocked = c["pad"][:, None, :] | c["attn"][None]  # [B, Nt, S]
    if c["causal"]:
        blocked = blocked | torch.ones(c["Nt"], c["S"], dtype=torch.bool).triu(1)
    prior_blocked = torch.full((c["B"], c["Nt"], 1), not c["knobs"]["prior_component"])
    blocked = torch.cat([prior_blocked, blocked], -1).repeat_interleave(copies, -1)  # [B, Nt, K]
    assert (w.masked_select(blocked[:, None].expand_as(w)) == 0).all()
    row_sum = w.sum(-1)
    open_rows = ~blocked.all(-1)[:, None].expand_as(row_sum)
    torch.testing.assert_close(row_sum[open_rows], torch.ones_like(row_sum[open_rows]), rtol=0, atol=1e-5)
    assert (row_sum[~open_rows] == 0).all()
    kg, kd = m.kl()
    assert kg.shape == kd.shape == (c["B"],)
    assert torch.isfinite(kg).all() and torch.isfinite(kd).all() and (kd >= -1e-9).all() and (kg >= -1e-6).all()

"""NVMultiheadAttention: identity against nn.MultiheadAttention, stacks, KL, robustness, errors."""

import copy
import math

import pytest
import torch
from helpers import perturbed_mha
from torch import nn

import nvformer as nv

TOL = dict(rtol=0, atol=1e-5)


def _pad(B, S, lengths, left=False):
    m = torch.zeros(B, S, dtype=torch.bool)
    for b, n in enumerate(lengths):
        if left:
            m[b, : S - n] = True
        else:
            m[b, n:] = True
    return m


def _identity_knobs(train):
    # in training pi ~ Dir(a): it equals a / sum(a) to relative precision 1/sqrt(a), so the
    # identity there needs large pseudo-counts (alpha_tau = 50 puts log a >= 50)
    return dict(prior_component=False, mu_tau=1.0, stdev_tau=0.0, alpha_tau=50.0 if train else 10.0)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kind", ["self", "causal", "cross"])
@pytest.mark.parametrize("padding", [None, "right", "left"])
def test_from_mha_identity(train, kind, padding):
    E, H, B, Nt = 16, 4, 3, 6
    kdim = 12 if kind == "cross" else None
    mha = perturbed_mha(E, H, kdim=kdim)
    mha.dropout = 0.0
    nvm = nv.NVMultiheadAttention.from_mha(mha, **_identity_knobs(train))
    mha.train(train), nvm.train(train)
    x = torch.randn(B, Nt, E)
    mem = torch.randn(B, 5, kdim) if kind == "cross" else x
    S = mem.shape[1]
    kpm = None if padding is None else _pad(B, S, [S, S - 2, 1], left=padding == "left")
    kwargs = dict(key_padding_mask=kpm)
    if kind == "causal":
        kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(Nt).bool()
    ref, ref_w = mha(x, mem, mem, **kwargs)
    out, w = nvm(x, mem, mem, **kwargs)
    valid = torch.ones(B, Nt, dtype=torch.bool)
    if kind != "cross" and kpm is not None and kind == "causal" and padding == "left":
        valid = ~kpm  # left-padded queries in causal attention see nothing in nn.MultiheadAttention
    torch.testing.assert_close(out[valid], ref[valid], **TOL)
    # weights: column 0 is the (switched-off) prior, the rest map onto nn.MultiheadAttention's
    assert w.shape == (B, Nt, S + 1)
    assert (w[..., 0] == 0).all()
    torch.testing.assert_close(w[..., 1:][valid], ref_w[valid], **TOL)


def test_is_causal_flag_equals_explicit_causal_mask_and_prior_column_stays_visible():
    mha = perturbed_mha()
    nvm = nv.NVMultiheadAttention.from_mha(mha).eval()
    x = torch.randn(2, 5, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    a, wa = nvm(x, x, x, attn_mask=mask, average_attn_weights=False)
    b, wb = nvm(x, x, x, is_causal=True, average_attn_weights=False)
    torch.testing.assert_close(a, b)
    assert wa.shape == (2, 4, 5, 6)
    assert (wa[..., 0] > 0).all()  # prior always visible
    future = torch.ones(5, 5, dtype=torch.bool).triu(1)
    assert (wa[..., 1:][:, :, future] == 0).all()


def _stack(seed=0, norm_first=False):
    torch.manual_seed(seed)
    enc_layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    dec_layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    model = nn.Transformer(16, 4, 2, 2, 32, dropout=0.0, batch_first=True, custom_encoder=nn.TransformerEncoder(enc_layer, 2), custom_decoder=nn.TransformerDecoder(dec_layer, 2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("train", [False, True])
def test_identity_inside_full_transformer_stack(train):
    model = _stack()
    nvmodel = nv.convert(copy.deepcopy(model), **_identity_knobs(train))
    n_nv = sum(isinstance(m, nv.NVMultiheadAttention) for m in nvmodel.modules())
    assert n_nv == 2 + 2 * 2
    assert not any(isinstance(m, nn.MultiheadAttention) for m in nvmodel.modules())
    model.train(train), nvmodel.train(train)
    src, tgt = torch.randn(3, 7, 16), torch.randn(3, 5, 16)
    src_pad = _pad(3, 7, [7, 4, 2])
    tgt_pad = _pad(3, 5, [5, 5, 3])
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(5)
    kw = dict(tgt_mask=tgt_mask, src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad, memory_key_padding_mask=src_pad, tgt_is_causal=True)
    with torch.no_grad():
        ref = model(src, tgt, **kw)
        out = nvmodel(src, tgt, **kw)
    torch.testing.assert_close(out[~tgt_pad], ref[~tgt_pad], **TOL)


def test_encoder_fast_path_does_not_bypass_nv_attention():
    """In eval mode with padding, torch's encoder would use fused kernels / nested tensors."""
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, batch_first=True), 2, enable_nested_tensor=True).eval()
    nv.convert(enc, stdev_tau=0.3, alpha_tau=-1.0)
    x = torch.randn(2, 6, 16)
    pad = _pad(2, 6, [6, 3])
    calls = []
    for m in enc.modules():
        if isinstance(m, nv.NVMultiheadAttention):
            m.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        enc(x, src_key_padding_mask=pad)
    assert len(calls) == 2


def test_knobs_change_outputs_and_kl_terms_are_collected():
    model = _stack()
    nv.convert(model)
    model.train()
    src, tgt = torch.randn(2, 7, 16), torch.randn(2, 5, 16)
    out = model(src, tgt, tgt_mask=nn.Transformer.generate_square_subsequent_mask(5), tgt_is_causal=True)
    kl = nv.kl_terms(model)
    assert kl.modules == 6 and kl.gaussian.shape == (2,) and kl.dirichlet.shape == (2,)
    assert torch.isfinite(kl.total()).all()
    loss = out.pow(2).mean() + 1e-3 * kl.total().mean()
    loss.backward()
    nvib = model.encoder.layers[0].self_attn.nvib
    assert nvib.alpha_bias.grad is not None and torch.isfinite(nvib.alpha_bias.grad)
    # moving a knob changes the output
    model.eval()
    with torch.no_grad():
        a = model(src, tgt)
        for m in model.modules():
            if isinstance(m, nv.NVMultiheadAttention):
                m.nvib.set_knobs(stdev_tau=0.5, alpha_tau=0.0)
        b = model(src, tgt)
    assert (a - b).abs().max() > 1e-3


def test_kl_terms_without_forward_raises():
    with pytest.raises(RuntimeError, match="forward"):
        nv.kl_terms(nv.convert(_stack()))


def test_batch_first_false_and_unbatched_inputs():
    mha = perturbed_mha(batch_first=False)
    nvm = nv.NVMultiheadAttention.from_mha(mha, prior_component=False).eval()
    mha.eval()
    x = torch.randn(5, 2, 16)
    torch.testing.assert_close(nvm(x, x, x)[0], mha(x, x, x)[0], **TOL)
    xu = torch.randn(5, 16)
    out, w = nvm(xu, xu, xu)
    torch.testing.assert_close(out, mha(xu, xu, xu)[0], **TOL)
    assert w.shape == (5, 6)


def test_need_weights_false_and_per_head_weights():
    nvm = nv.NVMultiheadAttention(16, 4).eval()
    x = torch.randn(2, 3, 16)
    assert nvm(x, x, x, need_weights=False)[1] is None
    assert nvm(x, x, x, average_attn_weights=False)[1].shape == (2, 4, 3, 4)


@pytest.mark.parametrize("causal", [False, True])
def test_kappa_samples_expand_masks_consistently(causal):
    nvm = nv.NVMultiheadAttention(16, 4, kappa=3, stdev_tau=0.5, alpha_tau=1.0).train()
    x = torch.randn(2, 4, 16)
    pad = _pad(2, 4, [4, 2])
    out, w = nvm(x, x, x, key_padding_mask=pad, is_causal=causal)
    assert w.shape == (2, 4, 5 * 3)
    assert torch.isfinite(out).all()
    cols = pad.repeat_interleave(3, 1)
    assert (w[:, :, 3:][cols[:, None, :].expand(-1, 4, -1)] == 0).all()
    if causal:
        for t in range(4):
            assert (w[:, t, 3 * (t + 2):] == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4))
    kg, kd = nvm.kl()
    assert torch.isfinite(kg).all() and torch.isfinite(kd).all()


def test_fully_padded_rows_and_length_one_sequences():
    nvm = nv.NVMultiheadAttention(16, 4, stdev_tau=0.2)
    x = torch.randn(2, 1, 16)
    pad = torch.tensor([[True], [False]])
    for mode in (True, False):
        nvm.train(mode)
        out, w = nvm(x, x, x, key_padding_mask=pad)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(w[0, 0, 0], torch.tensor(1.0))  # only the prior is left
    off = nv.NVMultiheadAttention(16, 4, prior_component=False).eval()
    out, w = off(x, x, x, key_padding_mask=pad)
    assert torch.isfinite(out).all() and (w[0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_finite_outputs(dtype):
    model = nv.convert(_stack()).to(dtype)
    src, tgt = torch.randn(2, 7, 16, dtype=dtype) * 4, torch.randn(2, 5, 16, dtype=dtype) * 4
    for mode in (True, False):
        model.train(mode)
        out = model(src, tgt, tgt_mask=nn.Transformer.generate_square_subsequent_mask(5), tgt_is_causal=True)
        assert out.dtype == dtype and torch.isfinite(out).all()
        kl = nv.kl_terms(model)
        assert torch.isfinite(kl.gaussian).all() and torch.isfinite(kl.dirichlet).all()


def test_width_4096_has_no_overflow():
    nvm = nv.NVMultiheadAttention(4096, 32, stdev_tau=0.1)
    x = torch.randn(2, 9, 4096) * 3
    for mode in (True, False):
        nvm.train(mode)
        out, w = nvm(x, x, x, is_causal=True)
        assert torch.isfinite(out).all() and torch.isfinite(w).all()
        kg, kd = nvm.kl()
        assert torch.isfinite(kg).all() and torch.isfinite(kd).all()


def test_device_moves_follow_to_including_meta():
    nvm = nv.NVMultiheadAttention(16, 4, prior=nv.Prior(16, mean=0.5, var=2.0))
    m64 = copy.deepcopy(nvm).to(torch.float64)
    assert m64.nvib.prior.mean.dtype == torch.float64 and m64.nvib.alpha_quad.dtype == torch.float64
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    assert m64.eval()(x, x, x)[0].dtype == torch.float64
    meta = copy.deepcopy(nvm).to("meta").eval()
    assert meta.nvib.prior.var.device.type == "meta"
    xm = torch.empty(2, 3, 16, device="meta")
    out, w = meta(xm, xm, xm)
    assert out.device.type == "meta" and out.shape == (2, 3, 16) and w.shape == (2, 3, 4)
    back = meta.to_empty(device="cpu")
    back.load_state_dict(nvm.state_dict())
    xf = x.float()
    torch.testing.assert_close(back.eval()(xf, xf, xf)[0], nvm.eval()(xf, xf, xf)[0])


def test_state_dict_round_trip_keeps_prior_and_knob_parameters():
    a = nv.NVMultiheadAttention(16, 4, prior=nv.Prior(16, mean=0.3, log_alpha=2.0), alpha_tau=-2.0, stdev_tau=0.4)
    b = nv.NVMultiheadAttention(16, 4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 16)
    torch.testing.assert_close(a.eval()(x, x, x)[0], b.eval()(x, x, x)[0])


def test_alpha_skip_adds_previous_layer_pseudo_counts():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), 2).eval()
    nv.convert(enc, alpha_skip=True)
    l0, l1 = (layer.self_attn for layer in enc.layers)
    x = torch.randn(2, 4, 16)
    with torch.no_grad():
        enc(x)
    h = enc.layers[0](x)
    own = l1.nvib.log_alpha_tokens(h)
    torch.testing.assert_close(l1.last_latent.log_alpha[:, 1:], own + l0.last_latent.log_alpha[:, 1:])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m, x: m(x[0, 0], x, x), "query"),
        (lambda m, x: m(x, x, x.clone()), "same tensor"),
        (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(2, 4)), r"key_padding_mask.*\[2, 3\]"),
        (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(2, 3, dtype=torch.long)), "key_padding_mask.*dtype"),
        (lambda m, x: m(x, x, x, attn_mask=torch.zeros(3, 3, dtype=torch.int32)), "attn_mask.*dtype"),
        (lambda m, x: m(x, x, x, attn_mask=torch.zeros(3, 4, dtype=torch.bool)), r"attn_mask.*\[3, 3\]"),
        (lambda m, x: (lambda y: m(y, y, y))(x[..., :8]), "last dim 16"),
        (lambda m, x: m(x.long(), x, x), "floating"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_argument(call, match):
    m = nv.NVMultiheadAttention(16, 4)
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match=match):
        call(m, x)


def test_bad_constructor_and_knob_arguments():
    with pytest.raises(ValueError, match="stdev_tau"):
        nv.NVIB(16, 4, stdev_tau=-0.1)
    with pytest.raises(ValueError, match="alpha_tau"):
        nv.NVIB(16, 4).set_knobs(alpha_tau=math.nan)
    with pytest.raises(ValueError, match="divisible"):
        nv.NVMultiheadAttention(10, 4)
    with pytest.raises(ValueError, match="kdim"):
        nv.NVMultiheadAttention(16, 4, kdim=8, vdim=12)
    with pytest.raises(ValueError, match="prior has dim"):
        nv.NVMultiheadAttention(16, 4, prior=nv.Prior(8))
    with pytest.raises(ValueError, match="add_bias_kv"):
        nv.NVMultiheadAttention.from_mha(nn.MultiheadAttention(16, 4, add_bias_kv=True))
    with pytest.raises(ValueError, match="nor has nn.MultiheadAttention"):
        nv.convert(nn.Linear(3, 3))

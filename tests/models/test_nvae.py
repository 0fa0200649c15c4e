"""The NVAE and its baselines: maths helpers, shapes and masking, overfitting, sampling and
interpolation determinism, checkpoints (save/load and training resume), the Accelerate loop."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from nvformer.models import NVAE, NVAEConfig, anneal
from nvformer.models.nvae import Memory, gaussian_kl_standard, mix_memories, sinusoidal_positions
from nvformer_studies.common.tokenizer import train_tokenizer
from nvformer_studies.nvae import training as vae

SENTS = ["the cat sat on the mat .", "a dog ran in the park today .", "birds sing in the early morning .", "she reads a long book ."]
BOTTLENECKS = ("nvib", "none", "pooled")


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(SENTS * 5, 300, min_frequency=1)


def tiny(tok, bottleneck, **kw) -> NVAE:
    torch.manual_seed(0)
    base = dict(vocab_size=len(tok), bottleneck=bottleneck, d_model=32, heads=2, encoder_layers=1, decoder_layers=1, ffn=64,
                dropout=0.0, max_length=32, lambda_g=0.01, lambda_d=0.01, schedule="constant")
    return NVAE(NVAEConfig(**(base | kw)))


def batch(tok, texts=SENTS):
    return vae.pad_batch(vae.encode_texts(tok, texts, 32), 0)


# ------------------------------------------------------------------------------------------ pure functions


def test_anneal_schedules():
    assert [anneal(s, "constant") for s in (0, 5, 10_000)] == [1.0, 1.0, 1.0]
    assert [anneal(s, "monotonic", warmup=10) for s in (0, 5, 10, 50)] == [0.0, 0.5, 1.0, 1.0]
    # cycle 8, ramp over the first half: 0, .25, .5, .75, 1, 1, 1, 1, then again
    got = [anneal(s, "cyclic", cycle=8, ratio=0.5) for s in range(10)]
    assert got == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.0, 0.25]
    with pytest.raises(ValueError, match="schedule"):
        anneal(0, "linear")
    with pytest.raises(ValueError, match="step"):
        anneal(-1, "constant")


def test_sinusoidal_positions_match_the_formula():
    pe = sinusoidal_positions(7, 6, dtype=torch.float64)
    for t in range(7):
        for i in range(3):
            angle = t / 10000 ** (2 * i / 6)
            assert pe[t, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-12)
            assert pe[t, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-12)
    with pytest.raises(ValueError, match="even"):
        sinusoidal_positions(3, 5)


def test_gaussian_kl_standard_matches_torch_distributions():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(4, 5, generator=g, dtype=torch.float64)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    torch.testing.assert_close(gaussian_kl_standard(mu, logvar), torch.distributions.kl_divergence(q, p).mean(-1))


def test_config_errors():
    with pytest.raises(ValueError, match="bottleneck"):
        NVAEConfig(vocab_size=10, bottleneck="vq")
    with pytest.raises(ValueError, match="divisible"):
        NVAEConfig(vocab_size=10, d_model=30, heads=4)
    with pytest.raises(ValueError, match="unknown field"):
        NVAEConfig.from_dict({"vocab_size": 10, "size": 3})


# ------------------------------------------------------------------------------------------ shapes, masking


@pytest.mark.parametrize("bottleneck", BOTTLENECKS)
def test_shapes_losses_and_padding_invariance(tok, bottleneck):
    model = tiny(tok, bottleneck).eval()
    x, m = batch(tok)
    out = model(x, m)
    B, S = x.shape
    assert out.logits.shape == (B, S, len(tok))
    assert out.recon.shape == out.kl_g.shape == out.kl_d.shape == (B,)
    assert torch.equal(out.tokens, m.sum(-1))
    # the loss is the token-mean cross-entropy plus the weighted mean KL terms
    ce = torch.nn.functional.cross_entropy(out.logits.reshape(-1, len(tok)), x.masked_fill(~m, -100).reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, ce + 0.01 * out.kl_g.float().mean() + 0.01 * out.kl_d.float().mean(), rtol=1e-5, atol=1e-5)
    if bottleneck == "none":
        assert float(out.kl_g.abs().sum() + out.kl_d.abs().sum()) == 0
    # extra padding changes nothing: the shortest sentence alone vs inside the padded batch
    i = int(m.sum(-1).argmin())
    n = int(m[i].sum())
    alone = model(x[i : i + 1, :n], m[i : i + 1, :n])
    torch.testing.assert_close(alone.logits[0], out.logits[i, :n], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone.kl_g[0], out.kl_g[i], rtol=1e-5, atol=1e-6)


def test_input_errors(tok):
    model = tiny(tok, "nvib")
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="at least one token"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at most 32"):
        model(torch.ones(1, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="no prior"):
        tiny(tok, "none").sample_prior(2)
    with pytest.raises(ValueError, match="no training lengths"):
        model.sample_prior(2)


# ------------------------------------------------------------------------------------------ learning


@pytest.mark.parametrize("bottleneck", BOTTLENECKS)
def test_tiny_model_overfits_a_few_sentences(tok, bottleneck):
    model = tiny(tok, bottleneck)
    x, m = batch(tok)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    first = None
    for _ in range(200):
        model.train()
        out = model(x, m)
        first = float(out.loss.detach()) if first is None else first
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    assert float(out.loss) < 0.1 * first
    assert tok.batch_decode(model.reconstruct(x, m), skip_special_tokens=True) == SENTS


# ------------------------------------------------------------------------------------------ sampling, interpolation


def test_prior_sampling_is_seeded_and_uses_training_lengths(tok):
    for bottleneck in ("nvib", "pooled"):
        model = tiny(tok, bottleneck).eval()
        x, m = batch(tok)
        model.observe_lengths(m)
        a = model.sample_prior(6, torch.Generator().manual_seed(3))
        b = model.sample_prior(6, torch.Generator().manual_seed(3))
        c = model.sample_prior(6, torch.Generator().manual_seed(4))
        assert a == b and len(a) == 6
        assert all(len(s) <= model.config.max_length for s in a)
        assert a != c or bottleneck == "pooled" and len(set(map(tuple, a))) == 1  # an untrained decoder may ignore z
    model = tiny(tok, "nvib")
    model.observe_lengths(torch.tensor([[True] * 4 + [False] * 3]))
    assert model.length_counts[4] == 1 and model.length_counts.sum() == 1


@pytest.mark.parametrize("bottleneck", BOTTLENECKS)
def test_interpolation_end_points_are_the_reconstructions(tok, bottleneck):
    model = tiny(tok, bottleneck).eval()
    x, m = batch(tok)
    xa, ma, xb, mb = x[:2], m[:2], x[2:], m[2:]
    path = model.interpolate(xa, xb, [0.0, 0.5, 1.0], ma, mb)
    assert path[0] == model.reconstruct(xa, ma)
    assert path[2] == model.reconstruct(xb, mb)
    assert model.interpolate(xa, xb, [0.5], ma, mb)[0] == path[1]  # deterministic
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.interpolate(xa, xb, [1.5], ma, mb)


def test_mixed_nv_latent_weights(tok):
    model = tiny(tok, "nvib", alpha_threshold=None).eval()
    x, m = batch(tok)
    ma, _, _ = model.encode(x[:2], m[:2])
    mb, _, _ = model.encode(x[2:], m[2:])
    mix = mix_memories(ma, mb, 0.25).latent
    Ca = ma.latent.log_pi.shape[1]
    pi = mix.log_pi.exp()
    torch.testing.assert_close(pi.sum(-1), torch.ones(2, dtype=pi.dtype))
    torch.testing.assert_close(pi[:, :Ca], 0.75 * ma.latent.log_pi.exp())
    torch.testing.assert_close(pi[:, Ca:], 0.25 * mb.latent.log_pi.exp())
    ae = tiny(tok, "none").eval()
    a, _, _ = ae.encode(x[:2], m[:2])
    b, _, _ = ae.encode(x[2:], m[2:])
    w = mix_memories(a, b, 0.25)
    probs = w.log_w.masked_fill(w.pad, float("-inf")).exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(2))
    assert isinstance(mix_memories(Memory(z=torch.zeros(1, 1, 4)), Memory(z=torch.ones(1, 1, 4)), 0.25).z.mean().item(), float)


# ------------------------------------------------------------------------------------------ files and training


def test_save_load_round_trip(tok, tmp_path):
    model = tiny(tok, "nvib").eval()
    x, m = batch(tok)
    model.observe_lengths(m)
    vae.save_model(model, tok, tmp_path, extra={"note": 1})
    loaded, tok2, meta = vae.load_model(tmp_path)
    assert meta["note"] == 1 and loaded.config == model.config and len(tok2) == len(tok)
    torch.testing.assert_close(loaded(x, m).logits, model(x, m).logits)
    assert torch.equal(loaded.length_counts, model.length_counts)
    with pytest.raises(FileNotFoundError, match="not a saved NVAE"):
        vae.load_model(tmp_path / "nothing")


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_train_logs_checkpoints_and_resumes_exactly(tok, tmp_path):
    texts = SENTS * 8
    cfg = vae.TrainConfig(epochs=2, batch_size=8, log_every=2, save_every=3, lr=3e-3, warmup_steps=2)
    straight = tiny(tok, "nvib", dropout=0.1)
    summary = vae.train(straight, tok, texts, tmp_path / "a", cfg, show_progress=False, cpu=True)
    assert summary["steps"] == 8 and summary["processes"] == 1
    rows = list(csv.DictReader((tmp_path / "a" / "log.csv").open()))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8]
    assert all(math.isfinite(float(r["loss"])) and float(r["kept"]) > 0 for r in rows)
    # interrupted after 5 steps (checkpoint at step 3), then resumed: same weights as the straight run
    part = tiny(tok, "nvib", dropout=0.1)
    vae.train(part, tok, texts, tmp_path / "b", vae.TrainConfig(**{**cfg.__dict__, "max_steps": 5}), show_progress=False, cpu=True)
    state = (tmp_path / "b" / "checkpoint" / vae.STATE_FILE).read_text()
    assert '"step": 5' in state
    resumed = tiny(tok, "nvib", dropout=0.1)
    # rewind the checkpoint to step 3 by re-running the first 3 steps only
    vae.train(resumed, tok, texts, tmp_path / "c", vae.TrainConfig(**{**cfg.__dict__, "max_steps": 3}), show_progress=False, cpu=True)
    resumed = tiny(tok, "nvib", dropout=0.1)
    vae.train(resumed, tok, texts, tmp_path / "c", cfg, show_progress=False, cpu=True)
    for k, v in _params(straight).items():
        torch.testing.assert_close(_params(resumed)[k], v, msg=k)
    loaded, _, meta = vae.load_model(tmp_path / "c")
    assert meta["train"]["steps"] == 8 and int(loaded.step) == 8

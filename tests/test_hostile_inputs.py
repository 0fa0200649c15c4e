"""Hostile inputs: every bad argument of the public API is a clear error, or gives the right result.

Each case states the exact outcome: the exception type and a fragment of its one-line message
(which names the argument), or the correct value. **New bad inputs go here**, as a row of the
table that fits:

* ``ERRORS``: ``(call, exception, message fragment)``; ``call`` takes no argument and builds
  whatever it needs (tiny models come from the helpers below);
* ``ATOMIC``: ``(call on a model, exception, fragment)`` where the model must be left exactly as it
  was (knobs, parameters, buffers);
* ``ADAPTER_DAMAGE`` / ``PRETRAINED_DAMAGE``: ``(damage to a saved folder, fragment)``, checked
  through :func:`nvformer.load_adapter`, :func:`nvformer.adapter.load_pretrained` and the
  ``nvformer evaluate --adapter`` command where it reads the folder;

and a test of its own when the outcome is a value (masks, the Dirichlet KL at huge
concentrations, the NVAE's README example).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import mpmath
import pytest
import torch
from helpers import make_latent
from hf_models import build, inputs
from torch import nn

import nvformer as nv
from nvformer.adapter import CONFIG_FILE, TENSORS_FILE, load_pretrained, save_pretrained
from nvformer.cli import main as cli_main
from nvformer.models import NVAE, NVAEConfig

NAN, INF = float("nan"), float("inf")
ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- builders


def encoder(converted: bool = True) -> nn.Module:
    """A 2-layer PyTorch Transformer encoder (width 8), converted at the identity unless told otherwise."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False).eval()
    return nv.convert(enc) if converted else enc


def nvib(**kw) -> nv.NVIB:
    return nv.NVIB(8, 2, **kw)


def latent():
    return make_latent(2, 5, 8, dtype=torch.float32)


def attend(**kw):
    """``denoising_attention`` of 2 heads of size 4 over a width-8 latent, with ``kw`` replacing arguments."""
    args = dict(query=torch.randn(2, 2, 3, 4), latent=latent(), k_weight=torch.randn(8, 8), k_bias=torch.randn(8), v_weight=torch.randn(8, 8),
                v_bias=torch.randn(8))
    args.update(kw)
    return nv.denoising_attention(**args)


def nvae(**kw) -> NVAE:
    torch.manual_seed(0)
    return NVAE(NVAEConfig(**{**dict(vocab_size=20, d_model=16, heads=2, encoder_layers=1, decoder_layers=1, ffn=32, dropout=0.0,
                                     max_length=12), **kw}))


def vae_config(**kw) -> NVAEConfig:
    return NVAEConfig(vocab_size=10, **kw)


def kl_sym(log_A=1.0, B=1.0, K=2.0):
    return nv.kl_symmetric_dirichlet(torch.tensor(log_A, dtype=torch.float64), torch.tensor(B, dtype=torch.float64),
                                     torch.tensor(K, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------- the error table


def _cases(prefix: str, rows: list[tuple]) -> list:
    return [pytest.param(call, error, fragment, id=f"{prefix}:{name}") for name, call, error, fragment in rows]


ERRORS = [
    *_cases("Prior", [
        ("mean-nan", lambda: nv.Prior(4, mean=NAN), ValueError, "Prior: `mean` must be finite"),
        ("mean-inf-entry", lambda: nv.Prior(4, mean=torch.tensor([0.0, INF, 0.0, 0.0])), ValueError, "Prior: `mean` must be finite"),
        ("var-nan-entry", lambda: nv.Prior(4, var=torch.tensor([1.0, 1.0, NAN, 1.0])), ValueError, "Prior: `var` must be finite"),
        ("var-inf", lambda: nv.Prior(4, var=INF), ValueError, "Prior: `var` must be finite"),
        ("var-zero", lambda: nv.Prior(4, var=0.0), ValueError, "Prior: `var` must be strictly positive"),
        ("log_alpha-nan", lambda: nv.Prior(4, log_alpha=NAN), ValueError, "Prior: `log_alpha` must be finite"),
        ("log_alpha-inf", lambda: nv.Prior(4, log_alpha=torch.tensor(-INF)), ValueError, "Prior: `log_alpha` must be finite"),
        ("log_alpha_std-inf", lambda: nv.Prior(4, log_alpha_std=INF), ValueError, "Prior: `log_alpha_std` must be finite"),
        ("log_alpha_std-nan", lambda: nv.Prior(4, log_alpha_std=NAN), ValueError, "Prior: `log_alpha_std` must be finite"),
        ("log_alpha_std-zero", lambda: nv.Prior(4, log_alpha_std=0.0), ValueError, "Prior: `log_alpha_std` must be > 0"),
        ("mean-text", lambda: nv.Prior(4, mean="zero"), ValueError, "Prior: `mean` must be a number or a tensor, got str"),
        ("mean-shape", lambda: nv.Prior(4, mean=torch.zeros(3)), ValueError, "Prior: `mean` must be a scalar or have shape [4], got (3,)"),
        ("dim-bool", lambda: nv.Prior(True), ValueError, "Prior: `dim` must be a positive int, got True"),
    ]),
    *_cases("PriorEstimator", [
        ("dim-zero", lambda: nv.PriorEstimator(0, 0.5), ValueError, "PriorEstimator: `dim` must be an int >= 1, got 0"),
        ("scale-nan", lambda: nv.PriorEstimator(4, NAN), ValueError, "PriorEstimator: `scale` must be finite, got nan"),
        ("scale-zero", lambda: nv.PriorEstimator(4, 0.0), ValueError, "PriorEstimator: `scale` must be > 0.0, got 0.0"),
        ("update-list", lambda: nv.PriorEstimator(4, 0.5).update([[0.0] * 4]), ValueError, "PriorEstimator.update: `x` must be a tensor ending in dim 4, got list"),
        ("update-width", lambda: nv.PriorEstimator(4, 0.5).update(torch.zeros(2, 3)), ValueError, "PriorEstimator.update: `x` must be a tensor ending in dim 4, got (2, 3)"),
        ("prior-min_var", lambda: nv.PriorEstimator(4, 0.5).prior(min_var=NAN), ValueError, "PriorEstimator.prior: `min_var` must be finite"),
    ]),
    *_cases("DirichletSpec", [
        ("tau-inf", lambda: nv.DirichletSpec(tau=INF), ValueError, "DirichletSpec: `tau` must be finite, got inf"),
        ("tau-nan", lambda: nv.DirichletSpec(tau=NAN), ValueError, "DirichletSpec: `tau` must be finite, got nan"),
        ("tau-zero", lambda: nv.DirichletSpec(tau=0.0), ValueError, "DirichletSpec: `tau` must be > 0.0, got 0.0"),
        ("eps-negative", lambda: nv.DirichletSpec(eps=-1e-4), ValueError, "DirichletSpec: `eps` must be > 0.0"),
        ("prior_tau-inf", lambda: nv.DirichletSpec(prior_tau=INF), ValueError, "DirichletSpec: `prior_tau` must be finite"),
        ("prior_alpha-nan", lambda: nv.DirichletSpec(prior_alpha=NAN), ValueError, "DirichletSpec: `prior_alpha` must be finite"),
        ("concentration", lambda: nv.DirichletSpec(concentration="relu"), ValueError, "DirichletSpec: `concentration` must be one of"),
        ("learn_tau-text", lambda: nv.DirichletSpec(learn_tau="yes"), ValueError, "DirichletSpec: `learn_tau` must be True or False"),
    ]),
    *_cases("NVAEConfig", [
        ("lambda_g-nan", lambda: vae_config(lambda_g=NAN), ValueError, "NVAEConfig: `lambda_g` must be finite, got nan"),
        ("lambda_d-negative", lambda: vae_config(lambda_d=-0.1), ValueError, "NVAEConfig: `lambda_d` must be >= 0.0, got -0.1"),
        ("lambda_d-inf", lambda: vae_config(lambda_d=INF), ValueError, "NVAEConfig: `lambda_d` must be finite"),
        ("dropout-nan", lambda: vae_config(dropout=NAN), ValueError, "NVAEConfig: `dropout` must be in [0, 1), got nan"),
        ("prior_var-inf", lambda: vae_config(prior_var=INF), ValueError, "NVAEConfig: `prior_var` must be finite"),
        ("prior_log_alpha-nan", lambda: vae_config(prior_log_alpha=NAN), ValueError, "NVAEConfig: `prior_log_alpha` must be finite"),
        ("init_stdev-zero", lambda: vae_config(init_stdev=0.0), ValueError, "NVAEConfig: `init_stdev` must be > 0.0"),
        ("delta-nan", lambda: vae_config(delta=NAN), ValueError, "NVAEConfig: `delta` must be finite"),
        ("alpha_threshold-nan", lambda: vae_config(alpha_threshold=NAN), ValueError, "NVAEConfig: `alpha_threshold` must be finite"),
        ("ratio-above-1", lambda: vae_config(ratio=2.0), ValueError, "NVAEConfig: `ratio` must be <= 1.0, got 2.0"),
        ("heads-zero", lambda: vae_config(heads=0), ValueError, "NVAEConfig: `heads` must be an int >= 1, got 0"),
        ("kappa-float", lambda: vae_config(kappa=1.5), ValueError, "NVAEConfig: `kappa` must be an int >= 1, got 1.5"),
        ("warmup-zero", lambda: vae_config(warmup=0), ValueError, "NVAEConfig: `warmup` must be an int >= 1, got 0"),
        ("pad_id-out-of-vocabulary", lambda: vae_config(pad_id=10), ValueError, "NVAEConfig: `pad_id` must be a token id below `vocab_size` (10)"),
        ("from_dict-no-vocab", lambda: NVAEConfig.from_dict({"d_model": 16}), ValueError, "NVAEConfig.from_dict: `vocab_size` is required"),
        ("from_dict-list", lambda: NVAEConfig.from_dict([1, 2]), ValueError, "NVAEConfig.from_dict: expected a mapping"),
    ]),
    *_cases("NVAE", [
        ("sample_prior-without-lengths", lambda: nvae().sample_prior(2), ValueError,
         "no training lengths observed: call model.observe_lengths(attention_mask)"),
        ("sample_prior-n-zero", lambda: nvae().sample_prior(0), ValueError, "NVAE.sample_prior: `n` must be an int >= 1, got 0"),
        ("sample_prior-n-float", lambda: nvae().sample_prior(2.5), ValueError, "NVAE.sample_prior: `n` must be an int >= 1, got 2.5"),
        ("sample_prior-autoencoder", lambda: nvae(bottleneck="none").sample_prior(2), ValueError, "has no prior to sample from"),
        ("observe_lengths-float", lambda: nvae().observe_lengths(torch.ones(2, 3)), ValueError,
         "NVAE.observe_lengths: `attention_mask` must be a [B, S] bool or integer tensor"),
        ("generate-zero-tokens", lambda: nvae(bottleneck="pooled").generate(nv.models.nvae.Memory(z=torch.zeros(1, 1, 16)), 0), ValueError,
         "NVAE.generate: `max_new_tokens` must be an int >= 1, got 0"),
    ]),
    *_cases("NVIB", [
        ("num_heads-zero", lambda: nv.NVIB(8, 0), ValueError, "NVIB: `num_heads` must be an int >= 1, got 0"),
        ("num_heads-bool", lambda: nv.NVIB(8, True), ValueError, "NVIB: `num_heads` must be an int >= 1, got True"),
        ("dim-zero", lambda: nv.NVIB(0, 1), ValueError, "NVIB: `dim` must be an int >= 1, got 0"),
        ("dim-float", lambda: nv.NVIB(8.0, 2), ValueError, "NVIB: `dim` must be an int >= 1, got 8.0"),
        ("dim-indivisible", lambda: nv.NVIB(9, 2), ValueError, "NVIB: `dim` (9) must be divisible by `num_heads` (2), or pass `head_dim`"),
        ("head_dim-zero", lambda: nvib(head_dim=0), ValueError, "NVIB: `head_dim` must be an int >= 1, got 0"),
        ("head_dim-negative", lambda: nvib(head_dim=-4), ValueError, "NVIB: `head_dim` must be an int >= 1, got -4"),
        ("kappa-zero", lambda: nvib(kappa=0), ValueError, "NVIB: `kappa` must be an int >= 1, got 0"),
        ("kappa-bool", lambda: nvib(kappa=True), ValueError, "NVIB: `kappa` must be an int >= 1, got True"),
        ("delta-nan", lambda: nvib(delta=NAN), ValueError, "NVIB: `delta` must be finite, got nan"),
        ("delta-negative", lambda: nvib(delta=-1.0), ValueError, "NVIB: `delta` must be >= 0.0, got -1.0"),
        ("alpha_threshold-nan", lambda: nvib(alpha_threshold=NAN), ValueError, "NVIB: `alpha_threshold` must be finite, got nan"),
        ("alpha_threshold-inf", lambda: nvib(alpha_threshold=INF), ValueError, "NVIB: `alpha_threshold` must be finite, got inf"),
        ("alpha_threshold-zero", lambda: nvib(alpha_threshold=0.0), ValueError, "NVIB: `alpha_threshold` must be > 0.0, got 0.0"),
        ("threshold_mode", lambda: nvib(threshold_mode="percent"), ValueError, "NVIB: `threshold_mode` must be one of"),
        ("scale-nan", lambda: nvib(scale=NAN), ValueError, "NVIB: `scale` must be finite, got nan"),
        ("scale-inf", lambda: nvib(scale=INF), ValueError, "NVIB: `scale` must be finite, got inf"),
        ("scale-zero", lambda: nvib(scale=0.0), ValueError, "NVIB: `scale` must be > 0.0, got 0.0"),
        ("min_var-zero", lambda: nvib(min_var=0.0), ValueError, "NVIB: `min_var` must be > 0.0, got 0.0"),
        ("min_var-negative", lambda: nvib(min_var=-1e-20), ValueError, "NVIB: `min_var` must be > 0.0"),
        ("min_var-nan", lambda: nvib(min_var=NAN), ValueError, "NVIB: `min_var` must be finite, got nan"),
        ("prior-type", lambda: nvib(prior="standard"), ValueError, "NVIB: `prior` must be a nvformer.Prior or None, got str"),
        ("prior-width", lambda: nvib(prior=nv.Prior(4)), ValueError, "NVIB: the prior has dim 4 but the layer's width is 8"),
        ("alpha_tau-nan", lambda: nvib(alpha_tau=NAN), ValueError, "NVIB: Knobs: knob `alpha_tau` must be finite, got nan"),
        ("stdev_tau-overflow", lambda: nvib(stdev_tau=1e200), ValueError, "NVIB: knob `stdev_tau` = 1e+200 makes the token variances"),
        ("alpha_tau-overflow", lambda: nvib(alpha_tau=1e39), ValueError, "NVIB: knob `alpha_tau` = 1e+39 makes the pseudo-count bias"),
        ("mu_tau-overflow", lambda: nvib(mu_tau=1e39), ValueError, "NVIB: knob `mu_tau` = 1e+39 makes"),
        ("set_prior-type", lambda: nvib().set_prior("standard"), ValueError, "NVIB.set_prior: `prior` must be a nvformer.Prior, got str"),
        ("forward-alpha_skip-list", lambda: nvib()(torch.zeros(1, 3, 8), alpha_skip=[0.0] * 3), ValueError,
         "NVIB.forward: `alpha_skip` must be a tensor of shape [1, 3], got list"),
        ("forward-int-padding", lambda: nvib()(torch.zeros(1, 3, 8), key_padding_mask=torch.zeros(1, 3, dtype=torch.long)), ValueError,
         "NVIB.forward: `key_padding_mask` must be bool (True = pad), got dtype torch.int64"),
        ("sample_prior-list", lambda: nvib().sample_prior([2, 3]), ValueError, "NVIB.sample_prior: `lengths` must be a 1-D integer tensor, got list"),
        ("sample_prior-zero", lambda: nvib().sample_prior(torch.tensor([0, 2])), ValueError, "NVIB.sample_prior: every entry of `lengths` must be >= 1"),
        ("set_prior-huge-spread", lambda: nvib(alpha_tau=1e4).set_prior(nv.Prior(8, log_alpha_std=1e36)), ValueError,
         "NVIB.set_prior: knob `alpha_tau` = 10000.0 makes the pseudo-count bias"),
    ]),
    *_cases("NVMultiheadAttention", [
        ("num_heads-zero", lambda: nv.NVMultiheadAttention(8, 0), ValueError, "NVMultiheadAttention: `num_heads` must be an int >= 1, got 0"),
        ("embed_dim-zero", lambda: nv.NVMultiheadAttention(0, 2), ValueError, "NVMultiheadAttention: `embed_dim` must be an int >= 1, got 0"),
        ("indivisible", lambda: nv.NVMultiheadAttention(10, 4), ValueError, "`embed_dim` (10) must be divisible by `num_heads` (4)"),
        ("dropout-nan", lambda: nv.NVMultiheadAttention(8, 2, dropout=NAN), ValueError, "NVMultiheadAttention: `dropout` must be in [0, 1), got nan"),
        ("dropout-one", lambda: nv.NVMultiheadAttention(8, 2, dropout=1.0), ValueError, "`dropout` must be in [0, 1), got 1.0"),
        ("kdim-zero", lambda: nv.NVMultiheadAttention(8, 2, kdim=0, vdim=0), ValueError, "NVMultiheadAttention: `kdim` must be an int >= 1, got 0"),
        ("formula", lambda: nv.NVMultiheadAttention(8, 2, formula="magic"), ValueError, "NVMultiheadAttention: `formula` must be one of"),
        ("min_var-zero", lambda: nv.NVMultiheadAttention(8, 2, min_var=0.0), ValueError, "NVIB: `min_var` must be > 0.0"),
        ("scale-nan", lambda: nv.NVMultiheadAttention(8, 2, scale=NAN), ValueError, "NVIB: `scale` must be finite"),
    ]),
    *_cases("DirichletAttention", [
        ("num_heads-zero", lambda: nv.DirichletAttention(8, 0), ValueError, "DirichletAttention: `num_heads` must be an int >= 1, got 0"),
        ("embed_dim-negative", lambda: nv.DirichletAttention(-8, 2), ValueError, "DirichletAttention: `embed_dim` must be an int >= 1, got -8"),
        ("dropout-nan", lambda: nv.DirichletAttention(8, 2, dropout=NAN), ValueError, "DirichletAttention: `dropout` must be in [0, 1), got nan"),
        ("spec-type", lambda: nv.DirichletAttention(8, 2, spec="softmax"), ValueError, "DirichletAttention: `spec` must be a DirichletSpec, got str"),
        ("value-shape", lambda: nv.DirichletAttention(8, 2)(torch.randn(2, 3, 8), torch.randn(2, 4, 8), torch.randn(2, 5, 8)), ValueError,
         "DirichletAttention.forward: need `query` [B, Nq, 8] and `key`, `value` [B, Nk, 8] of the same batch"),
    ]),
    *_cases("Knobs", [
        ("alpha_tau-nan", lambda: nv.Knobs(alpha_tau=NAN), ValueError, "Knobs: knob `alpha_tau` must be finite, got nan"),
        ("stdev_tau-negative", lambda: nv.Knobs(stdev_tau=-0.1), ValueError, "Knobs: knob `stdev_tau` must be >= 0.0, got -0.1"),
        ("mu_tau-inf", lambda: nv.Knobs(mu_tau=INF), ValueError, "Knobs: knob `mu_tau` must be finite, got inf"),
        ("alpha_tau-text", lambda: nv.Knobs(alpha_tau="high"), ValueError, "Knobs: knob `alpha_tau` must be a real number, got 'high'"),
        ("alpha_tau-bool", lambda: nv.Knobs(alpha_tau=True), ValueError, "Knobs: knob `alpha_tau` must be a real number, got True"),
    ]),
    *_cases("NVConfig", [
        ("delta-nan", lambda: nv.NVConfig(delta=NAN), ValueError, "NVConfig: `delta` must be finite, got nan"),
        ("min_var-zero", lambda: nv.NVConfig(min_var=0.0), ValueError, "NVConfig: `min_var` must be > 0.0, got 0.0"),
        ("min_var-nan", lambda: nv.NVConfig(min_var=NAN), ValueError, "NVConfig: `min_var` must be finite, got nan"),
        ("alpha_threshold-nan", lambda: nv.NVConfig(alpha_threshold=NAN), ValueError, "NVConfig: `alpha_threshold` must be finite"),
        ("kappa-bool", lambda: nv.NVConfig(kappa=True), ValueError, "NVConfig: `kappa` must be an int >= 1, got True"),
        ("sites-number", lambda: nv.NVConfig(sites=3), ValueError, "NVConfig: `sites` must be a site or a sequence of sites"),
        ("knobs-list", lambda: nv.NVConfig(knobs=[nv.IDENTITY]), ValueError, "NVConfig: `knobs` must map group keys to knob settings, got list"),
        ("knob-nan", lambda: nv.NVConfig(knobs={"*": {"alpha_tau": NAN}}), ValueError, "knob `alpha_tau` must be finite"),
        ("from_dict-nan", lambda: nv.NVConfig.from_dict({"knobs": {"*": {"stdev_tau": NAN}}}), ValueError, "knob `stdev_tau` must be finite"),
    ]),
    *_cases("KnobSpace", [
        ("alpha_tau-nan", lambda: nv.KnobSpace(alpha_tau=(NAN, 1.0)), ValueError, "KnobSpace: `alpha_tau` must be a finite (low, high) pair"),
        ("stdev_tau-inf", lambda: nv.KnobSpace(stdev_tau=(0.0, INF)), ValueError, "KnobSpace: `stdev_tau` must be a finite (low, high) pair"),
        ("mu_tau-nan", lambda: nv.KnobSpace(mu_tau=(NAN, NAN)), ValueError, "KnobSpace: `mu_tau` must be a finite (low, high) pair"),
        ("alpha_tau-text", lambda: nv.KnobSpace(alpha_tau=("a", 1)), ValueError, "KnobSpace: `alpha_tau` must be a finite (low, high) pair"),
        ("alpha_tau-scalar", lambda: nv.KnobSpace(alpha_tau=5), ValueError, "KnobSpace: `alpha_tau` must be a finite (low, high) pair"),
        ("alpha_tau-triple", lambda: nv.KnobSpace(alpha_tau=(1, 2, 3)), ValueError, "KnobSpace: `alpha_tau` must be a finite (low, high) pair"),
        ("alpha_tau-reversed", lambda: nv.KnobSpace(alpha_tau=(2, 1)), ValueError, "KnobSpace: `alpha_tau` must be a finite (low, high) pair"),
    ]),
    *_cases("denoising_attention", [
        ("k_bias-shape", lambda: attend(k_bias=torch.randn(5)), ValueError, "denoising_attention: `k_bias` must have shape [8] or be None, got (5,)"),
        ("v_bias-shape", lambda: attend(v_bias=torch.randn(8, 1)), ValueError, "denoising_attention: `v_bias` must have shape [8] or be None, got (8, 1)"),
        ("k_bias-list", lambda: attend(k_bias=[0.0] * 8), ValueError, "denoising_attention: `k_bias` must have shape [8] or be None, got list"),
        ("v_weight-shape", lambda: attend(v_weight=torch.randn(8, 4)), ValueError, "denoising_attention: `v_weight` must have shape [8, 8], got (8, 4)"),
        ("scale-nan", lambda: attend(scale=NAN), ValueError, "denoising_attention: `scale` must be finite, got nan"),
        ("scale-negative", lambda: attend(scale=-1.0), ValueError, "denoising_attention: `scale` must be > 0.0"),
        ("dropout_p-nan", lambda: attend(dropout_p=NAN), ValueError, "denoising_attention: `dropout_p` must be finite, got nan"),
        ("dropout_p-above-1", lambda: attend(dropout_p=1.5), ValueError, "denoising_attention: `dropout_p` must be <= 1.0, got 1.5"),
        ("latent-type", lambda: attend(latent="latent"), ValueError, "denoising_attention: `latent` must be an NVLatent"),
        ("query-int", lambda: attend(query=torch.ones(2, 2, 3, 4, dtype=torch.long)), ValueError,
         "denoising_attention: `query` must be a floating-point tensor, got dtype torch.int64"),
        ("formula", lambda: attend(formula="magic"), ValueError, "denoising_attention: `formula` must be one of"),
        ("impl", lambda: attend(impl="cuda"), ValueError, "denoising_attention: `impl` must be one of ('auto', 'fast', 'reference')"),
    ]),
    *_cases("kl", [
        ("symmetric-B-zero", lambda: kl_sym(B=0.0), ValueError, "kl_symmetric_dirichlet: `B` must be finite and > 0 everywhere"),
        ("symmetric-K-below-1", lambda: kl_sym(K=0.5), ValueError, "kl_symmetric_dirichlet: `K` must be finite and >= 1 everywhere"),
        ("symmetric-log_A-nan", lambda: kl_sym(log_A=NAN), ValueError, "kl_symmetric_dirichlet: `log_A` must be finite everywhere"),
        ("dirichlet-delta-nan", lambda: nv.kl_dirichlet(latent(), nv.Prior(8), delta=NAN), ValueError, "kl_dirichlet: `delta` must be finite"),
        ("dirichlet-prior-type", lambda: nv.kl_dirichlet(latent(), "prior"), ValueError, "kl_dirichlet: `prior` must be a nvformer.Prior, got str"),
        ("gaussian-prior-type", lambda: nv.kl_gaussian(latent(), None), ValueError, "kl_gaussian: `prior` must be a nvformer.Prior, got NoneType"),
        ("gaussian-latent-type", lambda: nv.kl_gaussian(torch.zeros(2), nv.Prior(8)), ValueError, "kl_gaussian: `latent` must be a nvformer.NVLatent"),
        ("gaussian-reduction", lambda: nv.kl_gaussian(latent(), nv.Prior(8), reduction="max"), ValueError, "kl_gaussian: `reduction` must be"),
    ]),
    *_cases("sampling", [
        ("gamma-nan", lambda: nv.sample_log_gamma(torch.tensor([0.0, NAN])), ValueError, "sample_log_gamma: `log_concentration` must not be NaN or +inf"),
        ("gamma-inf", lambda: nv.sample_log_gamma(torch.tensor([INF])), ValueError, "sample_log_gamma: `log_concentration` must not be NaN or +inf"),
        ("gamma-list", lambda: nv.sample_log_gamma([0.0]), ValueError, "sample_log_gamma: `log_concentration` must be a tensor, got list"),
        ("dirichlet-int-mask", lambda: nv.sample_log_dirichlet(torch.zeros(3), torch.tensor([0, 1, 0])), ValueError,
         "sample_log_dirichlet: `pad_mask` must be a bool tensor"),
    ]),
    *_cases("api", [
        ("convert-gpt2-encoder", lambda: nv.convert(build("gpt2"), sites=("encoder",)), ValueError,
         "nvformer.convert: GPT2LMHeadModel has no attention module at site(s) ['encoder']; its sites are ['decoder']"),
        ("convert-config-type", lambda: nv.convert(encoder(False), "paper"), ValueError, "nvformer.convert: `config` must be an NVConfig or None, got str"),
        ("convert-prior-type", lambda: nv.convert(encoder(False), prior="empirical"), ValueError,
         "nvformer.convert: `prior` must be a nvformer.Prior, a {module name: Prior} mapping or None, got str"),
        ("convert-prior-entry-type", lambda: nv.convert(encoder(False), prior={f"layers.{i}.self_attn": 1.0 for i in (0, 1)}), ValueError,
         "nvformer.convert: the prior for `layers.0.self_attn` must be a nvformer.Prior, got float"),
        ("convert-kappa", lambda: nv.convert(encoder(False), kappa=0), ValueError, "nvformer.convert: NVConfig: `kappa` must be an int >= 1, got 0"),
        ("convert-min_var", lambda: nv.convert(encoder(False), min_var=-1.0), ValueError, "`min_var` must be > 0.0"),
        ("convert-stdev-overflow", lambda: nv.convert(encoder(False), stdev_tau=1e200), ValueError, "knob `stdev_tau` = 1e+200 makes"),
        ("estimate_prior-no-data", lambda: nv.estimate_prior(encoder(False), [], show_progress=False), ValueError, "estimate_prior: no data"),
        ("estimate_prior-no-data-hf", lambda: nv.estimate_prior(build("bert"), [], show_progress=False), ValueError, "estimate_prior: no data"),
        ("set_knobs-knobs-type", lambda: nv.set_knobs(encoder(), 3), ValueError, "nvformer.set_knobs: `knobs` must be an NVConfig, a Knobs or"),
        ("set_prediction-mode", lambda: nv.set_prediction(encoder(), "max"), ValueError, "nvformer.set_prediction: `mode` must be one of"),
        ("save_adapter-onto-a-file", lambda: nv.save_adapter(encoder(), Path(__file__)), ValueError, "nvformer.save_adapter: "),
    ]),
    *_cases("fit_knobs", [
        ("objective", lambda: nv.fit_knobs(encoder(), [torch.randn(2, 3, 8)], "kl"), ValueError, "nvformer.fit_knobs: `objective` must be one of"),
        ("groups", lambda: nv.fit_knobs(encoder(), [torch.randn(2, 3, 8)], "entropy", groups="neuron"), ValueError,
         "nvformer.fit_knobs: `groups` must be one of ('site', 'layer', 'head')"),
        ("lr-nan", lambda: nv.fit_knobs(encoder(), [torch.randn(2, 3, 8)], "entropy", lr=NAN), ValueError, "nvformer.fit_knobs: `lr` must be finite"),
        ("steps-float", lambda: nv.fit_knobs(encoder(), [torch.randn(2, 3, 8)], "entropy", steps=2.5), ValueError,
         "nvformer.fit_knobs: `steps` must be an int >= 1, got 2.5"),
        ("no-batches", lambda: nv.fit_knobs(encoder(), [], "entropy"), ValueError, "nvformer.fit_knobs: `batches` is empty"),
        ("unconverted", lambda: nv.fit_knobs(build("bert"), [{}], "entropy"), ValueError, "nvformer.fit_knobs: BertForSequenceClassification has no NV"),
        ("head-on-torch", lambda: nv.fit_knobs(encoder(), [torch.randn(2, 3, 8)], "entropy", groups="head"), ValueError,
         "nvformer.fit_knobs: groups='head' needs a converted Hugging Face model"),
        ("nan-objective", lambda: nv.fit_knobs(encoder(), [torch.randn(2, 3, 8)], lambda out, b: out.sum() * NAN, show_progress=False), ValueError,
         "nvformer.fit_knobs: the objective is not finite at step 1"),
    ]),
    *_cases("set_head_knobs", [
        ("torch-model", lambda: nv.set_head_knobs(encoder(), {}), ValueError, "nvformer.set_head_knobs: per-head knobs are supported on converted Hugging Face"),
        ("not-a-mapping", lambda: nv.set_head_knobs(nv.convert(build("bert")), [1.0]), ValueError, "nvformer.set_head_knobs: `knobs` must map group keys"),
        ("wrong-length", lambda: nv.set_head_knobs(nv.convert(build("bert")), {"encoder.0": {"alpha_tau": [1.0, 2.0]}}), ValueError,
         "`alpha_tau` must be a number or 4 values (one per key/value head), got shape (2,)"),
        ("negative-stdev", lambda: nv.set_head_knobs(nv.convert(build("bert")), {"encoder.0": {"stdev_tau": -0.1}}), ValueError,
         "`stdev_tau` must be finite and >= 0"),
        ("text", lambda: nv.set_head_knobs(nv.convert(build("bert")), {"encoder.0": {"alpha_tau": "high"}}), ValueError, "`alpha_tau` must be numbers"),
    ]),
]


@pytest.mark.parametrize("call, error, fragment", ERRORS)
def test_bad_input_is_a_clear_error(call, error, fragment):
    with pytest.raises(error, match=re.escape(fragment)) as info:
        call()
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------- nothing changes on error


def _state(model: nn.Module) -> tuple:
    knobs = nv.get_knobs(model) if nv.api.nv_modules(model) else None
    return knobs, {k: v.clone() for k, v in model.state_dict().items()}


ATOMIC = [
    pytest.param(lambda m: nv.set_knobs(m, stdev_tau=1e200), ValueError, "nvformer.set_knobs (encoder.0): knob `stdev_tau` = 1e+200 makes",
                 id="set_knobs-stdev-overflow"),
    pytest.param(lambda m: nv.set_knobs(m, {"encoder.0": nv.Knobs(alpha_tau=1.0), "encoder.1": nv.Knobs(alpha_tau=1e39)}), ValueError,
                 "nvformer.set_knobs (encoder.1): knob `alpha_tau` = 1e+39 makes", id="set_knobs-second-group-overflows"),
    pytest.param(lambda m: nv.set_knobs(m, alpha_tau=NAN), ValueError, "knob `alpha_tau` must be finite", id="set_knobs-nan"),
    pytest.param(lambda m: nv.set_knobs(m, {"encoder.9": nv.IDENTITY}), ValueError, "knob group(s) ['encoder.9'] match no NV module",
                 id="set_knobs-unknown-group"),
    pytest.param(lambda m: m.layers[0].self_attn.nvib.set_knobs(stdev_tau=1e200), ValueError, "NVIB.set_knobs: knob `stdev_tau` = 1e+200",
                 id="NVIB.set_knobs-stdev-overflow"),
    pytest.param(lambda m: m.layers[0].self_attn.nvib.set_knobs(mu_tau=NAN), ValueError, "NVIB.set_knobs: Knobs: knob `mu_tau` must be finite",
                 id="NVIB.set_knobs-nan"),
    pytest.param(lambda m: m.layers[1].self_attn.nvib.set_prior(nv.Prior(8, log_alpha_std=torch.tensor(2e38, dtype=torch.float64))),
                 ValueError, "NVIB.set_prior: knob `alpha_tau` = 3.0 makes the pseudo-count bias", id="NVIB.set_prior-overflow"),
]


@pytest.mark.parametrize("call, error, fragment", ATOMIC)
def test_a_refused_change_leaves_the_model_as_it_was(call, error, fragment):
    model = encoder()
    nv.set_knobs(model, alpha_tau=3.0, stdev_tau=0.5)
    before = _state(model)
    with pytest.raises(error, match=re.escape(fragment)):
        call(model)
    after = _state(model)
    assert after[0] == before[0]
    assert list(after[1]) == list(before[1]) and all(torch.equal(after[1][k], v) and after[1][k].dtype == v.dtype for k, v in before[1].items())
    nvib = model.layers[1].self_attn.nvib
    assert nvib.in_identity_form() and bool(torch.isfinite(nvib.logvar_proj.bias).all())


# ---------------------------------------------------------------------------------------------- masks: right results, same errors


def _mean_limit_dirichlet(mha: nn.MultiheadAttention) -> nv.DirichletAttention:
    """Dirichlet attention whose posterior-mean weights are the softmax (eps ~ 0)."""
    return nv.DirichletAttention.from_mha(mha, nv.DirichletSpec(eps=1e-12)).eval()


def test_dirichlet_attention_takes_finite_additive_masks_like_mha():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    dl = _mean_limit_dirichlet(mha)
    x = torch.randn(2, 5, 8)
    attn = torch.tensor([[0.0, -1e4, 0.7, -2.5, 0.0]] * 5)  # finite additive values, -1e4 as "masked"
    kpm = torch.tensor([[0.0, 0.0, -1e4, 0.3, 0.0], [0.0, -1.5, 0.0, 0.0, -INF]])  # float padding: finite values are added
    for kw in (dict(attn_mask=attn), dict(key_padding_mask=kpm), dict(attn_mask=attn, key_padding_mask=kpm)):
        ref, ref_w = mha(x, x, x, **kw)
        out, w = dl(x, x, x, **kw)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w, ref_w, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # -1e4 leaves the key the eps share of a visible key only: eps / (n (tau + eps)) = 2e-14
        assert float(dl(x, x, x, attn_mask=attn)[1][..., 1].max()) < 3e-14


@pytest.mark.parametrize("mask", ["attn_mask", "key_padding_mask"])
def test_int_masks_are_refused_as_nv_attention_and_nn_multihead_attention_refuse_them(mask):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    m = torch.zeros(5, 5, dtype=torch.long) if mask == "attn_mask" else torch.zeros(2, 5, dtype=torch.long)
    fragment = f"`{mask}` must be bool (True = masked out) or floating-point (additive), got dtype torch.int64"
    messages = []
    for module, where in ((nv.NVMultiheadAttention.from_mha(mha), "NVMultiheadAttention.forward"),
                          (_mean_limit_dirichlet(mha), "DirichletAttention.forward")):
        with pytest.raises(ValueError, match=re.escape(fragment)) as info:
            module(x, x, x, **{mask: m})
        messages.append(str(info.value).removeprefix(f"{where}: "))
    assert messages[0] == messages[1] == fragment
    with pytest.raises(AssertionError, match="only bool and floating types"):  # torch's own module refuses them too
        mha(x, x, x, **{mask: m})


# ---------------------------------------------------------------------------------------------- the Dirichlet KL at huge concentrations


def _mp_dirichlet_kl(log_cq: list[float], log_cp: list[float]) -> float:
    """KL(Dir(c_q) || Dir(c_p)) by the textbook formula in mpmath, with digits to spare for its cancellation."""
    mpmath.mp.dps = int(max(log_cq + log_cp) / math.log(10)) + 40
    cq, cp = [mpmath.exp(mpmath.mpf(v)) for v in log_cq], [mpmath.exp(mpmath.mpf(v)) for v in log_cp]
    Cq, Cp = sum(cq), sum(cp)
    kl = mpmath.loggamma(Cq) - mpmath.loggamma(Cp)
    for a, b in zip(cq, cp):
        kl += mpmath.loggamma(b) - mpmath.loggamma(a) + (a - b) * (mpmath.digamma(a) - mpmath.digamma(Cq))
    return float(kl)


@pytest.mark.parametrize("prior_scale", [0.0, 5.0, 20.0])
@pytest.mark.parametrize("log_scale", [0.0, 7.0, 20.0, 30.0, 40.0, 100.0, 200.0])
def test_dirichlet_kl_is_exact_at_huge_concentrations(log_scale, prior_scale):
    """Posterior concentrations up to e^200 (the textbook formula gave 0 instead of 79 at e^40), against mpmath."""
    g = torch.Generator().manual_seed(int(log_scale) + 7 * int(prior_scale))
    lq = torch.randn(3, 6, generator=g, dtype=torch.float64) + log_scale
    lp = torch.randn(3, 6, generator=g, dtype=torch.float64) + prior_scale
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1, 4:] = True
    ours = nv.dirichlet_kl(lq.masked_fill(pad, -INF), lp, pad)
    for i in range(3):
        keep = ~pad[i]
        ref = _mp_dirichlet_kl(lq[i][keep].tolist(), lp[i][keep].tolist())
        assert float(ours[i]) == pytest.approx(ref, rel=1e-10, abs=1e-10)
    assert float(nv.dirichlet_kl(lq, lq).abs().max()) == 0.0  # KL(q || q) = 0 exactly, at any scale


# ---------------------------------------------------------------------------------------------- the NVAE's README example


def test_the_readme_nvae_example_samples_from_the_prior():
    """As README.md's NVAE section writes it: a forward, observe_lengths, eval, then sample_prior."""
    model = nvae()
    input_ids = torch.tensor([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]])
    attention_mask = (input_ids != 0).long()
    out = model(input_ids, attention_mask)
    assert out.logits.shape == (2, 5, 20)
    model.observe_lengths(attention_mask)
    model.eval()
    samples = model.sample_prior(8, torch.Generator().manual_seed(0))
    assert len(samples) == 8 and all(len(s) <= model.config.max_length for s in samples)
    assert samples == model.sample_prior(8, torch.Generator().manual_seed(0))
    readme = (ROOT / "README.md").read_text()
    nvae_section = readme[readme.index("## The NVAE"):readme.index("## Bayesian attention")]
    assert nvae_section.index("model.observe_lengths(attention_mask)") < nvae_section.index("model.sample_prior(")


# ---------------------------------------------------------------------------------------------- loading


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A converted tiny BERT classifier saved whole (``save_pretrained``: weights and adapter), knobs off the identity."""
    folder = tmp_path_factory.mktemp("saved") / "nv-bert"
    model = build("bert")
    kw, _ = inputs("bert", "right")
    nv.convert(model, prior=nv.estimate_prior(model, [kw], show_progress=False), alpha_tau=0.5, stdev_tau=0.2)
    save_pretrained(model, folder)
    return folder


def _edit_json(edit):
    def damage(folder: Path) -> None:
        meta = json.loads((folder / CONFIG_FILE).read_text())
        edit(meta)
        (folder / CONFIG_FILE).write_text(json.dumps(meta))

    return damage


def _truncate(name: str):
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return damage


def _first_module(meta: dict) -> dict:
    return next(iter(meta["modules"].values()))


ADAPTER_DAMAGE = [
    pytest.param(lambda d: (d / CONFIG_FILE).write_text('{"format_version": 2,'), "is not valid JSON", id="invalid-json"),
    pytest.param(lambda d: (d / CONFIG_FILE).write_text("[2]"), "must hold a JSON object", id="json-not-an-object"),
    pytest.param(_truncate(TENSORS_FILE), "nvformer.safetensors is not readable", id="truncated-tensors"),
    pytest.param(lambda d: (d / TENSORS_FILE).write_bytes(b"\x80\x04K\x01."), "nvformer.safetensors is not readable", id="pickle-as-tensors"),
    pytest.param(lambda d: (d / TENSORS_FILE).unlink(), "has no nvformer.safetensors", id="missing-tensors"),
    pytest.param(_edit_json(lambda m: _first_module(m).update(trained=True)), "the trained NVIB parameter `mu_proj.weight` of module",
                 id="trained-without-its-tensors"),
    pytest.param(_edit_json(lambda m: _first_module(m).update(trained="yes")), "`trained` must be true or false", id="trained-not-bool"),
    pytest.param(_edit_json(lambda m: _first_module(m).update(layer="first")), "`layer` must be a layer index or null", id="layer-not-int"),
    pytest.param(_edit_json(lambda m: _first_module(m).update(dim=True)), "has no valid width `dim`", id="dim-bool"),
    pytest.param(_edit_json(lambda m: _first_module(m).update(shares="nowhere")), "shares the NVIB of 'nowhere'", id="shares-unknown"),
    pytest.param(_edit_json(lambda m: m.update(architecture=["BertModel"])), "`architecture` must be the model's class name", id="architecture-list"),
    pytest.param(_edit_json(lambda m: m["config"].update(min_var=0.0)), "`min_var` must be > 0.0", id="config-min_var"),
    pytest.param(_edit_json(lambda m: m["config"]["knobs"]["*"].update(alpha_tau=float("nan"))), "knob `alpha_tau` must be finite",
                 id="config-knob-nan"),
    pytest.param(_edit_json(lambda m: _first_module(m).update(head_knobs={"alpha_tau": [1.0], "stdev_tau": [0.1, 0.2]})),
                 "`head_knobs` must hold equal-length lists", id="head-knobs-lengths"),
    pytest.param(_edit_json(lambda m: _first_module(m).update(head_knobs=[1.0])), "`head_knobs` must map alpha_tau and stdev_tau", id="head-knobs-list"),
]


@pytest.fixture
def damaged(saved, tmp_path):
    """``damaged(damage) -> folder``: a copy of the saved model with ``damage`` done to it."""
    def make(damage) -> Path:
        folder = tmp_path / "damaged"
        shutil.copytree(saved, folder)
        damage(folder)
        return folder

    return make


@pytest.mark.parametrize("damage, fragment", ADAPTER_DAMAGE)
def test_a_damaged_adapter_is_refused_by_load_adapter(damaged, damage, fragment):
    folder = damaged(damage)
    fresh = build("bert")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape(fragment)):
        nv.load_adapter(fresh, folder)
    assert not any(hasattr(m, "nvib") for m in fresh.modules())
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())


def test_head_knobs_for_another_head_count_are_refused_before_the_model_changes(damaged):
    """Valid JSON, but per-head knobs for 3 heads on a module with 4: only the model can tell (match_modules)."""
    folder = damaged(_edit_json(lambda m: _first_module(m).update(head_knobs={"alpha_tau": [1.0] * 3, "stdev_tau": [0.1] * 3})))
    fresh = build("bert")
    with pytest.raises(ValueError, match=re.escape("`alpha_tau` must be a number or 4 values (one per key/value head); the adapter's head_knobs have 3")):
        nv.load_adapter(fresh, folder)
    assert not any(hasattr(m, "nvib") for m in fresh.modules())


@pytest.mark.parametrize("damage, fragment", ADAPTER_DAMAGE)
def test_a_damaged_adapter_is_refused_by_the_cli(damaged, damage, fragment, capsys):
    folder = damaged(damage)
    capsys.readouterr()
    code = cli_main(["evaluate", "--model", str(folder), "--task", "classification", "--data", str(folder / "data.csv"), "--adapter", str(folder)])
    _, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"nvformer evaluate: error: --adapter {folder}: ") and fragment in err, err


PRETRAINED_DAMAGE = [
    *ADAPTER_DAMAGE,
    pytest.param(lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors", id="missing-weights"),
    pytest.param(_truncate("model.safetensors"), "cannot load BertForSequenceClassification from", id="truncated-weights"),
    *[pytest.param(_edit_json(lambda m, name=name: m.update(architecture=name)), f"architecture {name!r} is not a transformers model class",
                   id=f"architecture-{kind}")
      for kind, name in (("unknown", "NoSuchModel"), ("auto-class", "AutoModel"), ("config-class", "BertConfig"), ("module", "logging"),
                         ("dunder", "__class__"), ("dotted", "os.system"))],
    pytest.param(_edit_json(lambda m: m.update(kind="torch")), "holds the adapter of a PyTorch model", id="kind-torch"),
]


@pytest.mark.parametrize("damage, fragment", PRETRAINED_DAMAGE)
def test_a_damaged_folder_is_refused_by_load_pretrained(damaged, damage, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)) as info:
        load_pretrained(damaged(damage))
    assert str(info.value).startswith("nvformer.load_pretrained: ") and "\n" not in str(info.value)


def test_load_pretrained_loads_the_intact_folder_and_checks_model_class(saved):
    model = load_pretrained(saved)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert nv.get_knobs(model)["encoder.0"] == nv.Knobs(alpha_tau=0.5, stdev_tau=0.2)
    with pytest.raises(ValueError, match=re.escape("`model_class` must be a transformers model class (with from_pretrained), got 'BertModel'")):
        load_pretrained(saved, model_class="BertModel")


# ---------------------------------------------------------------------------------------------- no pickles


def _python_files() -> list[Path]:
    return [p for d in ("src", "experiments", "benchmarks", "tests") for p in (ROOT / d).rglob("*.py") if p != Path(__file__).resolve()]


def test_every_torch_load_is_weights_only_and_no_cache_is_a_pickle():
    """``torch.load`` only with ``weights_only=True``; results caches are JSON, CSV or safetensors (no torch.save, no pickle)."""
    load = re.compile(r"torch\.load\(([^)]*)\)")
    for path in _python_files():
        text = path.read_text(encoding="utf-8")
        for m in load.finditer(text):
            assert "weights_only=True" in m.group(1), f"{path}: {m.group(0)}"
        for banned in ("torch.save(", "import pickle", "pickle.dump", "pickle.load", "import joblib"):
            assert banned not in text, f"{path} uses {banned}"


def test_estimate_prior_on_a_hf_model_changes_no_module_when_one_prior_does_not_fit():
    """Layer 1 reads vectors ~1e5 wide, so its prior's ``s_alpha`` (~1e10) makes the alpha bias of
    ``alpha_tau = 1e30`` overflow float32: layer 0's fitting prior must not be applied either."""
    model = nv.convert(build("bert"), alpha_tau=1e30)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.LayerNorm.weight.mul_(1e5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=re.escape("estimate_prior: knob `alpha_tau` = 1e+30 makes")):
        nv.estimate_prior(model, [inputs("bert", "right")[0]], show_progress=False)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("call, fragment", [
    (lambda: nv.convert_dirichlet(encoder(converted=False)), "convert_dirichlet: TransformerEncoder is not a Hugging Face model"),
    (lambda: nv.convert_dirichlet(build("bert"), spec={"tau": 2.0}), "convert_dirichlet: `spec` must be a DirichletSpec, got dict"),
    (lambda: nv.convert_dirichlet(nv.convert_dirichlet(build("bert"))), "convert_dirichlet: the model already has Dirichlet attention"),
])
def test_convert_dirichlet_refuses_what_it_cannot_convert(call, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        call()

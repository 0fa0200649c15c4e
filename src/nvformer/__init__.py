"""nvformer: nonparametric variational (NV) attention for Transformers.

The public API (see README.md):

* :class:`Prior`, :class:`PriorEstimator` -- the base distribution of an NV latent;
* :class:`NVIB`, :class:`NVLatent` -- the NVIB layer and the posterior it returns;
* :func:`kl_gaussian`, :func:`kl_dirichlet` -- the KL regularisers;
* :func:`denoising_attention`, :class:`NVMultiheadAttention`, :func:`convert_mha`,
  :func:`kl_terms` -- denoising attention and its ``nn.MultiheadAttention`` drop-in;
* :func:`estimate_prior` -- empirical priors of a model's attention inputs;
* :func:`convert`, :func:`set_knobs`, :func:`get_knobs` -- NV reinterpretation of pretrained
  Hugging Face models (identity initialisation, empirical prior, knobs);
* :class:`DirichletAttention`, :class:`DirichletSpec`, :func:`convert_dirichlet`,
  :func:`dirichlet_kl` -- variational Dirichlet attention weights (Cinquin et al. 2021);
* :mod:`nvformer.models` -- the NVAE (Transformer VAE with an NVIB latent) and its baselines.
"""

from .attention import (
    KLTerms,
    NVMultiheadAttention,
    convert_mha,
    denoising_attention,
    kl_terms,
)
from .bayes import DirichletAttention, DirichletSpec, convert_dirichlet, dirichlet_kl
from .empirical import estimate_prior
from .hf.convert import convert, get_knobs, set_knobs
from .kl import kl_dirichlet, kl_gaussian, kl_symmetric_dirichlet
from .nvib import NVIB, NVLatent
from .prior import Prior, PriorEstimator
from .sampling import sample_log_dirichlet, sample_log_gamma
from .tune import KnobSpace, TuneResult, tune

__version__ = "0.1.0"

__all__ = [
    "DirichletAttention",
    "DirichletSpec",
    "KLTerms",
    "KnobSpace",
    "TuneResult",
    "NVIB",
    "NVLatent",
    "NVMultiheadAttention",
    "Prior",
    "PriorEstimator",
    "convert",
    "convert_dirichlet",
    "convert_mha",
    "denoising_attention",
    "dirichlet_kl",
    "estimate_prior",
    "get_knobs",
    "kl_dirichlet",
    "kl_gaussian",
    "kl_symmetric_dirichlet",
    "kl_terms",
    "sample_log_dirichlet",
    "sample_log_gamma",
    "set_knobs",
    "tune",
]

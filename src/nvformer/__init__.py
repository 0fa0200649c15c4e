"""nvformer: nonparametric variational (NV) attention for Transformers.

The verbs (README.md, docs/DESIGN.md):

* :func:`estimate_prior`, :func:`convert`, :func:`unconvert` -- reinterpret a pretrained model
  (Hugging Face or plain PyTorch) as an NV model with an empirical prior: outputs unchanged at
  :data:`IDENTITY`; and back;
* :class:`NVConfig`, :class:`Knobs`, :func:`get_config`, :func:`get_knobs`, :func:`set_knobs` --
  one configuration and one knob vocabulary (``alpha_tau, stdev_tau, mu_tau``);
* :func:`tune`, :class:`KnobSpace` -- choose the knobs on held-out data (Optuna);
* :func:`save_adapter`, :func:`load_adapter` -- save what NV adds, put it on a model you loaded;
* :func:`set_prediction` -- mean or sampled predictions (NV latents, Dirichlet attention);
* :func:`compile_attention` -- ``torch.compile`` the attention core of a converted Hugging Face model;
* :class:`NVIB`, :class:`NVMultiheadAttention`, :func:`denoising_attention`, :func:`kl_terms`,
  :class:`Prior`, :class:`PriorEstimator`, :func:`kl_gaussian`, :func:`kl_dirichlet` -- the layers
  and the maths (docs/MATH.md);
* :class:`DirichletAttention`, :class:`DirichletSpec`, :func:`convert_dirichlet` -- variational
  Dirichlet attention weights (Cinquin et al. 2021);
* :mod:`nvformer.models` -- the NVAE (Transformer VAE with an NVIB latent) and its baselines.

Importing nvformer imports torch only; transformers, optuna, safetensors, torchmetrics, sacrebleu,
datasets and matplotlib are imported when a feature first needs them.
"""

from ._version import __version__
from .adapter import load_adapter, save_adapter
from .api import (
    compile_attention,
    convert,
    estimate_prior,
    get_config,
    get_head_knobs,
    get_knobs,
    set_head_knobs,
    set_knobs,
    set_prediction,
    unconvert,
)
from .config import IDENTITY, Knobs, NVConfig
from .core.kl import kl_dirichlet, kl_gaussian, kl_symmetric_dirichlet
from .core.latent import NVLatent
from .core.prior import Prior, PriorEstimator
from .core.sampling import sample_dirichlet, sample_log_dirichlet, sample_log_gamma, standard_gamma
from .dirichlet.functional import DirichletSpec, dirichlet_kl
from .dirichlet.module import DirichletAttention
from .hf.dirichlet import convert_dirichlet
from .nn.functional import denoising_attention
from .nn.mha import KLTerms, NVMultiheadAttention, kl_terms
from .nn.nvib import NVIB
from .tuning.fit import FitResult, fit_knobs
from .tuning.search import TuneResult, tune
from .tuning.space import KnobSpace

__all__ = [
    "__version__",
    "IDENTITY",
    "NVIB",
    "DirichletAttention",
    "DirichletSpec",
    "FitResult",
    "KLTerms",
    "KnobSpace",
    "Knobs",
    "NVConfig",
    "NVLatent",
    "NVMultiheadAttention",
    "Prior",
    "PriorEstimator",
    "TuneResult",
    "compile_attention",
    "convert",
    "convert_dirichlet",
    "denoising_attention",
    "dirichlet_kl",
    "estimate_prior",
    "fit_knobs",
    "get_config",
    "get_head_knobs",
    "get_knobs",
    "kl_dirichlet",
    "kl_gaussian",
    "kl_symmetric_dirichlet",
    "kl_terms",
    "load_adapter",
    "sample_dirichlet",
    "sample_log_dirichlet",
    "sample_log_gamma",
    "save_adapter",
    "set_head_knobs",
    "set_knobs",
    "set_prediction",
    "standard_gamma",
    "tune",
    "unconvert",
]

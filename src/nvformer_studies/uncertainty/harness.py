"""The uncertainty harness of issue 8: fine-tuned review classifiers with standard (MAP), Dirichlet
(Cinquin et al. 2021) or NV attention, Monte Carlo predictives, temperature scaling, metrics.

Methods (each a set of predictive samples ``[S, N, C]``: logits, :func:`predictive_logits`, or
their softmax, :func:`predictive_probs`):

* ``map``: the fine-tuned model, deterministic (S = 1).
* ``mc-dropout``: the same model with its dropout layers active at test time (Gal & Ghahramani 2016).
* ``ensemble``: the MAP models of several seeds (Lakshminarayanan et al. 2017), one sample each.
* ``dirichlet-mean`` / ``dirichlet-sample``: a model fine-tuned with Dirichlet attention in every
  layer (ELBO: NLL + KL / N_train, :func:`nvformer.convert_dirichlet`, :func:`kl_loss`), predicting
  with the posterior-mean attention or averaging S sampled-attention forwards. Its concentration
  scales ``tau`` train with the network's learning rate, or with one of their own
  (``variational_lr`` of :func:`finetune_variant`: the learnt posterior).
* ``nv-sample``: the MAP model reinterpreted as an NV model (empirical prior on the source
  training text, identity initialisation) whose attention latents are *sampled* at test time
  (:func:`nvformer.set_prediction` ``"sample"``: training form of denoising attention, no dropout),
  ``stdev_tau`` chosen on source validation NLL.

Temperature scaling (Guo et al. 2017) of any method: ``T`` fitted on the source validation split
to the log of the mean predictive, applied to every domain.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor, nn

from nvformer import IDENTITY, DirichletSpec, convert_dirichlet, set_prediction
from nvformer.dirichlet.module import dirichlet_kl_total
from nvformer.tasks import TextBatches

__all__ = ["METHODS", "apply_temperature", "finetune_variant", "kl_loss", "predictive_logits", "predictive_probs", "sampled_nv"]

METHODS = ("map", "mc-dropout", "ensemble", "dirichlet-mean", "dirichlet-sample", "nv-sample")


def kl_loss(n_train: int):
    """The ELBO's extra term for :func:`~nvformer_studies.common.finetune.finetune_classifier`:
    ``model -> `` the batch mean of the summed attention KL of the last forward, divided by the
    number of training examples ``n_train``."""
    return lambda model: dirichlet_kl_total(model).float().mean() / n_train


def finetune_variant(out: str | Path, attention: str, seed: int, config, spec: DirichletSpec = DirichletSpec(), *, source: str = "books",
                     split_seed: int = 0, n_train: int | None = None, data_dir=None, show_progress: bool = True,
                     variational_lr: float | None = None) -> tuple[nn.Module, object, dict]:
    """all-MiniLM-L6-v2 fine-tuned on ``source`` with ``attention`` = ``"standard"`` or
    ``"dirichlet"`` (every layer; the loss adds the summed attention KL divided by the number of
    training examples, :func:`kl_loss`), seed ``seed``, on the first ``n_train`` training reviews
    (all if None); ``variational_lr``: the Dirichlet concentration scales' own learning rate (no
    weight decay; None: the network's, as in the recorded run). Cached in ``out`` while the
    settings match (``variational_lr`` is part of them only when given, so the recorded models
    stay valid)."""
    from safetensors.torch import load_file, save_file

    from ..common.checkpoints import load_minilm
    from ..common.finetune import finetune_classifier
    from ..sentiment.data import FRACTIONS, domain_splits

    if attention not in ("standard", "dirichlet"):
        raise ValueError(f"finetune_variant: `attention` must be 'standard' or 'dirichlet', got {attention!r}")
    if variational_lr is not None and attention != "dirichlet":
        raise ValueError("finetune_variant: `variational_lr` needs attention='dirichlet' (standard attention has no variational parameter)")
    config = type(config)(**{**asdict(config), "seed": seed})
    out = Path(out)
    meta = {"config": asdict(config), "attention": attention, "spec": asdict(spec) if attention == "dirichlet" else None,
            "source": source, "split_seed": split_seed, "n_train": n_train, "fractions": list(FRACTIONS), "base": "all-MiniLM-L6-v2"}
    if variational_lr is not None:
        meta["variational_lr"] = variational_lr
    model, tok = load_minilm(head="classification", seed=seed)
    if attention == "dirichlet":
        convert_dirichlet(model, spec)
    info_file = out / "nvformer_variant.json"
    if info_file.exists() and json.loads(info_file.read_text())["meta"] == meta:
        model.load_state_dict(load_file(str(out / "model.safetensors")))
        return model.eval(), tok, json.loads(info_file.read_text())
    splits = domain_splits(source, split_seed, data_dir)
    train = [x[:n_train] for x in splits["train"]]
    extra = kl_loss(len(train[0])) if attention == "dirichlet" else None
    hist = finetune_classifier(model, tok, *train, *splits["validation"], config=config, show_progress=show_progress, extra_loss=extra,
                               variational_lr=variational_lr)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    info = {"meta": meta, "train_loss": hist.train_loss, "val_accuracy": hist.val_accuracy, "best_epoch": hist.best_epoch}
    info_file.write_text(json.dumps(info, indent=2))
    return model.eval(), tok, info


def _set_dropout(model: nn.Module, active: bool) -> None:
    model.eval()
    if active:
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                m.train()


@torch.no_grad()
def _logits(model: nn.Module, data: TextBatches) -> Tensor:
    """``[N, C]`` float64 logits of one forward over ``data``, in example order."""
    return data.unsort(torch.cat([model(**b).logits.double() for b in data.batches]))


def sampled_nv(model: nn.Module, prior_batches, stdev_tau: float, alpha_tau: float = IDENTITY.alpha_tau) -> nn.Module:
    """Convert ``model`` (in place) to NV with the empirical prior of ``prior_batches`` and the
    given knobs; it stays in evaluation mode (no dropout anywhere) and samples its NV latents in
    every forward (:func:`nvformer.set_prediction` ``"sample"``: the training form of denoising
    attention)."""
    from nvformer import convert, estimate_prior

    convert(model, prior=estimate_prior(model, prior_batches, show_progress=False), alpha_tau=alpha_tau, stdev_tau=stdev_tau)
    return set_prediction(model.eval(), "sample")


def predictive_probs(method: str, models: list[nn.Module], data: TextBatches, samples: int = 8, seed: int = 0) -> Tensor:
    """``[S, N, C]`` predictive samples of ``method`` on ``data``: the softmax of
    :func:`predictive_logits` (the same arguments, the same draws)."""
    return predictive_logits(method, models, data, samples, seed).softmax(-1)


def predictive_logits(method: str, models: list[nn.Module], data: TextBatches, samples: int = 8, seed: int = 0) -> Tensor:
    """``[S, N, C]`` float64 logits of the predictive samples of ``method`` (see the module
    docstring) on ``data``; one sample for ``map``, ``dirichlet-mean`` and (per member) ``ensemble``.

    ``models``: one model (``ensemble``: the members). Seeded: ``torch.manual_seed(seed)`` before
    the first sample.
    """
    if method not in METHODS:
        raise ValueError(f"predictive_logits: `method` must be one of {METHODS}, got {method!r}")
    if samples < 1 or not models:
        raise ValueError("predictive_logits: need samples >= 1 and at least one model")
    torch.manual_seed(seed)
    if method == "ensemble":
        out = []
        for m in models:
            _set_dropout(m, False)
            out.append(_logits(m, data))
        return torch.stack(out)
    model = models[0]
    if method in ("map", "dirichlet-mean"):
        _set_dropout(model, False)
        if method == "dirichlet-mean":
            set_prediction(model, "mean")
        return _logits(model, data)[None]
    if method == "mc-dropout":
        _set_dropout(model, True)
        try:
            return torch.stack([_logits(model, data) for _ in range(samples)])
        finally:
            _set_dropout(model, False)
    if method == "dirichlet-sample":
        _set_dropout(model, False)
        set_prediction(model, "sample")
        try:
            return torch.stack([_logits(model, data) for _ in range(samples)])
        finally:
            set_prediction(model, "mean")
    return torch.stack([_logits(model, data) for _ in range(samples)])  # nv-sample: the caller prepared the model


def apply_temperature(probs: Tensor, temperature: float) -> Tensor:
    """``[1, N, C]``: the mean predictive of samples ``[S, N, C]`` rescaled as ``softmax(log p / T)``."""
    return (probs.double().mean(0).clamp_min(1e-300).log() / temperature).softmax(-1)[None]

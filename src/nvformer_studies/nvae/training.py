"""Data, training (HF Accelerate), checkpoints and evaluation of :class:`nvformer.models.NVAE`.

* Data: :func:`wikitext_sentences` (sentences of both WikiText-2 files, seeded train / valid /
  test split), :func:`ood_sentences` (English sentences of another domain), a byte-level BPE
  tokenizer trained on the training sentences (:func:`nvformer_studies.common.tokenizer.train_tokenizer`);
  token-id batches right-padded by :func:`nvformer.tasks.pad_rows` (:func:`pad_batch`).
* Training: :func:`train` runs a standard Accelerate loop: one process, or several with
  ``torchrun --nproc_per_node N`` (CPU: the gloo backend). ``split_batches=True`` splits every
  global batch across the processes, so N processes take the same optimiser steps on the same
  batches as one process (gradients are averaged), up to the latent / dropout noise. Seeded,
  tqdm progress, CSV metrics log, ``accelerator.save_state`` checkpoints every ``save_every``
  steps and at the end, resume from the last checkpoint.
* Files: :func:`save_model` / :func:`load_model` (config JSON + safetensors weights + tokenizer).
* Evaluation: :func:`evaluate` (reconstruction BLEU / token accuracy, KL terms, latent vectors
  kept, total pseudo-count), :func:`interpolation_curve`, :func:`train_lm` / :func:`lm_perplexity`
  (a small GPT-2 language model for prior-sample quality).
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nvformer._progress import progress
from nvformer.models.nvae import NVAE, NVAEConfig
from nvformer.tasks import pad_rows

from ..common.data import read_parallel, read_wikitext
from ..common.subsets import seeded_subset

__all__ = [
    "TrainConfig",
    "effective_count",
    "encode_texts",
    "evaluate",
    "interpolation_curve",
    "kept_vectors",
    "lm_perplexity",
    "lm_sentence_nll",
    "load_model",
    "ood_sentences",
    "pad_batch",
    "save_model",
    "sentence_pseudo_counts",
    "split_sentences",
    "token_pseudo_counts",
    "train",
    "train_lm",
    "wikitext_sentences",
]

_SPLIT = re.compile(r"(?<=[.!?]) (?=[A-Z\"'])")
_UNWRAP = (("@-@", "-"), ("@,@", ","), ("@.@", "."))
CONFIG_FILE, WEIGHTS_FILE, STATE_FILE, LOG_FILE = "nvae_config.json", "model.safetensors", "train_state.json", "log.csv"


# ---------------------------------------------------------------------------------------------- data


def split_sentences(paragraph: str, min_words: int = 5, max_words: int = 30, drop_unk: bool = False) -> list[str]:
    """Sentences of a WikiText paragraph (split after ``.``/``!``/``?`` before a capital or quote),
    ``@-@``-style tokens unwrapped, kept when they have ``min_words..max_words`` words (and, with
    ``drop_unk``, no ``<unk>``; two thirds of WikiText-2 sentences have one, and the tokenizer
    maps it to its own ``<unk>`` token)."""
    for a, b in _UNWRAP:
        paragraph = paragraph.replace(f" {a} ", b)
    out = []
    for s in _SPLIT.split(paragraph.strip()):
        s = s.strip()
        if not (drop_unk and "<unk>" in s) and min_words <= len(s.split()) <= max_words:
            out.append(s)
    return out


def wikitext_sentences(seed: int = 0, n_valid: int = 500, n_test: int = 1000, data_dir=None, **kw) -> dict[str, list[str]]:
    """Distinct sentences of WikiText-2 ``valid.txt`` and ``test.txt`` (the two files we have),
    shuffled with ``seed`` and split into ``train`` / ``valid`` (``n_valid``) / ``test`` (``n_test``)."""
    sents = list(dict.fromkeys(s for split in ("valid", "test") for p in read_wikitext(split, data_dir) for s in split_sentences(p, **kw)))
    sents = [sents[i] for i in seeded_subset(len(sents), None, seed, sort=False, generator="python")]
    if len(sents) < n_valid + n_test + 1:
        raise ValueError(f"wikitext_sentences: only {len(sents)} sentences for {n_valid} valid + {n_test} test")
    return {"valid": sents[:n_valid], "test": sents[n_valid : n_valid + n_test], "train": sents[n_valid + n_test :]}


def ood_sentences(domain: str = "law", n: int = 1000, seed: int = 0, data_dir=None, min_words: int = 5, max_words: int = 30) -> list[str]:
    """``n`` seeded English sentences of ``mt-domains/{domain}/test.en`` with ``min_words..max_words`` words."""
    lines = [s.strip() for s in read_parallel(domain, "test", data_dir).en]
    keep = list(dict.fromkeys(s for s in lines if min_words <= len(s.split()) <= max_words))
    return [keep[i] for i in seeded_subset(len(keep), n, seed, sort=False, generator="python")]


def encode_texts(tok, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids (EOS appended by the tokenizer), truncated to ``max_length`` keeping the EOS."""
    out = []
    for ids in tok(list(texts))["input_ids"]:
        out.append(ids if len(ids) <= max_length else ids[: max_length - 1] + [ids[-1]])
    return out


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``(input_ids [B, S], mask [B, S] bool)`` right-padded (the NVAE's input form)."""
    ids, mask = pad_rows(seqs, pad_id)
    return ids, mask.bool()


# ---------------------------------------------------------------------------------------------- files


def save_model(model: NVAE, tok, out: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``nvae_config.json`` (config + ``extra``), ``model.safetensors`` and the tokenizer to ``out``."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps({"config": model.config.to_dict(), **(extra or {})}, indent=2))
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
    tok.save_pretrained(out)
    return out


def load_model(path: str | Path, device=None) -> tuple[NVAE, Any, dict[str, Any]]:
    """``(model in eval mode, tokenizer, the JSON written by save_model)``."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / CONFIG_FILE).exists():
        raise FileNotFoundError(f"load_model: {path} has no {CONFIG_FILE} (not a saved NVAE)")
    meta = json.loads((path / CONFIG_FILE).read_text())
    model = NVAE(NVAEConfig.from_dict(meta["config"]))
    model.load_state_dict(load_file(str(path / WEIGHTS_FILE)))
    return model.to(device or "cpu").eval(), AutoTokenizer.from_pretrained(path), meta


# ---------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings of :func:`train` (the global batch is split across processes)."""

    epochs: int = 6
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0
    log_every: int = 50
    save_every: int = 500
    max_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "log_every", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig: `{name}` must be >= 1, got {getattr(self, name)}")


class _Sentences(torch.utils.data.Dataset):
    def __init__(self, ids: list[list[int]]) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> list[int]:
        return self.ids[i]


def _batch_metrics(out) -> dict[str, float]:
    tokens = out.tokens.sum().float()
    m = {"loss": float(out.loss.detach()), "recon_per_token": float(out.recon.detach().sum() / tokens),
         "kl_g": float(out.kl_g.detach().float().mean()), "kl_d": float(out.kl_d.detach().float().mean()),
         "lambda_g": out.weights[0], "lambda_d": out.weights[1]}
    lat = out.memory.latent
    if lat is not None:
        m["kept"] = float((lat.num_kept() - (~lat.pad_mask[:, 0]).long()).float().mean())
    return m


def train(model: NVAE, tok, train_texts: Sequence[str], out_dir: str | Path, config: TrainConfig = TrainConfig(), *,
          resume: bool = True, show_progress: bool = True, cpu: bool = False) -> dict[str, Any]:
    """Train ``model`` with HF Accelerate; returns a summary (steps, seconds, processes, last metrics).

    ``out_dir`` receives ``log.csv`` (one row per ``log_every`` steps: step, epoch, loss,
    reconstruction nats per token, KL terms, KL weights, kept vectors, learning rate, seconds),
    checkpoints ``checkpoint/`` (``accelerator.save_state`` + ``train_state.json``; with
    ``resume`` a run continues from there) and, at the end, the model (:func:`save_model`).
    Launch under ``torchrun --nproc_per_node N`` for N processes (gloo on CPU).
    """
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import set_seed

    out = Path(out_dir)
    acc = Accelerator(cpu=cpu, dataloader_config=DataLoaderConfiguration(split_batches=True))
    if config.batch_size % acc.num_processes:
        raise ValueError(f"train: batch_size {config.batch_size} must be divisible by the {acc.num_processes} processes")
    set_seed(config.seed)
    pad_id = model.config.pad_id
    ids = encode_texts(tok, train_texts, model.config.max_length)
    if not ids:
        raise ValueError("train: no training texts")
    with torch.no_grad():
        model.length_counts.zero_()
        for k in range(0, len(ids), 1024):
            model.observe_lengths(pad_batch(ids[k : k + 1024], pad_id)[1])
    loader = torch.utils.data.DataLoader(_Sentences(ids), batch_size=config.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(config.seed),
                                         collate_fn=lambda b: pad_batch(b, pad_id))
    if len(loader) == 0:
        raise ValueError(f"train: {len(ids)} texts make no full batch of {config.batch_size}")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=config.lr)
    total = config.epochs * len(loader)  # the schedule ignores max_steps: stopping early is an interruption
    warm = max(1, config.warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    model, opt, loader, sched = acc.prepare(model, opt, loader, sched)
    raw = acc.unwrap_model(model)
    ckpt = out / "checkpoint"
    step, start_epoch, skip = 0, 0, 0
    if resume and (ckpt / STATE_FILE).exists():
        acc.load_state(str(ckpt))
        st = json.loads((ckpt / STATE_FILE).read_text())
        step, start_epoch, skip = st["step"], st["epoch"], st["batch_in_epoch"]
        acc.print(f"resumed from {ckpt} at step {step} (epoch {start_epoch + 1}, batch {skip})")
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    log_path, t0, last = out / LOG_FILE, time.time(), {}
    fields = ["step", "epoch", "loss", "recon_per_token", "kl_g", "kl_d", "lambda_g", "lambda_d", "kept", "lr", "seconds"]

    def save(epoch: int, batch: int) -> None:
        acc.wait_for_everyone()
        acc.save_state(str(ckpt))
        if acc.is_main_process:
            (ckpt / STATE_FILE).write_text(json.dumps({"step": step, "epoch": epoch, "batch_in_epoch": batch}))

    running: list[dict[str, float]] = []
    position = (start_epoch, skip)
    for epoch in range(start_epoch, config.epochs):
        model.train()
        loader.set_epoch(epoch) if hasattr(loader, "set_epoch") else None
        batches = acc.skip_first_batches(loader, skip) if skip else loader
        bar = progress(batches, f"epoch {epoch + 1}/{config.epochs}", show_progress and acc.is_local_main_process,
                       total=len(loader) - skip)
        for b, (input_ids, mask) in enumerate(bar, start=skip):
            outp = model(input_ids, mask)
            acc.backward(outp.loss)
            if config.clip:
                acc.clip_grad_norm_(model.parameters(), config.clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            raw.step += 1
            running.append(_batch_metrics(outp))
            if step % config.log_every == 0:
                keys = running[0].keys()
                local = torch.tensor([[r[k] for k in keys] for r in running], dtype=torch.float64).mean(0)
                mean = acc.reduce(local.to(acc.device), reduction="mean").cpu()
                last = {k: float(v) for k, v in zip(keys, mean)} | {"step": step, "epoch": epoch + 1, "lr": sched.get_last_lr()[0],
                                                                     "seconds": round(time.time() - t0, 1)}
                running = []
                if acc.is_main_process:
                    new = not log_path.exists()
                    with log_path.open("a", newline="") as f:
                        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
                        if new:
                            w.writeheader()
                        w.writerow(last)
            position = (epoch, b + 1) if b + 1 < len(loader) else (epoch + 1, 0)
            if step % config.save_every == 0:
                save(*position)
            if config.max_steps is not None and step >= config.max_steps:
                break
        skip = 0
        if config.max_steps is not None and step >= config.max_steps:
            break
    save(*position)
    raw.eval()
    summary = {"steps": step, "seconds": time.time() - t0, "processes": acc.num_processes, "last": last,
               "train_sentences": len(ids), "train": asdict(config)}
    if acc.is_main_process:
        save_model(raw, tok, out, extra={"train": summary})
    acc.wait_for_everyone()
    return summary


# ---------------------------------------------------------------------------------------------- evaluation


def _batches(ids: list[list[int]], size: int):
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for k in range(0, len(order), size):
        yield order[k : k + size]


def kept_vectors(latent) -> Tensor:
    """``[B]`` the token components an evaluation-mode NVIB latent keeps: those with a non-zero
    weight after the threshold (pseudo-count above ``alpha_threshold``), prior and padding excluded."""
    return (torch.isfinite(latent.log_pi[:, 1:]) & ~latent.pad_mask[:, 1:]).sum(-1)


@torch.no_grad()
def evaluate(model: NVAE, tok, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> dict[str, Any]:
    """Reconstruction and latent statistics of ``texts`` (evaluation mode, posterior means).

    Returns ``bleu`` (sacrebleu corpus BLEU of greedy reconstructions against the inputs as the
    tokenizer gives them back), ``token_accuracy`` (teacher-forced argmax, EOS included),
    ``recon_per_token`` (nats), ``kl_g``, ``kl_d`` (mean per sentence), ``vectors`` (mean latent
    vectors the decoder reads: NVAE components with pseudo-count above the threshold, prior
    excluded; 1 for the pooled VAE; the token count for the autoencoder), ``kept_fraction``
    (vectors / tokens), ``pseudo_count`` (mean total pseudo-count of the token components,
    NVAE only), ``reconstructions`` and, per sentence in input order, ``sentence_tokens`` and
    ``sentence_vectors`` (for kept-vectors-against-length plots).
    """
    import sacrebleu

    model.eval()
    dev = model.device
    ids = encode_texts(tok, texts, model.config.max_length)
    refs = tok.batch_decode(ids, skip_special_tokens=True)
    hyps: list[str] = [""] * len(ids)
    tot = {"correct": 0.0, "tokens": 0.0, "recon": 0.0, "kl_g": 0.0, "kl_d": 0.0, "vectors": 0.0, "fraction": 0.0, "alpha": 0.0}
    per_tokens, per_vectors = [0] * len(ids), [0] * len(ids)
    for rows in progress(list(_batches(ids, batch_size)), "evaluate", show_progress):
        x, m = pad_batch([ids[i] for i in rows], model.config.pad_id)
        x, m = x.to(dev), m.to(dev)
        o = model(x, m)
        pred = o.logits.argmax(-1)
        tot["correct"] += float(((pred == x) & m).sum())
        tot["tokens"] += float(m.sum())
        tot["recon"] += float(o.recon.sum())
        tot["kl_g"] += float(o.kl_g.float().sum())
        tot["kl_d"] += float(o.kl_d.float().sum())
        n = m.sum(-1).double()
        lat = o.memory.latent
        if lat is not None:
            vec = kept_vectors(lat).double()
            tot["alpha"] += float(lat.log_alpha[:, 1:].masked_fill(lat.pad_mask[:, 1:], float("-inf")).exp().sum())
        elif model.config.bottleneck == "pooled":
            vec = torch.ones_like(n)
        else:
            vec = n
        tot["vectors"] += float(vec.sum())
        tot["fraction"] += float((vec / n).sum())
        for i, tokens, kept in zip(rows, n.tolist(), vec.tolist()):
            per_tokens[i], per_vectors[i] = int(tokens), int(kept)
        for i, h in zip(rows, tok.batch_decode(model.generate(o.memory), skip_special_tokens=True)):
            hyps[i] = h
    N = len(ids)
    return {"sentences": N, "bleu": sacrebleu.corpus_bleu(hyps, [refs]).score, "token_accuracy": tot["correct"] / tot["tokens"],
            "recon_per_token": tot["recon"] / tot["tokens"], "kl_g": tot["kl_g"] / N, "kl_d": tot["kl_d"] / N,
            "tokens": tot["tokens"] / N, "vectors": tot["vectors"] / N, "kept_fraction": tot["fraction"] / N,
            "pseudo_count": tot["alpha"] / N if model.config.bottleneck == "nvib" else None, "reconstructions": hyps, "references": refs,
            "sentence_tokens": per_tokens, "sentence_vectors": per_vectors}


@torch.no_grad()
def sentence_pseudo_counts(model: NVAE, tok, texts: Sequence[str], batch_size: int = 64) -> list[Tensor]:
    """Per text, ``[n_s]`` float64: the pseudo-counts of its token components (evaluation mode;
    prior component and padding left out), in input order."""
    if model.config.bottleneck != "nvib":
        raise ValueError(f"sentence_pseudo_counts: a {model.config.bottleneck!r} bottleneck has no pseudo-counts")
    model.eval()
    ids = encode_texts(tok, texts, model.config.max_length)
    out: list[Tensor] = [None] * len(ids)  # type: ignore[list-item]
    for rows in _batches(ids, batch_size):
        x, m = pad_batch([ids[i] for i in rows], model.config.pad_id)
        lat = model.encode(x.to(model.device), m.to(model.device))[0].latent
        alpha, keep = lat.log_alpha[:, 1:].double().exp().cpu(), ~lat.pad_mask[:, 1:].cpu()
        for j, i in enumerate(rows):
            out[i] = alpha[j][keep[j]]
    return out


def kl_d_push(model: NVAE, tok, texts: Sequence[str], batch_size: int = 64) -> dict[str, float]:
    """What the Dirichlet KL does to each token's pseudo-count, measured: per sentence the gradient
    ``g_i = dKL_D / d log a_i`` of its token components (evaluation form), and the spread of the
    relative push ``g_i / a_i`` over its tokens, ``(max - min) / |mean|``. Zero spread means KL_D
    pushes every token's pseudo-count by the same factor (it depends on their total only, docs/MATH.md
    section 2), so it cannot choose which vectors to drop. Returns the median and the maximum spread
    over sentences and the mean relative push."""
    from nvformer import kl_dirichlet

    if model.config.bottleneck != "nvib":
        raise ValueError(f"kl_d_push: a {model.config.bottleneck!r} bottleneck has no Dirichlet KL")
    model.eval()
    ids = encode_texts(tok, texts, model.config.max_length)
    spreads, pushes = [], []
    for rows in _batches(ids, batch_size):
        x, m = pad_batch([ids[i] for i in rows], model.config.pad_id)
        with torch.enable_grad():
            lat = model.encode(x.to(model.device), m.to(model.device))[0].latent
            lat.log_alpha.retain_grad()
            kl_dirichlet(lat, model.nvib.prior, model.nvib.delta).sum().backward()
        g, a, keep = lat.log_alpha.grad[:, 1:].double().cpu(), lat.log_alpha[:, 1:].detach().double().exp().cpu(), ~lat.pad_mask[:, 1:].cpu()
        for j in range(len(rows)):
            r = (g[j] / a[j])[keep[j]]
            if r.numel() > 1:
                spreads.append(float((r.max() - r.min()) / r.mean().abs().clamp_min(1e-300)))
            pushes.append(float(r.mean()))
    model.zero_grad(set_to_none=True)
    t = torch.tensor(spreads, dtype=torch.float64)
    return {"spread_median": float(t.median()), "spread_max": float(t.max()), "relative_push_mean": sum(pushes) / len(pushes)}


def token_pseudo_counts(model: NVAE, tok, texts: Sequence[str], batch_size: int = 64) -> Tensor:
    """``[T]`` float64: the pseudo-count of every token component of ``texts`` (all sentences of
    :func:`sentence_pseudo_counts` concatenated), for the distribution of an NVAE's pseudo-counts."""
    if model.config.bottleneck != "nvib":
        raise ValueError(f"token_pseudo_counts: a {model.config.bottleneck!r} bottleneck has no pseudo-counts")
    return torch.cat(sentence_pseudo_counts(model, tok, texts, batch_size))


def effective_count(alpha: Tensor) -> float:
    """The effective number of components of pseudo-counts ``alpha`` ``[n]`` (> 0): ``exp(H(p))``
    with ``p = alpha / sum(alpha)`` (``n`` when all are equal, 1 when one holds all the mass). A
    measure of how concentrated the latent is that needs no pruning threshold."""
    p = alpha.double() / alpha.double().sum()
    return float(torch.exp(-(p * p.clamp_min(torch.finfo(torch.float64).tiny).log()).sum()))


@torch.no_grad()
def interpolation_curve(model: NVAE, tok, texts_a: Sequence[str], texts_b: Sequence[str], ts: Sequence[float],
                        batch_size: int = 64) -> dict[str, Any]:
    """Decodes along ``t`` between pairs and their corpus BLEU to each end point's text.

    Returns ``{"t": ts, "bleu_a": [...], "bleu_b": [...], "examples": decodes of the first pair}``;
    a smooth path has ``bleu_a`` falling and ``bleu_b`` rising gradually.
    """
    import sacrebleu

    if len(texts_a) != len(texts_b) or not texts_a:
        raise ValueError(f"interpolation_curve: need equally many first and second texts, got {len(texts_a)} and {len(texts_b)}")
    model.eval()
    L, pad, dev = model.config.max_length, model.config.pad_id, model.device
    ia, ib = encode_texts(tok, texts_a, L), encode_texts(tok, texts_b, L)
    ra, rb = tok.batch_decode(ia, skip_special_tokens=True), tok.batch_decode(ib, skip_special_tokens=True)
    outs: list[list[str]] = [[""] * len(ia) for _ in ts]
    for k in range(0, len(ia), batch_size):
        xa, ma = pad_batch(ia[k : k + batch_size], pad)
        xb, mb = pad_batch(ib[k : k + batch_size], pad)
        dec = model.interpolate(xa.to(dev), xb.to(dev), list(ts), ma.to(dev), mb.to(dev))
        for j, rows in enumerate(dec):
            outs[j][k : k + len(rows)] = tok.batch_decode(rows, skip_special_tokens=True)
    return {"t": list(ts), "bleu_a": [sacrebleu.corpus_bleu(o, [ra]).score for o in outs],
            "bleu_b": [sacrebleu.corpus_bleu(o, [rb]).score for o in outs],
            "examples": {"a": ra[0], "b": rb[0], "path": [o[0] for o in outs]}}


def train_lm(tok, texts: Sequence[str], *, d_model: int = 128, layers: int = 2, heads: int = 4, max_length: int = 64, epochs: int = 3,
             batch_size: int = 64, lr: float = 1e-3, seed: int = 0, show_progress: bool = False):
    """A small GPT-2 language model (``transformers.GPT2LMHeadModel`` from a config) trained on
    ``texts`` (every sequence starts with EOS as BOS); returned in evaluation mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=max_length + 1, n_embd=d_model, n_layer=layers, n_head=heads,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    lm = GPT2LMHeadModel(cfg)
    ids = [[tok.eos_token_id] + s for s in encode_texts(tok, texts, max_length)]
    opt = torch.optim.AdamW(lm.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(len(ids) / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / steps))
    lm.train()
    for ep in range(epochs):
        order = torch.randperm(len(ids), generator=g).tolist()
        for k in progress(range(0, len(order), batch_size), f"LM epoch {ep + 1}/{epochs}", show_progress):
            x, m = pad_batch([ids[i] for i in order[k : k + batch_size]], tok.pad_token_id)
            loss = lm(input_ids=x, attention_mask=m.long(), labels=x.masked_fill(~m, -100)).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return lm.eval()


@torch.no_grad()
def lm_sentence_nll(lm, tok, texts: Sequence[str], max_length: int = 64, batch_size: int = 64) -> tuple[list[float], list[int]]:
    """``(nats, tokens)`` per text, in input order: the summed NLL of each text under ``lm`` (after
    an EOS-as-BOS token, its EOS predicted too) and its number of predicted tokens."""
    ids = [[tok.eos_token_id] + s for s in encode_texts(tok, texts, max_length)]
    nats, tokens = [0.0] * len(ids), [0] * len(ids)
    for rows in _batches(ids, batch_size):
        x, m = pad_batch([ids[i] for i in rows], tok.pad_token_id)
        logits = lm(input_ids=x, attention_mask=m.long()).logits[:, :-1].float()
        tgt = x[:, 1:].masked_fill(~m[:, 1:], -100)
        per = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tgt, ignore_index=-100, reduction="none").double().sum(-1)
        for i, v, n in zip(rows, per.tolist(), m[:, 1:].sum(-1).tolist()):
            nats[i], tokens[i] = v, int(n)
    return nats, tokens


@torch.no_grad()
def lm_perplexity(lm, tok, texts: Sequence[str], max_length: int = 64, batch_size: int = 64) -> float:
    """Token-level perplexity of ``texts`` under ``lm``: ``exp(total NLL / total predicted tokens)``
    (:func:`lm_sentence_nll`)."""
    nats, tokens = lm_sentence_nll(lm, tok, texts, max_length, batch_size)
    return math.exp(sum(nats) / sum(tokens))

"""The koran German-to-English translation model of the translation study (issue 6).

No pretrained translation model can be installed here, so a small Marian-architecture
``MarianMTModel`` is trained from a config on the koran German-to-English training pairs
(``../shared/data/mt-domains/koran/train.*``, about 18k pairs) with a byte-level BPE tokenizer
trained on the same text (:func:`nvformer_studies.common.tokenizer.train_tokenizer`,
:func:`marian_config`, :func:`train_translation`, cached by :func:`load_or_train`).

Training batches (:func:`length_batches`, :func:`collate`) carry decoder inputs and masks built
here; evaluation and greedy decoding use :mod:`nvformer.tasks` (:func:`~nvformer.tasks.pad_rows`,
:func:`~nvformer.tasks.generate_texts`). The checkpoint is selected by greedy BLEU on ``val_size``
koran dev pairs (a seeded subset, ``split_seed``). Everything is seeded (model init, batch order,
dropout, subsets) and device-agnostic (inputs follow the model's device).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nvformer._progress import progress
from nvformer.tasks import generate_texts, pad_rows

from ..common.data import read_parallel
from ..common.subsets import seeded_subset
from ..common.tensorfiles import load_meta, load_tensors, save_tensors
from ..common.tokenizer import train_tokenizer

__all__ = [
    "INFO_FILE",
    "RESUME_FILE",
    "TranslationConfig",
    "build_model",
    "collate",
    "corpus_scores",
    "koran_splits",
    "length_batches",
    "load_or_train",
    "marian_config",
    "measure_training_speed",
    "selection_indices",
    "to_device",
    "train_translation",
    "training_batches",
]

INFO_FILE = "nvformer_translation.json"
RESUME_FILE = "training_state.safetensors"  # load_or_train's checkpoint after every epoch, while training runs


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


def marian_config(tokenizer, d_model: int = 256, layers: int = 3, heads: int = 4, ffn: int = 1024, *, dropout: float = 0.1,
                  max_positions: int = 256):
    """A small ``MarianConfig`` for ``tokenizer``'s vocabulary.

    ``layers`` encoder and ``layers`` decoder layers; shared, tied embeddings (one vocabulary);
    ``pad`` is also the decoder start token and ``</s>`` ends every sequence, as in the released
    Marian models; sinusoidal positions up to ``max_positions``; swish activations, scaled
    embeddings (Marian's defaults).
    """
    from transformers import MarianConfig

    if d_model % heads:
        raise ValueError(f"marian_config: d_model {d_model} is not divisible by heads {heads}")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if pad is None or eos is None:
        raise ValueError("marian_config: the tokenizer needs pad and eos tokens (see train_tokenizer)")
    return MarianConfig(
        vocab_size=len(tokenizer), decoder_vocab_size=len(tokenizer), d_model=d_model,
        encoder_layers=layers, decoder_layers=layers, encoder_attention_heads=heads, decoder_attention_heads=heads,
        encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, max_position_embeddings=max_positions, dropout=dropout,
        attention_dropout=0.0, activation_dropout=0.0, activation_function="swish", scale_embedding=True,
        pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad, forced_eos_token_id=eos, bos_token_id=None,
        share_encoder_decoder_embeddings=True, tie_word_embeddings=True,
    )


def build_model(tokenizer, config: TranslationConfig):
    """A freshly initialised ``MarianMTModel`` (seeded by ``config.seed``) with its generation settings."""
    from transformers import MarianMTModel

    torch.manual_seed(config.seed)
    mc = marian_config(tokenizer, config.d_model, config.layers, config.heads, config.ffn, dropout=config.dropout,
                       max_positions=config.max_positions)
    model = MarianMTModel(mc)
    _generation_defaults(model, tokenizer)
    return model


def _generation_defaults(model, tok) -> None:
    gc = model.generation_config
    gc.pad_token_id, gc.eos_token_id, gc.decoder_start_token_id = tok.pad_token_id, tok.eos_token_id, tok.pad_token_id
    gc.bad_words_ids = [[tok.pad_token_id]]
    gc.num_beams, gc.do_sample, gc.max_length = 1, False, None
    gc.forced_eos_token_id = tok.eos_token_id


# --------------------------------------------------------------------------------------------
# batching
# --------------------------------------------------------------------------------------------


def length_batches(src_lens: Sequence[int], tgt_lens: Sequence[int], batch_tokens: int, max_sentences: int = 512) -> list[list[int]]:
    """Length-bucketed batches: indices sorted by ``(src, tgt)`` length, cut so that
    ``len(batch) * max(longest src, longest tgt) <= batch_tokens`` (at least one pair each)."""
    if len(src_lens) != len(tgt_lens):
        raise ValueError(f"length_batches: {len(src_lens)} source but {len(tgt_lens)} target lengths")
    if batch_tokens < 1:
        raise ValueError(f"length_batches: batch_tokens must be >= 1, got {batch_tokens}")
    order = sorted(range(len(src_lens)), key=lambda i: (src_lens[i], tgt_lens[i], i))
    batches, cur, longest = [], [], 0
    for i in order:
        width = max(longest, src_lens[i], tgt_lens[i])
        if cur and ((len(cur) + 1) * width > batch_tokens or len(cur) >= max_sentences):
            batches.append(cur)
            cur, width = [], max(src_lens[i], tgt_lens[i])
        cur.append(i)
        longest = width
    if cur:
        batches.append(cur)
    return batches


def collate(src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]], pad_id: int, start_id: int | None = None) -> dict[str, Tensor]:
    """Right-padded training inputs of a batch of source / target token-id lists.

    Returns ``input_ids, attention_mask [B, S]``, ``labels [B, T]`` (pad = -100),
    ``decoder_input_ids [B, T]`` (labels shifted right after ``start_id``, default ``pad_id``) and
    ``decoder_attention_mask [B, T]``.
    """
    if not src_ids:
        raise ValueError("collate: empty batch")
    if len(tgt_ids) != len(src_ids):
        raise ValueError(f"collate: {len(src_ids)} sources but {len(tgt_ids)} targets")
    ids, mask = pad_rows(src_ids, pad_id)
    labels, dec_mask = pad_rows(tgt_ids, -100)
    dec = torch.full_like(labels, pad_id)
    dec[:, 0] = pad_id if start_id is None else start_id
    dec[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad_id)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "decoder_input_ids": dec, "decoder_attention_mask": dec_mask}


def _encode(tok, texts: Sequence[str], max_length: int) -> list[list[int]]:
    return tok(list(texts), truncation=True, max_length=max_length)["input_ids"]


def to_device(batch: dict[str, Tensor], device) -> dict[str, Tensor]:
    """The batch's tensors on ``device``."""
    return {k: v.to(device) for k, v in batch.items()}


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def _check_corpus(hyps: Sequence[str], refs: Sequence[str], who: str) -> None:
    if not refs:
        raise ValueError(f"{who}: no sentences")
    if len(hyps) != len(refs):
        raise ValueError(f"{who}: {len(hyps)} hypotheses but {len(refs)} references")


def corpus_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """``{"bleu", "chrf"}``: sacrebleu corpus BLEU (13a tokenisation) and chrF (one reference)."""
    from sacrebleu.metrics import BLEU, CHRF

    _check_corpus(hyps, refs, "corpus_scores")
    return {"bleu": float(BLEU().corpus_score(list(hyps), [list(refs)]).score),
            "chrf": float(CHRF().corpus_score(list(hyps), [list(refs)]).score)}


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TranslationConfig:
    """Model size, data and training settings of the koran German-to-English model.

    The defaults are the cached ``runs/marian-koran`` model (see ``experiments/translation.py``).
    ``train_pairs`` (a seeded subset) and ``max_steps`` exist for tests and timing runs.
    """

    vocab_size: int = 8000
    d_model: int = 256
    layers: int = 3
    heads: int = 4
    ffn: int = 1024
    dropout: float = 0.1
    max_positions: int = 256
    max_length: int = 96
    batch_tokens: int = 2048
    epochs: int = 10
    lr: float = 1e-3
    warmup: int = 500
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    clip: float = 1.0
    val_size: int = 500
    seed: int = 0
    split_seed: int = 0
    train_pairs: int | None = None
    max_steps: int | None = None
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "layers", "heads", "ffn", "max_length", "batch_tokens", "epochs", "val_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TranslationConfig: `{name}` must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.dropout < 1:
            raise ValueError("TranslationConfig: label_smoothing and dropout must be in [0, 1)")


@dataclass
class TrainHistory:
    """Per-epoch losses, dev BLEU and seconds of :func:`train_translation`; the kept epoch; pairs left out."""

    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    val_bleu: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    steps: int = 0
    best_epoch: int = -1
    dropped_long: int = 0


def _labels_loss(model: nn.Module, batch: dict[str, Tensor], smoothing: float) -> Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=batch["decoder_input_ids"],
                decoder_attention_mask=batch["decoder_attention_mask"])
    logits = out.logits
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1), ignore_index=-100,
                                       label_smoothing=smoothing)


@torch.no_grad()
def _dev_loss(model: nn.Module, batches: list[dict[str, Tensor]], device) -> float:
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        b = to_device(b, device)
        n = int((b["labels"] != -100).sum())
        total += float(_labels_loss(model, b, 0.0)) * n
        count += n
    return total / max(count, 1)


def training_batches(tok, src, tgt, config: TranslationConfig, drop_long: bool = False) -> tuple[list[dict[str, Tensor]], int]:
    """Length-bucketed training batches and the number of pairs left out: with ``drop_long``,
    pairs with a side longer than ``config.max_length`` tokens (truncating both sides would
    misalign them); otherwise every pair, truncated."""
    if drop_long:
        s, t = _encode(tok, src, 1 << 30), _encode(tok, tgt, 1 << 30)
        keep = [i for i in range(len(s)) if len(s[i]) <= config.max_length and len(t[i]) <= config.max_length]
        s, t = [s[i] for i in keep], [t[i] for i in keep]
    else:
        s, t = _encode(tok, src, config.max_length), _encode(tok, tgt, config.max_length)
    if not s:
        raise ValueError(f"no pair has both sides within max_length {config.max_length} tokens")
    batches = [collate([s[i] for i in b], [t[i] for i in b], tok.pad_token_id)
               for b in length_batches([len(x) for x in s], [len(x) for x in t], config.batch_tokens)]
    return batches, len(src) - len(s)


def train_translation(model: nn.Module, tok, src: Sequence[str], tgt: Sequence[str], dev_src: Sequence[str], dev_tgt: Sequence[str],
                      config: TranslationConfig = TranslationConfig(), show_progress: bool = True,
                      checkpoint: str | Path | None = None) -> TrainHistory:
    """Train ``model`` in place on ``(src, tgt)`` pairs; the epoch with the best dev BLEU is kept.

    Seeded AdamW (betas 0.9/0.98) with linear warm-up then inverse square-root decay, label
    smoothing, gradient clipping, length-bucketed batches of about ``batch_tokens`` padded
    tokens per side in a seeded random order. Training pairs with a side longer than
    ``config.max_length`` tokens are left out (``history.dropped_long``); dev pairs are
    truncated. After every epoch: dev loss (no smoothing) and greedy dev BLEU; the best BLEU's
    weights are restored at the end (``max_steps`` stops early and then evaluates once).

    ``checkpoint``: a file written after every epoch (weights, optimiser, schedule, random states,
    history, the best weights so far, the config); a run that finds it continues after its last
    epoch and ends with the weights an uninterrupted run ends with. Deleted at the end.
    """
    if len(src) != len(tgt) or len(dev_src) != len(dev_tgt):
        raise ValueError(f"train_translation: mismatched lengths: {len(src)}/{len(tgt)} training and {len(dev_src)}/{len(dev_tgt)} dev sentences")
    if not src or not dev_src:
        raise ValueError("train_translation: need training and dev pairs")
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    train, dropped = training_batches(tok, src, tgt, config, drop_long=True)
    dev, _ = training_batches(tok, dev_src, dev_tgt, config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=config.lr, betas=(0.9, 0.98), eps=1e-9)
    warm = max(1, config.warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, math.sqrt(warm / (s + 1))))
    hist = TrainHistory(dropped_long=dropped)
    best_bleu, best_state, start = -1.0, None, 0
    ckpt = Path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        tensors, meta = load_tensors(ckpt)
        if meta["config"] == asdict(config):
            model.load_state_dict(tensors["model"])
            opt.load_state_dict({"state": {int(k): v for k, v in tensors.get("optimizer", {}).items()}, "param_groups": meta["param_groups"]})
            sched.load_state_dict(meta["scheduler"])
            g.set_state(tensors["rng"]["order"])
            torch.set_rng_state(tensors["rng"]["torch"])
            hist, best_bleu, start = TrainHistory(**meta["history"]), meta["best_bleu"], meta["epoch"] + 1
            best_state = tensors["best"] if meta["has_best"] else None
            if show_progress:
                print(f"resumed from {ckpt} after epoch {start}", flush=True)
    for epoch in range(start, config.epochs):
        t0 = time.time()
        model.train()
        losses = []
        for i in progress(torch.randperm(len(train), generator=g).tolist(), f"epoch {epoch + 1}/{config.epochs}", show_progress):
            loss = _labels_loss(model, to_device(train[i], device), config.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            hist.steps += 1
            if config.max_steps is not None and hist.steps >= config.max_steps:
                break
        hist.train_loss.append(sum(losses) / len(losses))
        hist.val_loss.append(_dev_loss(model, dev, device))
        hyps = generate_texts(model, tok, dev_src, batch_size=config.eval_batch_size, max_new_tokens=2 * config.max_length,
                              max_length=2 * config.max_length)
        hist.val_bleu.append(corpus_scores(hyps, dev_tgt)["bleu"])
        hist.epoch_seconds.append(time.time() - t0)
        if show_progress:
            print(f"epoch {epoch + 1}: train loss {hist.train_loss[-1]:.3f}, dev loss {hist.val_loss[-1]:.3f}, "
                  f"dev BLEU {hist.val_bleu[-1]:.2f} ({hist.epoch_seconds[-1]:.0f} s)", flush=True)
        if hist.val_bleu[-1] > best_bleu:
            best_bleu, best_state, hist.best_epoch = hist.val_bleu[-1], copy.deepcopy(model.state_dict()), epoch
        if config.max_steps is not None and hist.steps >= config.max_steps:
            break
        if ckpt is not None:  # tensors in safetensors, the rest as JSON metadata (no pickle)
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            opt_state = opt.state_dict()
            save_tensors(ckpt.with_suffix(".tmp"),
                         {"model": model.state_dict(), "best": best_state or {}, "optimizer": {str(k): v for k, v in opt_state["state"].items()},
                          "rng": {"order": g.get_state(), "torch": torch.get_rng_state()}},
                         {"config": asdict(config), "epoch": epoch, "param_groups": opt_state["param_groups"], "scheduler": sched.state_dict(),
                          "history": asdict(hist), "best_bleu": best_bleu, "has_best": best_state is not None})
            ckpt.with_suffix(".tmp").replace(ckpt)  # never a half-written checkpoint
    if ckpt is not None:
        ckpt.unlink(missing_ok=True)
    model.load_state_dict(best_state)
    model.eval()
    return hist


def selection_indices(n_dev: int, config: TranslationConfig) -> list[int]:
    """The koran dev pairs (indices of the ``n_dev``) that select the checkpoint: ``val_size`` of
    them, seeded by ``split_seed``."""
    return seeded_subset(n_dev, config.val_size, config.split_seed)


def koran_splits(config: TranslationConfig, data_dir=None) -> dict[str, Any]:
    """The training pairs (all, or a seeded ``train_pairs`` subset), the checkpoint-selection
    dev pairs (``val_size`` of koran dev by a ``split_seed`` permutation) and their indices."""
    train = read_parallel("koran", "train", data_dir)
    keep = [i for i in range(len(train)) if train.de[i].strip() and train.en[i].strip()]
    if config.train_pairs is not None:
        keep = [keep[i] for i in seeded_subset(len(keep), config.train_pairs, config.seed)]
    dev = read_parallel("koran", "dev", data_dir)
    val_idx = selection_indices(len(dev), config)
    return {"train_de": [train.de[i] for i in keep], "train_en": [train.en[i] for i in keep], "train_idx": keep,
            "val_de": [dev.de[i] for i in val_idx], "val_en": [dev.en[i] for i in val_idx], "val_idx": val_idx}


def load_or_train(out: str | Path, config: TranslationConfig = TranslationConfig(), *, force: bool = False, data_dir=None,
                  show_progress: bool = True):
    """``(model, tokenizer, info)``: the koran German-to-English Marian model, trained once
    (tokenizer on the training pairs' German and English text, then :func:`train_translation`)
    and loaded from ``out`` afterwards as long as the recorded config matches.

    ``out`` receives the model, the tokenizer and ``nvformer_translation.json`` (config, data,
    history, parameter count, training time). While training, ``out/training_state.safetensors`` holds the
    state after the last finished epoch (safetensors and JSON metadata): a stopped run of the same config continues from there.
    """
    from transformers import AutoTokenizer, MarianMTModel

    out = Path(out)
    meta = {"config": asdict(config), "data": "mt-domains/koran train (de->en); selection on koran dev", "arch": "MarianMTModel"}
    info_file = out / INFO_FILE
    if not force and info_file.exists():
        info = json.loads(info_file.read_text())
        if info["meta"] == meta:
            tok = AutoTokenizer.from_pretrained(out)
            model = MarianMTModel.from_pretrained(out).eval()
            _generation_defaults(model, tok)
            return model, tok, info
    t0 = time.time()
    sp = koran_splits(config, data_dir)
    resume = out / RESUME_FILE
    if not force and resume.exists() and load_meta(resume)["config"] == asdict(config):
        tok = AutoTokenizer.from_pretrained(out)  # an interrupted run of this config: its tokenizer, then its remaining epochs
    else:
        resume.unlink(missing_ok=True)
        tok = train_tokenizer(sp["train_de"] + sp["train_en"], config.vocab_size)
        out.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(out)
    model = build_model(tok, config)
    hist = train_translation(model, tok, sp["train_de"], sp["train_en"], sp["val_de"], sp["val_en"], config, show_progress, checkpoint=resume)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"meta": meta, "history": asdict(hist), "parameters": sum(p.numel() for p in model.parameters()),
            "train_pairs": len(sp["train_de"]), "val_pairs": len(sp["val_de"]), "seconds": time.time() - t0,
            "threads": torch.get_num_threads()}
    info_file.write_text(json.dumps(info, indent=2))
    return model.eval(), tok, info


def measure_training_speed(config: TranslationConfig = TranslationConfig(), steps: int = 30, *, data_dir=None, warmup_steps: int = 3) -> dict[str, float]:
    """Time ``steps`` training steps of a fresh model of ``config`` on koran batches (nothing saved).

    Returns wall and process CPU seconds per step (after ``warmup_steps`` untimed ones; on a
    shared machine the CPU time is the better guide), steps per epoch, and the projected
    training time of ``config.epochs`` epochs from the wall time (without the per-epoch dev
    evaluation).
    """
    sp = koran_splits(config, data_dir)
    tok = train_tokenizer(sp["train_de"] + sp["train_en"], config.vocab_size)
    model = build_model(tok, config).train()
    batches, _ = training_batches(tok, sp["train_de"], sp["train_en"], config, drop_long=True)
    g = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(batches), generator=g).tolist()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    seconds, cpu = [], []
    for k in range(warmup_steps + steps):
        t0, c0 = time.time(), time.process_time()
        loss = _labels_loss(model, batches[order[k % len(order)]], config.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if k >= warmup_steps:
            seconds.append(time.time() - t0)
            cpu.append(time.process_time() - c0)
    per_step = sum(seconds) / len(seconds)
    tokens = sum(int(b["attention_mask"].sum() + b["decoder_attention_mask"].sum()) for b in batches)
    return {"seconds_per_step": per_step, "cpu_seconds_per_step": sum(cpu) / len(cpu), "steps_per_epoch": len(batches), "epoch_minutes": per_step * len(batches) / 60,
            "train_minutes": per_step * len(batches) * config.epochs / 60, "threads": torch.get_num_threads(),
            "parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tok), "tokens_per_epoch": tokens,
            "train_pairs": len(sp["train_de"])}

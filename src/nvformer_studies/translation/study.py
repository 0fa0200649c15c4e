"""Translation across domains with NV post-training regularisation (issue 6, translation half).

No pretrained translation model can be installed here, so a small Marian-architecture
``MarianMTModel`` is trained from a config on the koran German-to-English training pairs
(``../shared/data/mt-domains/koran/train.*``, about 18k pairs) with a byte-level BPE tokenizer
trained on the same text (:func:`train_tokenizer`, :func:`marian_config`,
:func:`train_translation`, cached by :func:`load_or_train`). The study
(:func:`run_translation_study`) then

1. estimates the empirical prior of every attention site on koran training pairs,
2. converts the model with a large ``alpha_tau`` (identity) and checks that its greedy
   translations equal the original model's (BLEU of one against the other must be 100),
3. for every target domain (koran in-domain, law, medical, it) and every site separately
   (encoder, cross, decoder) searches ``alpha_tau`` / ``stdev_tau`` with :func:`nvformer.tune`,
   maximising greedy BLEU on a seeded subset of the domain's dev split,
4. reports test BLEU and chrF (sacrebleu) of the chosen knobs against the unregularised model,
   with paired bootstrap confidence intervals of the differences (:func:`paired_bootstrap_bleu`).

Splits: the model's own checkpoint selection uses ``val_size`` koran dev pairs (a seeded
permutation of the dev split, ``split_seed``); the study's koran dev subset is drawn from the
*other* dev pairs, so knob search and checkpoint selection never share a sentence. The other
domains have no training split. ``it/`` has double-encoded UTF-8 lines; :func:`nvformer.data.read_parallel`
repairs them and the study reports how many.

Everything is seeded (model init, batch order, dropout, subsets, samplers) and device-agnostic
(inputs follow the model's device).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from nvformer import get_knobs
from nvformer._progress import progress
from nvformer.api import nv_modules, site_of

from ..common.data import MT_DOMAINS, read_parallel

__all__ = [
    "SPECIAL_TOKENS",
    "TranslationConfig",
    "TranslationStudyConfig",
    "bootstrap_indices",
    "collate",
    "corpus_scores",
    "length_batches",
    "load_or_train",
    "marian_config",
    "measure_training_speed",
    "paired_bootstrap_bleu",
    "run_translation_study",
    "seeded_subset",
    "study_markdown",
    "train_tokenizer",
    "train_translation",
    "translate",
]

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2
SITES_ORDER = ("encoder", "cross", "decoder")
INFO_FILE = "nvformer_translation.json"


# --------------------------------------------------------------------------------------------
# tokenizer and model
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts: Sequence[str], vocab_size: int = 8000, *, min_frequency: int = 2, model_max_length: int = 512):
    """A byte-level BPE tokenizer trained on ``texts`` (one vocabulary shared by both languages).

    Special tokens: ``<pad>`` (id 0), ``</s>`` (id 1, appended to every encoded text, as Marian
    expects on both sides), ``<unk>`` (id 2; byte-level BPE never needs it). Decoding with
    ``skip_special_tokens=True`` gives the input text back exactly (no normaliser, no prefix
    space). Returns a ``transformers.PreTrainedTokenizerFast`` (``save_pretrained`` works).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer: no texts")
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"train_tokenizer: vocab_size must be >= {len(SPECIAL_TOKENS) + 256} (specials + 256 bytes), got {vocab_size}")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer=trainer)
    eos = tk.token_to_id("</s>")
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False)


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


def seeded_subset(n_total: int, k: int | None, seed: int, exclude: Sequence[int] = ()) -> list[int]:
    """``k`` indices of ``range(n_total)`` outside ``exclude``, drawn by a seeded permutation, sorted.

    ``k=None`` or ``k >=`` the number available returns them all.
    """
    bad = set(exclude)
    g = torch.Generator().manual_seed(seed)
    pool = [i for i in torch.randperm(n_total, generator=g).tolist() if i not in bad]
    if k is not None:
        if k < 1:
            raise ValueError(f"seeded_subset: k must be >= 1 (or None), got {k}")
        pool = pool[:k]
    return sorted(pool)


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


def _pad(seqs: Sequence[Sequence[int]], value: int) -> Tensor:
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for r, s in enumerate(seqs):
        out[r, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate(src_ids: Sequence[Sequence[int]], tgt_ids: Sequence[Sequence[int]] | None, pad_id: int, start_id: int | None = None) -> dict[str, Tensor]:
    """Right-padded model inputs of a batch of token-id lists.

    Returns ``input_ids, attention_mask [B, S]`` and, with targets, ``labels [B, T]`` (pad =
    -100), ``decoder_input_ids [B, T]`` (labels shifted right after ``start_id``, default
    ``pad_id``) and ``decoder_attention_mask [B, T]``.
    """
    if not src_ids:
        raise ValueError("collate: empty batch")
    ids = _pad(src_ids, pad_id)
    lens = torch.tensor([len(s) for s in src_ids])
    out = {"input_ids": ids, "attention_mask": (torch.arange(ids.shape[1])[None, :] < lens[:, None]).long()}
    if tgt_ids is not None:
        if len(tgt_ids) != len(src_ids):
            raise ValueError(f"collate: {len(src_ids)} sources but {len(tgt_ids)} targets")
        labels = _pad(tgt_ids, -100)
        tl = torch.tensor([len(t) for t in tgt_ids])
        dec = torch.full_like(labels, pad_id)
        dec[:, 0] = pad_id if start_id is None else start_id
        dec[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, pad_id)
        out.update(labels=labels, decoder_input_ids=dec, decoder_attention_mask=(torch.arange(labels.shape[1])[None, :] < tl[:, None]).long())
    return out


def _encode(tok, texts: Sequence[str], max_length: int) -> list[list[int]]:
    return tok(list(texts), truncation=True, max_length=max_length)["input_ids"]


def _to(batch: dict[str, Tensor], device) -> dict[str, Tensor]:
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


def bootstrap_indices(n_items: int, n_resamples: int, seed: int) -> Tensor:
    """``[n_resamples, n_items]`` sentence indices drawn with replacement (seeded)."""
    if n_items < 1 or n_resamples < 1:
        raise ValueError(f"bootstrap_indices: need n_items >= 1 and n_resamples >= 1, got {n_items}, {n_resamples}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_items, (n_resamples, n_items), generator=g)


def paired_bootstrap_bleu(hyps_a: Sequence[str], hyps_b: Sequence[str], refs: Sequence[str], n: int = 1000, seed: int = 0,
                          confidence: float = 0.95) -> dict[str, dict[str, float]]:
    """Paired bootstrap of corpus BLEU and chrF differences ``b - a`` on the same references.

    Each resample draws sentence indices with replacement (:func:`bootstrap_indices`, the same
    for both systems) and recomputes both corpus metrics; corpus BLEU and chrF are functions of
    summed per-sentence sufficient statistics (sacrebleu's own, as its paired tests use), so a
    resample is a ``[n, N] @ [N, K]`` count product and one score computation per row.

    Returns ``{"bleu": {"a", "b", "diff", "low", "high"}, "chrf": {...}}`` (percentile interval).
    """
    from sacrebleu.metrics import BLEU, CHRF

    _check_corpus(hyps_a, refs, "paired_bootstrap_bleu")
    _check_corpus(hyps_b, refs, "paired_bootstrap_bleu")
    if not 0 < confidence < 1:
        raise ValueError(f"paired_bootstrap_bleu: confidence must be in (0, 1), got {confidence}")
    idx = bootstrap_indices(len(refs), n, seed)
    counts = torch.zeros(n, len(refs), dtype=torch.float64)
    counts.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
    alpha = (1.0 - confidence) / 2
    out = {}
    for name, metric in (("bleu", BLEU()), ("chrf", CHRF())):
        scores = {}
        for side, hyps in (("a", hyps_a), ("b", hyps_b)):
            stats = torch.tensor(metric._extract_corpus_statistics(list(hyps), [list(refs)]), dtype=torch.float64)
            sums = (counts @ stats).round().long().tolist()
            full = stats.sum(0).round().long().tolist()
            scores[side] = (float(metric._compute_score_from_stats(full).score),
                            torch.tensor([metric._compute_score_from_stats(row).score for row in sums], dtype=torch.float64))
        d = scores["b"][1] - scores["a"][1]
        out[name] = {"a": scores["a"][0], "b": scores["b"][0], "diff": scores["b"][0] - scores["a"][0],
                     "low": float(torch.quantile(d, alpha)), "high": float(torch.quantile(d, 1 - alpha))}
    return out


# --------------------------------------------------------------------------------------------
# translation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def translate(model: nn.Module, tok, sentences: Sequence[str], batch_size: int = 64, num_beams: int = 1, max_new_tokens: int = 128,
              *, max_length: int = 128, len_a: float = 1.5, len_b: int = 10) -> list[str]:
    """Translate ``sentences`` with ``model.generate()``; returns the strings in input order.

    Sources are truncated to ``max_length`` tokens and sorted by length into batches of
    ``batch_size``; each batch may generate at most ``min(max_new_tokens, len_a * S + len_b)``
    tokens (``S`` its longest source), so a degenerate repetition cannot run far past the source.
    """
    sentences = list(sentences)
    if not sentences:
        raise ValueError("translate: no sentences")
    if batch_size < 1 or num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"translate: batch_size, num_beams and max_new_tokens must be >= 1, got {batch_size}, {num_beams}, {max_new_tokens}")
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions is not None and max(max_length, max_new_tokens + 1) > positions:
        raise ValueError(f"translate: max_length {max_length} / max_new_tokens {max_new_tokens} exceed the model's {positions} positions")
    device = next(model.parameters()).device
    ids = _encode(tok, sentences, max_length)
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    out: list[str | None] = [None] * len(ids)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = _to(collate([ids[i] for i in rows], None, tok.pad_token_id), device)
            limit = max(1, min(max_new_tokens, int(len_a * batch["input_ids"].shape[1] + len_b)))
            gen = model.generate(**batch, num_beams=num_beams, do_sample=False, max_new_tokens=limit,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
            for r, text in zip(rows, tok.batch_decode(gen, skip_special_tokens=True)):
                out[r] = text.strip()
    finally:
        model.train(was_training)
    return out  # type: ignore[return-value]


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
        b = _to(b, device)
        n = int((b["labels"] != -100).sum())
        total += float(_labels_loss(model, b, 0.0)) * n
        count += n
    return total / max(count, 1)


def _make_batches(tok, src, tgt, config: TranslationConfig, drop_long: bool = False) -> tuple[list[dict[str, Tensor]], int]:
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
                      config: TranslationConfig = TranslationConfig(), show_progress: bool = True) -> TrainHistory:
    """Train ``model`` in place on ``(src, tgt)`` pairs; the epoch with the best dev BLEU is kept.

    Seeded AdamW (betas 0.9/0.98) with linear warm-up then inverse square-root decay, label
    smoothing, gradient clipping, length-bucketed batches of about ``batch_tokens`` padded
    tokens per side in a seeded random order. Training pairs with a side longer than
    ``config.max_length`` tokens are left out (``history.dropped_long``); dev pairs are
    truncated. After every epoch: dev loss (no smoothing) and greedy dev BLEU; the best BLEU's
    weights are restored at the end (``max_steps`` stops early and then evaluates once).
    """
    if len(src) != len(tgt) or len(dev_src) != len(dev_tgt):
        raise ValueError(f"train_translation: mismatched lengths: {len(src)}/{len(tgt)} training and {len(dev_src)}/{len(dev_tgt)} dev sentences")
    if not src or not dev_src:
        raise ValueError("train_translation: need training and dev pairs")
    device = next(model.parameters()).device
    torch.manual_seed(config.seed)
    g = torch.Generator().manual_seed(config.seed)
    train, dropped = _make_batches(tok, src, tgt, config, drop_long=True)
    dev, _ = _make_batches(tok, dev_src, dev_tgt, config)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=config.lr, betas=(0.9, 0.98), eps=1e-9)
    warm = max(1, config.warmup)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, math.sqrt(warm / (s + 1))))
    hist = TrainHistory(dropped_long=dropped)
    best_bleu, best_state = -1.0, None
    for epoch in range(config.epochs):
        t0 = time.time()
        model.train()
        losses = []
        for i in progress(torch.randperm(len(train), generator=g).tolist(), f"epoch {epoch + 1}/{config.epochs}", show_progress):
            loss = _labels_loss(model, _to(train[i], device), config.label_smoothing)
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
        hyps = translate(model, tok, dev_src, batch_size=config.eval_batch_size, max_new_tokens=2 * config.max_length,
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
    model.load_state_dict(best_state)
    model.eval()
    return hist


def koran_splits(config: TranslationConfig, data_dir=None) -> dict[str, Any]:
    """The training pairs (all, or a seeded ``train_pairs`` subset), the checkpoint-selection
    dev pairs (``val_size`` of koran dev by a ``split_seed`` permutation) and their indices."""
    train = read_parallel("koran", "train", data_dir)
    keep = [i for i in range(len(train)) if train.de[i].strip() and train.en[i].strip()]
    if config.train_pairs is not None:
        keep = [keep[i] for i in seeded_subset(len(keep), config.train_pairs, config.seed)]
    dev = read_parallel("koran", "dev", data_dir)
    val_idx = seeded_subset(len(dev), config.val_size, config.split_seed)
    return {"train_de": [train.de[i] for i in keep], "train_en": [train.en[i] for i in keep], "train_idx": keep,
            "val_de": [dev.de[i] for i in val_idx], "val_en": [dev.en[i] for i in val_idx], "val_idx": val_idx}


def load_or_train(out: str | Path, config: TranslationConfig = TranslationConfig(), *, force: bool = False, data_dir=None,
                  show_progress: bool = True):
    """``(model, tokenizer, info)``: the koran German-to-English Marian model, trained once
    (tokenizer on the training pairs' German and English text, then :func:`train_translation`)
    and loaded from ``out`` afterwards as long as the recorded config matches.

    ``out`` receives the model, the tokenizer and ``nvformer_translation.json`` (config, data,
    history, parameter count, training time).
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
    tok = train_tokenizer(sp["train_de"] + sp["train_en"], config.vocab_size)
    model = build_model(tok, config)
    hist = train_translation(model, tok, sp["train_de"], sp["train_en"], sp["val_de"], sp["val_en"], config, show_progress)
    out.mkdir(parents=True, exist_ok=True)
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
    batches, _ = _make_batches(tok, sp["train_de"], sp["train_en"], config, drop_long=True)
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


# --------------------------------------------------------------------------------------------
# the study
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TranslationStudyConfig:
    """Settings of :func:`run_translation_study` (sizes chosen for about 30 min on 2 cores).

    ``n_dev`` / ``n_test`` sentence pairs per domain (seeded subsets, ``subset_seed``; koran's
    dev subset avoids the checkpoint-selection pairs), ``n_prior`` koran training pairs for the
    prior (``prior_seed``), ``trials`` Optuna trials per (domain, site) search (TPE,
    ``tune_seed``; the identity corner first), greedy decoding for the objective and the test
    scores (``num_beams``), ``n_bootstrap`` paired resamples.

    ``alpha_range`` is the authors' ``[-15, 10]``. The prior's weight relative to a token is
    about ``exp(-alpha_tau * s_alpha)``, and ``s_alpha`` (the spread of the empirical log
    pseudo-counts) differs a lot between sites (a small model's cross site can have
    ``s_alpha`` ~ 0.01, where ``alpha_tau = 10`` is far from the identity). With
    ``alpha_scale="s_alpha"`` each site's range is divided by the smallest ``s_alpha`` of its
    modules, so the search is over ``alpha_tau * s_alpha`` in ``alpha_range`` and its top corner
    (``exp(-10)`` relative prior weight) is the identity for every site; ``"none"`` uses the range as is.
    """

    train: TranslationConfig = TranslationConfig()
    domains: tuple[str, ...] = ("koran", "law", "medical", "it")
    sites: tuple[str, ...] = SITES_ORDER
    n_dev: int | None = 100
    n_test: int | None = 500
    subset_seed: int = 0
    n_prior: int = 2000
    prior_seed: int = 0
    trials: int = 12
    tune_seed: int = 0
    alpha_range: tuple[float, float] = (-15.0, 10.0)
    alpha_scale: str = "s_alpha"
    stdev_range: tuple[float, float] = (0.0, 0.5)
    identity_alpha: float = 1e4
    batch_size: int = 64
    num_beams: int = 1
    max_new_tokens: int = 128
    max_length: int = 128
    n_bootstrap: int = 1000

    def __post_init__(self) -> None:
        bad = [d for d in self.domains if d not in MT_DOMAINS]
        if bad or not self.domains:
            raise ValueError(f"TranslationStudyConfig: unknown or no domain(s) {bad}; domains are {MT_DOMAINS}")
        bad = [s for s in self.sites if s not in SITES_ORDER]
        if bad or not self.sites:
            raise ValueError(f"TranslationStudyConfig: unknown or no site(s) {bad}; sites are {SITES_ORDER}")
        if self.alpha_scale not in ("s_alpha", "none"):
            raise ValueError(f"TranslationStudyConfig: alpha_scale must be 's_alpha' or 'none', got {self.alpha_scale!r}")
        if self.trials < 1 or self.n_prior < 1 or self.n_bootstrap < 1:
            raise ValueError("TranslationStudyConfig: trials, n_prior and n_bootstrap must be >= 1")

    def key(self) -> str:
        """A short hash of the settings (names the Optuna studies, so stale ones are not resumed)."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:10]


def _knob_state(model: nn.Module) -> tuple:
    return tuple(sorted(get_knobs(model).items()))


class _Translator:
    """Memoised translations of fixed sentence sets under the model's current knobs."""

    def __init__(self, model, tok, cfg: TranslationStudyConfig) -> None:
        self.model, self.tok, self.cfg = model, tok, cfg
        self.memo: dict[tuple, list[str]] = {}
        self.calls = {"memo": 0, "decoded": 0}

    def __call__(self, name: str, sentences: list[str]) -> list[str]:
        key = (name, _knob_state(self.model) if nv_modules(self.model) else None)
        if key in self.memo:
            self.calls["memo"] += 1
            return self.memo[key]
        self.calls["decoded"] += 1
        hyps = translate(self.model, self.tok, sentences, self.cfg.batch_size, self.cfg.num_beams, self.cfg.max_new_tokens,
                         max_length=self.cfg.max_length)
        self.memo[key] = hyps
        return hyps


def _domain_sets(cfg: TranslationStudyConfig, data_dir) -> dict[str, dict[str, Any]]:
    sets = {}
    for d in cfg.domains:
        dev, test = read_parallel(d, "dev", data_dir), read_parallel(d, "test", data_dir)
        exclude = seeded_subset(len(dev), cfg.train.val_size, cfg.train.split_seed) if d == "koran" else []
        di = seeded_subset(len(dev), cfg.n_dev, cfg.subset_seed, exclude)
        ti = seeded_subset(len(test), cfg.n_test, cfg.subset_seed)
        sets[d] = {
            "dev": ([dev.de[i] for i in di], [dev.en[i] for i in di]),
            "test": ([test.de[i] for i in ti], [test.en[i] for i in ti]),
            "indices": {"dev": di, "test": ti},
            "info": {"dev_pairs": len(di), "test_pairs": len(ti), "dev_total": len(dev), "test_total": len(test),
                     "repaired_lines_dev": dev.repaired, "repaired_lines_test": test.repaired,
                     "dev_excluded_for_checkpoint_selection": len(exclude)},
        }
    return sets


def _prior_batches(tok, cfg: TranslationStudyConfig, data_dir) -> list[dict[str, Tensor]]:
    sp = koran_splits(cfg.train, data_dir)
    idx = seeded_subset(len(sp["train_de"]), cfg.n_prior, cfg.prior_seed)
    batches, _ = _make_batches(tok, [sp["train_de"][i] for i in idx], [sp["train_en"][i] for i in idx], cfg.train)
    return [{k: v for k, v in b.items() if k != "labels"} for b in batches]  # no loss needed


def run_translation_study(cfg: TranslationStudyConfig = TranslationStudyConfig(), out_dir: str | Path | None = None, *,
                          model_dir: str | Path = "runs/marian-koran", data_dir=None, show_progress: bool = True) -> dict[str, Any]:
    """The translation study (module docstring); returns the results dict (also ``results.json``
    and ``summary.md`` in ``out_dir`` if given).

    The model comes from :func:`load_or_train` (``model_dir``, ``cfg.train``: trained if no
    matching checkpoint is cached there).
    """
    from nvformer import KnobSpace, convert, estimate_prior, set_knobs, tune

    t0 = time.time()
    model, tok, train_info = load_or_train(model_dir, cfg.train, data_dir=data_dir, show_progress=show_progress)
    # names the Optuna studies: a retrained checkpoint or other settings never resume stale trials
    run_key = hashlib.sha1((cfg.key() + json.dumps(train_info["history"], sort_keys=True)).encode()).hexdigest()[:10]
    device = next(model.parameters()).device
    sets = _domain_sets(cfg, data_dir)
    res: dict[str, Any] = {
        "config": asdict(cfg), "key": run_key, "model_dir": str(model_dir),
        "model": {"parameters": sum(p.numel() for p in model.parameters()), "vocab": len(tok),
                  "best_epoch": train_info["history"]["best_epoch"], "val_bleu": train_info["history"]["val_bleu"],
                  "train_seconds": train_info.get("seconds"), "train_pairs": train_info.get("train_pairs")},
        "data": {d: s["info"] for d, s in sets.items()},
        "subset_indices": {d: s["indices"] for d, s in sets.items()},
        "baseline": {}, "identity": {}, "tuned": {},
    }
    tr = _Translator(model, tok, cfg)
    # 1. the original model's translations (the unregularised baseline)
    base = {}
    for d, s in sets.items():
        for split in ("dev", "test"):
            base[(d, split)] = tr(f"{d}/{split}", s[split][0])
        res["baseline"][d] = {split: corpus_scores(base[(d, split)], s[split][1]) for split in ("dev", "test")}
    # 2. empirical prior on koran training pairs, conversion at identity, equivalence check
    prior_batches = [_to(b, device) for b in _prior_batches(tok, cfg, data_dir)]
    priors = estimate_prior(model, prior_batches, show_progress=False)
    res["prior"] = {"pairs": cfg.n_prior, "seed": cfg.prior_seed,
                    "s_alpha": {name: float(p.log_alpha_std) for name, p in priors.items()}}
    identity = {"alpha_tau": cfg.identity_alpha, "stdev_tau": 0.0, "mu_tau": 1.0}
    convert(model, prior=priors, **identity)
    site_by_name = {name: site_of(model, name, m).site for name, m in nv_modules(model)}
    s_min = {site: min(float(p.log_alpha_std) for name, p in priors.items() if site_by_name.get(name) == site) for site in cfg.sites}
    res["prior"]["s_alpha_min"] = s_min
    tr.memo.clear()
    for d, s in sets.items():
        nv_test = tr(f"{d}/test", s["test"][0])
        res["identity"][d] = {"bleu_vs_original": corpus_scores(nv_test, base[(d, "test")])["bleu"],
                              "identical_fraction": sum(a == b for a, b in zip(nv_test, base[(d, "test")])) / len(nv_test),
                              "sentences": len(nv_test)}
    # 3. per target domain and site: search on dev, score on test
    bar = progress(range(len(cfg.domains) * len(cfg.sites)), "translation study", show_progress)
    steps = iter(bar)
    for d, s in sets.items():
        res["tuned"][d] = {}
        for site in cfg.sites:
            set_knobs(model, **identity)
            dev_src, dev_ref = s["dev"]

            def objective(m, d=d, dev_src=dev_src, dev_ref=dev_ref) -> float:
                return corpus_scores(tr(f"{d}/dev", dev_src), dev_ref)["bleu"]

            scale = s_min[site] if cfg.alpha_scale == "s_alpha" else 1.0
            if not scale > 0:
                raise ValueError(f"run_translation_study: the {site} prior has s_alpha {scale}; use alpha_scale='none'")
            alpha_range = (cfg.alpha_range[0] / scale, cfg.alpha_range[1] / scale)
            space = KnobSpace(sites=(site,), alpha_tau=alpha_range, stdev_tau=tuple(cfg.stdev_range))
            result = tune(model, objective, space=space, n_trials=cfg.trials, seed=cfg.tune_seed,
                          study_name=f"{d}-{site}-{run_key}", out_dir=None if out_dir is None else Path(out_dir) / "tune" / f"{d}-{site}",
                          show_progress=False)
            hyps = tr(f"{d}/test", s["test"][0])
            boot = paired_bootstrap_bleu(base[(d, "test")], hyps, s["test"][1], n=cfg.n_bootstrap, seed=cfg.subset_seed)
            res["tuned"][d][site] = {
                "alpha_range": alpha_range, "alpha_scale": scale,
                "best_params": result.best_params, "identity_corner_dev_bleu": result.identity_value,
                "best_dev_bleu": result.best_value, "trials": len(result.trials),
                "test": {"bleu": boot["bleu"]["b"], "chrf": boot["chrf"]["b"]},
                "bootstrap": {k: {kk: v[kk] for kk in ("diff", "low", "high")} for k, v in boot.items()},
            }
            next(steps, None)
    set_knobs(model, **identity)
    res["translator_calls"] = dict(tr.calls)
    res["seconds"] = time.time() - t0
    res["threads"] = torch.get_num_threads()
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
        (out / "summary.md").write_text(study_markdown(res))
    return res


def _ci(b: dict[str, float]) -> str:
    return f"{b['diff']:+.2f} [{b['low']:+.2f}, {b['high']:+.2f}]"


def study_markdown(res: dict[str, Any]) -> str:
    """Markdown tables of a :func:`run_translation_study` result (identity check, then the search)."""
    cfg = res["config"]
    lines = [
        "| domain | test pairs | NV@identity vs original: BLEU | identical outputs |",
        "| --- | --- | --- | --- |",
    ]
    for d, r in res["identity"].items():
        lines.append(f"| {d} | {r['sentences']} | {r['bleu_vs_original']:.2f} | {100 * r['identical_fraction']:.1f}% |")
    lines += [
        "",
        f"Knobs searched per (domain, site) on the dev subset ({cfg['trials']} Optuna TPE trials, seed {cfg['tune_seed']}, "
        f"alpha_tau * s in {tuple(cfg['alpha_range'])} with s = "
        + ("the site's smallest s_alpha" if cfg["alpha_scale"] == "s_alpha" else "1")
        + f", stdev_tau in {tuple(cfg['stdev_range'])}, objective greedy dev BLEU); test BLEU / chrF "
        f"of the chosen knobs, difference to the unregularised model with a {cfg['n_bootstrap']}-resample paired bootstrap "
        "95% interval. Dev BLEU: unregularised / the search's identity corner / best.",
        "",
        "| domain | site | dev BLEU | alpha_tau (x s) | stdev_tau | test BLEU base | test BLEU NV | diff [95% CI] | test chrF base | test chrF NV | diff [95% CI] |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for d, sites in res["tuned"].items():
        b = res["baseline"][d]
        for site, r in sites.items():
            a = next(v for k, v in r["best_params"].items() if k.endswith("alpha_tau"))
            sd = next(v for k, v in r["best_params"].items() if k.endswith("stdev_tau"))
            idv = r["identity_corner_dev_bleu"]
            lines.append(
                f"| {d} | {site} | {b['dev']['bleu']:.2f} / {'-' if idv is None else f'{idv:.2f}'} / {r['best_dev_bleu']:.2f} "
                f"| {a:.4g} ({a * r.get('alpha_scale', 1.0):.2f}) | {sd:.3f} "
                f"| {b['test']['bleu']:.2f} | {r['test']['bleu']:.2f} | {_ci(r['bootstrap']['bleu'])} "
                f"| {b['test']['chrf']:.2f} | {r['test']['chrf']:.2f} | {_ci(r['bootstrap']['chrf'])} |")
    return "\n".join(lines) + "\n"


def with_train(cfg: TranslationStudyConfig, **train_overrides) -> TranslationStudyConfig:
    """``cfg`` with some :class:`TranslationConfig` fields replaced."""
    return replace(cfg, train=replace(cfg.train, **train_overrides))

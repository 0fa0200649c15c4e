"""Tasks: how texts become batches, and how a model is scored on them (classification, causal
language modelling, sequence-to-sequence).

One container, :class:`TextBatches`, holds tokenised examples in length-sorted batches (little
padding, so little wasted attention) and knows how to put per-example results back in example
order. Scoring returns *per-example statistics* (``[N, K]`` float64 rows, example order); a
:class:`Metric` turns rows into a number, so one paired bootstrap
(:func:`nvformer.metrics.paired_bootstrap`) gives confidence intervals for every metric:

=============== ============================================== ================================
task            per-example statistics                         metrics
=============== ============================================== ================================
classification  logits ``[C]`` and the label                   accuracy, nll, macro_f1, ece
causal-lm       summed token NLL (nats), number of tokens      perplexity, nll (per token)
seq2seq         summed target NLL, number of target tokens;    nll, perplexity; bleu, chrf
                or sacrebleu's sufficient statistics of the    (greedy generation)
                generated text against the reference
=============== ============================================== ================================

Scoring runs under ``torch.no_grad`` in evaluation mode (the mode is restored afterwards) and
moves each batch to the model's device. ``transformers`` is not imported here; ``sacrebleu``
and ``torchmetrics`` only when a metric needs them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "TASKS",
    "Metric",
    "Task",
    "TextBatches",
    "batch_on",
    "classification_batches",
    "generate_texts",
    "get_task",
    "holdout_split",
    "labelled_batches",
    "lm_batches",
    "lm_nll",
    "model_device",
    "predict_logits",
    "seq2seq_batches",
    "seq2seq_nll",
]


# ---------------------------------------------------------------------------------------------- the container


@dataclass
class TextBatches:
    """Tokenised examples in length-sorted batches.

    Attributes:
        batches: model-input dicts, each padded only to its own longest example.
        order: ``[N]`` the example index of each row, batches concatenated.
        labels: ``[N]`` class labels in example order (classification), else None.
        n_tokens: ``[N]`` predicted tokens per example (causal LM), else None.
        sources, references: the raw texts (sequence-to-sequence), for generation and BLEU/chrF.
    """

    batches: list[dict[str, Tensor]]
    order: Tensor
    labels: Tensor | None = None
    n_tokens: Tensor | None = None
    sources: list[str] | None = None
    references: list[str] | None = None

    def __len__(self) -> int:
        return int(self.order.numel())

    def unsort(self, rows: Tensor) -> Tensor:
        """Rows in batch order -> rows in example order (``rows[i]`` belongs to example ``order[i]``)."""
        out = torch.empty_like(rows)
        out[self.order] = rows
        return out


def _length_order(lengths: Sequence[int]) -> Tensor:
    return torch.argsort(torch.tensor(list(lengths)), stable=True)


def _check_texts(texts: Sequence[str], who: str) -> list[str]:
    texts = list(texts)
    if not texts:
        raise ValueError(f"{who}: no texts")
    return texts


def classification_batches(tokenizer, texts: Sequence[str], labels: Sequence[int] | None = None, *, batch_size: int = 32,
                           max_length: int = 256) -> TextBatches:
    """Texts (and integer labels) for a sequence classifier: the tokenizer's own special tokens
    and padding, truncated to ``max_length`` tokens."""
    texts = _check_texts(texts, "classification_batches")
    if labels is not None and len(labels) != len(texts):
        raise ValueError(f"classification_batches: {len(texts)} texts but {len(labels)} labels")
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    order = _length_order([len(ids) for ids in enc["input_ids"]])
    batches = []
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size].tolist()
        feats = [{k: enc[k][i] for k in enc.keys()} for i in idx]
        batches.append(dict(tokenizer.pad(feats, return_tensors="pt")))
    return TextBatches(batches, order, labels=None if labels is None else torch.tensor(list(labels), dtype=torch.long))


def lm_batches(tokenizer, texts: Sequence[str], *, max_tokens: int = 128, batch_size: int = 16) -> TextBatches:
    """Text units for a causal LM: the tokenizer's BOS token (EOS if it has none), then at most
    ``max_tokens`` tokens of the text, right-padded; every text token is predicted."""
    texts = _check_texts(texts, "lm_batches")
    if max_tokens < 1:
        raise ValueError(f"lm_batches: `max_tokens` must be >= 1, got {max_tokens}")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if bos is None or pad is None:
        raise ValueError("lm_batches: the tokenizer has no BOS or EOS token to start a text with")
    ids = [[bos, *tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens]] for t in texts]
    empty = [i for i, x in enumerate(ids) if len(x) < 2]
    if empty:
        raise ValueError(f"lm_batches: {len(empty)} text(s) have no tokens (first: example {empty[0]})")
    order = _length_order([len(x) for x in ids])
    batches = []
    for start in range(0, len(ids), batch_size):
        rows = [ids[i] for i in order[start : start + batch_size].tolist()]
        input_ids, mask = pad_rows(rows, pad)
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    return TextBatches(batches, order, n_tokens=torch.tensor([len(x) - 1 for x in ids]))


def labelled_batches(data: TextBatches, task: str) -> list[dict[str, Tensor]]:
    """The batches of ``data`` as model inputs carrying what a loss reads: ``"classification"``: the
    class labels in batch order; ``"causal-lm"``: the text's own tokens (padding -100), the NLL of
    unlabelled text; ``"seq2seq"``: as they are (they carry their target labels)."""
    out, start = [], 0
    for b in data.batches:
        n = b["input_ids"].shape[0]
        if task == "classification":
            b = dict(b, labels=data.labels[data.order[start : start + n]])
        elif task == "causal-lm":
            b = dict(b, labels=b["input_ids"].masked_fill(b["attention_mask"] == 0, -100))
        out.append(dict(b))
        start += n
    return out


def holdout_split(n: int, holdout: float, seed: int) -> tuple[list[int], list[int]]:
    """``(held, fit)``: the first ``max(1, round(holdout * n))`` indices of the seeded permutation
    ``torch.randperm(n)`` (a ``torch.Generator().manual_seed(seed)``) are held out, the rest are
    fitted on; both in permutation order. Needs ``n >= 2`` and ``0 < holdout < 1``, and leaves at
    least one index to fit on. How ``nvformer tune --method fit`` and the fitted-knobs study divide
    their data into fitting and early-stopping parts."""
    if n < 2 or not 0.0 < holdout < 1.0:
        raise ValueError(f"holdout_split: need n >= 2 and 0 < holdout < 1, got n={n}, holdout={holdout}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    k = min(n - 1, max(1, round(holdout * n)))
    return perm[:k], perm[k:]


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """``(ids [B, S], attention_mask [B, S])``: token-id lists right-padded with ``pad_id`` (mask 1 = token)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(list(row), dtype=torch.long)
    lengths = torch.tensor([len(r) for r in rows])
    return ids, (torch.arange(width)[None, :] < lengths[:, None]).long()


def seq2seq_batches(tokenizer, sources: Sequence[str], targets: Sequence[str], *, batch_size: int = 32, max_length: int = 128) -> TextBatches:
    """Source/target pairs for an encoder-decoder: ``input_ids``, ``attention_mask`` and
    ``labels`` (target ids, pad = -100; the model shifts them into its decoder inputs)."""
    sources = _check_texts(sources, "seq2seq_batches")
    targets = _check_texts(targets, "seq2seq_batches")
    if len(sources) != len(targets):
        raise ValueError(f"seq2seq_batches: {len(sources)} sources but {len(targets)} targets")
    pad = tokenizer.pad_token_id
    if pad is None:
        raise ValueError("seq2seq_batches: the tokenizer has no pad token")
    src = tokenizer(sources, truncation=True, max_length=max_length)["input_ids"]
    tgt = tokenizer(text_target=targets, truncation=True, max_length=max_length)["input_ids"]
    order = _length_order([max(len(s), len(t)) for s, t in zip(src, tgt)])
    batches = []
    for start in range(0, len(src), batch_size):
        idx = order[start : start + batch_size].tolist()
        input_ids, mask = pad_rows([src[i] for i in idx], pad)
        labels, _ = pad_rows([tgt[i] for i in idx], -100)
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return TextBatches(batches, order, n_tokens=torch.tensor([len(t) for t in tgt]), sources=sources, references=targets)


# ---------------------------------------------------------------------------------------------- scoring


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _evaluating:
    """Context: ``model.eval()`` and ``torch.no_grad()``, the previous mode restored on exit."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training
        self.grad = torch.no_grad()

    def __enter__(self) -> torch.device:
        self.grad.__enter__()
        self.model.eval()
        return model_device(self.model)

    def __exit__(self, *exc) -> None:
        self.model.train(self.was_training)
        self.grad.__exit__(*exc)


def batch_on(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def predict_logits(model: nn.Module, data: TextBatches) -> Tensor:
    """``[N, C]`` float32 logits of a sequence classifier (``model(**batch).logits``), example order."""
    with _evaluating(model) as device:
        out = torch.cat([model(**batch_on(b, device)).logits.float().cpu() for b in data.batches])
    return data.unsort(out)


def lm_nll(model: nn.Module, data: TextBatches) -> Tensor:
    """``[N]`` float64 summed negative log-likelihood (nats) of each unit's tokens given its prefix
    (batches of :func:`lm_batches`), example order."""
    out = []
    with _evaluating(model) as device:
        for b in data.batches:
            b = batch_on(b, device)
            logits = model(**b).logits[:, :-1].float()
            target = b["input_ids"][:, 1:]
            valid = b["attention_mask"][:, 1:].bool()
            logp = torch.log_softmax(logits, -1).gather(-1, target[..., None]).squeeze(-1).double()
            out.append(-(logp * valid).sum(-1).cpu())
    return data.unsort(torch.cat(out))


def seq2seq_nll(model: nn.Module, data: TextBatches) -> Tensor:
    """``[N]`` float64 summed target NLL (nats) given the source, teacher-forced (batches of
    :func:`seq2seq_batches`), example order."""
    out = []
    with _evaluating(model) as device:
        for b in data.batches:
            b = batch_on(b, device)
            logits = model(**b).logits.float()
            labels = b["labels"]
            logp = torch.log_softmax(logits, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1).double()
            out.append(-(logp * (labels != -100)).sum(-1).cpu())
    return data.unsort(torch.cat(out))


def generate_texts(model: nn.Module, tokenizer, sources: Sequence[str], *, batch_size: int = 64, num_beams: int = 1,
                   max_new_tokens: int = 128, max_length: int = 128, len_a: float = 1.5, len_b: int = 10) -> list[str]:
    """Greedy (or beam) ``model.generate()`` outputs for ``sources``, in input order.

    Sources are truncated to ``max_length`` tokens and sorted by length into batches of
    ``batch_size``; each batch may generate at most ``min(max_new_tokens, len_a * S + len_b)``
    tokens (``S`` its longest source), so a degenerate repetition cannot run far past the source.
    """
    sources = _check_texts(sources, "generate_texts")
    if batch_size < 1 or num_beams < 1 or max_new_tokens < 1:
        raise ValueError(f"generate_texts: batch_size, num_beams and max_new_tokens must be >= 1, got {batch_size}, {num_beams}, {max_new_tokens}")
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if positions is not None and max(max_length, max_new_tokens + 1) > positions:
        raise ValueError(f"generate_texts: max_length {max_length} / max_new_tokens {max_new_tokens} exceed the model's {positions} positions")
    ids = tokenizer(sources, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    out: list[str] = [""] * len(ids)
    with _evaluating(model) as device:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            input_ids, mask = pad_rows([ids[i] for i in rows], tokenizer.pad_token_id)
            limit = max(1, min(max_new_tokens, int(len_a * input_ids.shape[1] + len_b)))
            gen = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), num_beams=num_beams, do_sample=False,
                                 max_new_tokens=limit, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for r, text in zip(rows, tokenizer.batch_decode(gen, skip_special_tokens=True)):
                out[r] = text.strip()
    return out


# ---------------------------------------------------------------------------------------------- metrics and tasks


@dataclass(frozen=True)
class Metric:
    """A number computed from per-example statistics.

    ``of_sums``: ``statistic`` takes the column sums ``[K]`` of the rows (ratios of sums:
    perplexity, BLEU, chrF; the bootstrap then resamples through one matrix product); otherwise it
    takes the rows ``[n, K]`` themselves.
    """

    name: str
    direction: str  # "maximize" or "minimize"
    statistic: Callable[[Tensor], float]
    of_sums: bool = False

    def __call__(self, rows: Tensor) -> float:
        return float(self.statistic(rows.sum(0) if self.of_sums else rows))

    def compare(self, a: Tensor | Sequence[Tensor], b: Tensor | Sequence[Tensor], **bootstrap: Any) -> dict[str, float]:
        """:func:`nvformer.metrics.paired_bootstrap` of this metric: system ``b`` against ``a`` on the
        same examples (per-example statistics, or lists of them per group); ``bootstrap``: its
        ``n_resamples``, ``confidence``, ``seed``."""
        from .metrics import paired_bootstrap

        return paired_bootstrap(a, b, self.statistic, of_sums=self.of_sums, **bootstrap)


def _classification_metric(name: str) -> Callable[[Tensor], float]:
    def statistic(rows: Tensor) -> float:
        from .metrics import classification_metrics

        return classification_metrics(rows[:, :-1].float(), rows[:, -1].long())[name]

    return statistic


def _accuracy(rows: Tensor) -> float:
    return float((rows[:, :-1].argmax(-1) == rows[:, -1].long()).double().mean())


def _nll_per_token(sums: Tensor) -> float:
    return float(sums[0] / sums[1])


def _perplexity(sums: Tensor) -> float:
    return math.exp(float(sums[0] / sums[1]))


def _sacrebleu(name: str) -> Callable[[Tensor], float]:
    def statistic(sums: Tensor) -> float:
        return _sacrebleu_metric(name)._compute_score_from_stats(sums.round().long().tolist()).score

    return statistic


def _sacrebleu_metric(name: str):
    from sacrebleu.metrics import BLEU, CHRF

    return BLEU() if name == "bleu" else CHRF()


@dataclass(frozen=True)
class Task:
    """One kind of model and data: what columns it reads, how it batches them, how it scores.

    Attributes:
        name: ``"classification"``, ``"causal-lm"`` or ``"seq2seq"``.
        auto_class: the ``transformers`` auto class that loads such a model.
        metrics: ``{name: Metric}``; ``default_metric`` is the first.
        needs: the data columns it reads besides the text (``"label"``, ``"target"``).
    """

    name: str
    auto_class: str
    metrics: dict[str, Metric]
    needs: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def default_metric(self) -> str:
        return next(iter(self.metrics))

    def metric(self, name: str | None) -> Metric:
        name = name or self.default_metric
        if name not in self.metrics:
            raise ValueError(f"task {self.name!r} has no metric {name!r}; metrics are {sorted(self.metrics)}")
        return self.metrics[name]

    def prepare(self, tokenizer, texts: Sequence[str], labels: Sequence[Any] | None = None, targets: Sequence[str] | None = None, *,
                batch_size: int = 32, max_length: int = 128) -> TextBatches:
        """Batches of the task (labels must already be class indices)."""
        if self.name == "classification":
            if labels is None:
                raise ValueError("classification needs labels")
            return classification_batches(tokenizer, texts, labels, batch_size=batch_size, max_length=max_length)
        if self.name == "causal-lm":
            return lm_batches(tokenizer, texts, max_tokens=max_length, batch_size=batch_size)
        if targets is None:
            raise ValueError("seq2seq needs targets")
        return seq2seq_batches(tokenizer, texts, targets, batch_size=batch_size, max_length=max_length)

    def stats(self, model: nn.Module, data: TextBatches, metric: str | None = None, tokenizer=None) -> Tensor:
        """``[N, K]`` float64 per-example statistics of ``model`` on ``data`` for ``metric`` (example order)."""
        name = self.metric(metric).name
        if self.name == "classification":
            return torch.cat([predict_logits(model, data).double(), data.labels[:, None].double()], 1)
        if self.name == "causal-lm":
            return torch.stack([lm_nll(model, data), data.n_tokens.double()], 1)
        if name in ("bleu", "chrf"):
            if tokenizer is None:
                raise ValueError(f"the {name} metric generates text: pass the tokenizer")
            hyps = generate_texts(model, tokenizer, data.sources)
            return sentence_stats(name, hyps, data.references)
        return torch.stack([seq2seq_nll(model, data), data.n_tokens.double()], 1)


def sentence_stats(name: str, hypotheses: Sequence[str], references: Sequence[str]) -> Tensor:
    """``[N, K]`` sacrebleu sufficient statistics (``"bleu"`` or ``"chrf"``) of each sentence; the
    corpus score is computed from their column sums."""
    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"sentence_stats: {len(hypotheses)} hypotheses for {len(references)} references")
    metric = _sacrebleu_metric(name)
    return torch.tensor(metric._extract_corpus_statistics(list(hypotheses), [list(references)]), dtype=torch.float64)


TASKS: dict[str, Task] = {
    "classification": Task(
        "classification", "AutoModelForSequenceClassification",
        {"accuracy": Metric("accuracy", "maximize", _accuracy), "nll": Metric("nll", "minimize", _classification_metric("nll")),
         "macro_f1": Metric("macro_f1", "maximize", _classification_metric("macro_f1")),
         "ece": Metric("ece", "minimize", _classification_metric("ece"))},
        needs=("label",),
    ),
    "causal-lm": Task(
        "causal-lm", "AutoModelForCausalLM",
        {"perplexity": Metric("perplexity", "minimize", _perplexity, of_sums=True),
         "nll": Metric("nll", "minimize", _nll_per_token, of_sums=True)},
    ),
    "seq2seq": Task(
        "seq2seq", "AutoModelForSeq2SeqLM",
        {"nll": Metric("nll", "minimize", _nll_per_token, of_sums=True), "perplexity": Metric("perplexity", "minimize", _perplexity, of_sums=True),
         "chrf": Metric("chrf", "maximize", _sacrebleu("chrf"), of_sums=True), "bleu": Metric("bleu", "maximize", _sacrebleu("bleu"), of_sums=True)},
        needs=("target",),
    ),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks are {sorted(TASKS)}")
    return TASKS[name]

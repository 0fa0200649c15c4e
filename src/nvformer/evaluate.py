"""Fast repeated evaluation of a sequence classifier (the cost of a knob search).

:class:`TokenizedSet` tokenises once and groups examples into batches of similar length (so
padding, hence wasted attention, is small); :func:`predict_logits` runs the model over it under
``torch.no_grad`` and returns the logits in the original example order. A knob search calls
``predict_logits`` once per trial and nothing else is recomputed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["TokenizedSet", "predict_logits"]


@dataclass
class TokenizedSet:
    """Pre-tokenised examples in length-sorted batches.

    Attributes:
        batches: list of model-input dicts (``input_ids``, ``attention_mask``, ...), each padded
            only to its own longest example.
        order: ``[N]`` the example index of each row, batches concatenated.
        labels: ``[N]`` labels in the original order (or None).
    """

    batches: list[dict[str, Tensor]]
    order: Tensor
    labels: Tensor | None

    @classmethod
    def build(cls, tokenizer, texts: list[str], labels: list[int] | None = None, *, batch_size: int = 32, max_length: int = 256) -> TokenizedSet:
        if not texts:
            raise ValueError("TokenizedSet.build: no texts")
        if labels is not None and len(labels) != len(texts):
            raise ValueError(f"TokenizedSet.build: {len(texts)} texts but {len(labels)} labels")
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        lengths = torch.tensor([len(ids) for ids in enc["input_ids"]])
        order = torch.argsort(lengths, stable=True)
        batches = []
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size].tolist()
            feats = [{k: enc[k][i] for k in enc.keys()} for i in idx]
            batches.append(dict(tokenizer.pad(feats, return_tensors="pt")))
        return cls(batches, order, None if labels is None else torch.tensor(labels, dtype=torch.long))

    def __len__(self) -> int:
        return int(self.order.numel())


@torch.no_grad()
def predict_logits(model: nn.Module, data: TokenizedSet) -> Tensor:
    """``[N, C]`` logits of a sequence classifier, in the original example order."""
    was_training = model.training
    model.eval()
    try:
        out = torch.cat([model(**b).logits.float() for b in data.batches])
    finally:
        model.train(was_training)
    logits = torch.empty_like(out)
    logits[data.order] = out
    return logits

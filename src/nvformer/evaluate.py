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

__all__ = ["KnobCache", "TokenizedSet", "in_original_order", "layer_stack", "predict_logits"]


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


def in_original_order(rows: Tensor, order: Tensor) -> Tensor:
    """Undo a length sort: ``rows[i]`` belongs to example ``order[i]``; returns them by example index."""
    out = torch.empty_like(rows)
    out[order] = rows
    return out


@torch.no_grad()
def predict_logits(model: nn.Module, data: TokenizedSet) -> Tensor:
    """``[N, C]`` logits of a sequence classifier, in the original example order."""
    was_training = model.training
    model.eval()
    try:
        out = torch.cat([model(**b).logits.float() for b in data.batches])
    finally:
        model.train(was_training)
    return in_original_order(out, data.order)


def layer_stack(model: nn.Module) -> tuple[nn.ModuleList, list[list[nn.Module]]]:
    """The ``nn.ModuleList`` of Transformer layers holding a converted model's NV modules, and
    the NV modules of each layer (``[layer][module]``).

    Raises ``ValueError`` if the model has no NV module or its NV modules are not all inside
    the entries of one ``nn.ModuleList``.
    """
    from .hf.convert import nv_modules

    mods = nv_modules(model)
    if not mods:
        raise ValueError(f"layer_stack: {type(model).__name__} has no NV attention module (convert it first)")
    parts = mods[0][0].split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:cut])
        stack = model.get_submodule(parent) if parent else model
        if not isinstance(stack, nn.ModuleList):
            continue
        per_layer: list[list[nn.Module]] = [[] for _ in stack]
        ok = True
        for name, m in mods:
            rest = name[len(parent) + 1:].split(".") if name.startswith(parent + ".") else None
            if not rest or not rest[0].isdigit():
                ok = False
                break
            per_layer[int(rest[0])].append(m)
        if ok:
            return stack, per_layer
    raise ValueError(f"layer_stack: the NV modules of {type(model).__name__} are not inside one nn.ModuleList of layers")


class _Replay(nn.Module):
    """Stands in for a layer whose output is already known: returns ``output`` (or, for the
    layers before it, its first input unchanged - the next replayed layer ignores it)."""

    def __init__(self, output=None):
        super().__init__()
        self.output = output

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.output is None else self.output


class KnobCache:
    """Memoised evaluation of a converted classifier for knob searches.

    ``logits(data)`` returns what :func:`predict_logits` would, but

    * the logits of every (knob setting, data set) pair already evaluated are returned from a memo,
      so a setting that several searches or selection rules visit is run once;
    * the output of every layer ``l`` under the *reference* knobs (those the model had when the
      cache was built) on all layers ``<= l`` is kept, so a setting that differs from the
      reference only from layer ``k`` on runs layers ``k, k+1, ...`` only (layers before are
      replayed). Single-layer searches of late layers then cost a fraction of a forward pass.

    The key of a setting is the knobs of every NV module, read from the model at call time, plus
    ``tag``. Anything else that changes the outputs (weights, priors) must change ``tag`` (or
    call :meth:`clear`): the cache cannot see it.

    Args:
        model: a converted sequence classifier (``model(**batch).logits``).
        max_bytes: bound on the memory of the kept layer outputs (oldest dropped first).
    """

    def __init__(self, model: nn.Module, max_bytes: float = 4e9) -> None:
        self.model = model
        self.stack, self.modules = layer_stack(model)
        self.max_bytes = float(max_bytes)
        self.tag: object = None
        self.reference = self._state()
        self.memo: dict[tuple, Tensor] = {}
        self.outputs: dict[tuple, list] = {}
        self._sets: dict[int, TokenizedSet] = {}  # keeps keyed data sets alive (keys use id())
        self.calls = {"memo": 0, "full": 0, "replayed_layers": 0, "run_layers": 0}

    def _state(self) -> tuple:
        return tuple(tuple(tuple(sorted(m.nvib.knobs().items())) for m in mods) for mods in self.modules)

    def clear(self, tag: object = None) -> None:
        """Forget everything (after changing weights or priors) and take the current knobs as the reference."""
        self.memo.clear()
        self.outputs.clear()
        self._sets.clear()
        self.tag = tag
        self.reference = self._state()

    def _bytes(self) -> int:
        return sum(t.numel() * t.element_size() for outs in self.outputs.values() for t in outs if isinstance(t, Tensor))

    @torch.no_grad()
    def logits(self, data: TokenizedSet) -> Tensor:
        """``[N, C]`` logits in the original example order (see :func:`predict_logits`)."""
        state = self._state()
        self._sets[id(data)] = data
        key = (id(data), self.tag, state)
        if key in self.memo:
            self.calls["memo"] += 1
            return self.memo[key]
        n = len(self.stack)
        same = 0  # layers 0..same-1 have the reference knobs
        while same < n and state[same] == self.reference[same]:
            same += 1
        start = 0  # first layer to run; the output of layer start-1 is replayed
        for layer in range(min(same, n - 1), 0, -1):
            if (id(data), self.tag, layer - 1) in self.outputs:
                start = layer
                break
        keep = [layer for layer in range(start, min(same, n - 1)) if (id(data), self.tag, layer) not in self.outputs]
        captured: dict[int, list] = {layer: [] for layer in keep}
        hooks = [self.stack[layer].register_forward_hook(lambda mod, args, out, layer=layer: captured[layer].append(out)) for layer in keep]
        originals = [self.stack[layer] for layer in range(start)]
        was_training = self.model.training
        self.model.eval()
        outs = []
        try:
            for b, batch in enumerate(data.batches):
                for layer in range(start):
                    self.stack[layer] = _Replay(self.outputs[(id(data), self.tag, start - 1)][b] if layer == start - 1 else None)
                outs.append(self.model(**batch).logits.float())
        finally:
            for layer, mod in enumerate(originals):
                self.stack[layer] = mod
            for h in hooks:
                h.remove()
            self.model.train(was_training)
        for layer, got in captured.items():
            self.outputs[(id(data), self.tag, layer)] = got
        while self.outputs and self._bytes() > self.max_bytes:
            self.outputs.pop(next(iter(self.outputs)))
        self.calls["full" if start == 0 else "replayed_layers"] += 1
        self.calls["run_layers"] += n - start
        logits = in_original_order(torch.cat(outs), data.order)
        self.memo[key] = logits
        return logits

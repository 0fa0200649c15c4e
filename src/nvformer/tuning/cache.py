"""Memoised evaluation of a converted sequence classifier for knob searches (:class:`KnobCache`):
each (setting, data set) pair runs once, and layers before the first changed one are replayed.
Data sets are :class:`~nvformer.tasks.TextBatches` (tokenised once, length-sorted).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..api import nv_modules
from ..tasks import TextBatches

__all__ = ["KnobCache", "layer_stack"]


def layer_stack(model: nn.Module) -> tuple[nn.ModuleList, list[list[nn.Module]]]:
    """The ``nn.ModuleList`` of Transformer layers holding a converted model's NV modules, and
    the NV modules of each layer (``[layer][module]``).

    Raises ``ValueError`` if the model has no NV module or its NV modules are not all inside
    the entries of one ``nn.ModuleList``.
    """
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

    ``logits(data)`` returns what :func:`nvformer.tasks.predict_logits` would, but

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
        self._sets: dict[int, TextBatches] = {}  # keeps keyed data sets alive (keys use id())
        self.calls = {"memo": 0, "full": 0, "replayed_layers": 0, "run_layers": 0}

    def _state(self) -> tuple:
        def heads(nvib):
            h = nvib.head_knobs()
            return None if h is None else (tuple(h["alpha_tau"]), tuple(h["stdev_tau"]))

        return tuple(tuple((m.nvib.knobs(), heads(m.nvib)) for m in mods) for mods in self.modules)

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
    def logits(self, data: TextBatches) -> Tensor:
        """``[N, C]`` logits in example order (see :func:`nvformer.tasks.predict_logits`)."""
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
        logits = data.unsort(torch.cat(outs))
        self.memo[key] = logits
        return logits

"""Seeded splits and subsets of data sets: every study draws its examples through these two functions.

* :func:`stratified_split`: a seeded split of indices into parts with given fractions, per label.
* :func:`seeded_subset`: ``k`` seeded indices of ``range(n)`` (a permutation cut short; stratified
  by labels if given; some indices excluded), sorted or in drawing order.

The draws are those of the recorded runs in docs/RESULTS.md: a ``torch.Generator`` permutation for
the sentiment, language-model, translation and Bayes studies, Python's ``random`` shuffle for the
NVAE sentence splits (``generator="python"``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

__all__ = ["seeded_subset", "stratified_split"]

GENERATORS = ("torch", "python")


def stratified_split(labels: Sequence[int], fractions: tuple[float, ...], seed: int) -> list[list[int]]:
    """Seeded stratified split of indices into ``len(fractions)`` parts (fractions sum to 1).

    Per label (in sorted order) the indices of that label are permuted with one
    ``torch.Generator().manual_seed(seed)`` shared by all labels and cut by the fractions (the
    last part takes the rest); each part is returned sorted.
    """
    if abs(sum(fractions) - 1.0) > 1e-9:
        raise ValueError(f"stratified_split: fractions must sum to 1, got {fractions}")
    g = torch.Generator().manual_seed(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for label in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == label]
        perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
        start = 0
        for k, frac in enumerate(fractions):
            end = len(perm) if k == len(fractions) - 1 else start + round(frac * len(perm))
            parts[k].extend(perm[start:end])
            start = end
    return [sorted(p) for p in parts]


def seeded_subset(n: int, k: int | None, seed: int, *, exclude: Sequence[int] = (), labels: Sequence[int] | None = None,
                  sort: bool = True, generator: str = "torch") -> list[int]:
    """``k`` indices of ``range(n)`` drawn with ``seed``; ``k=None`` (or ``k`` at least the number
    available) takes them all.

    Args:
        n: the number of examples.
        k: how many to draw (>= 1), or None for all.
        seed: the seed of the draw.
        exclude: indices never drawn (they are removed from the permutation, so the others keep
            their places in it).
        labels: ``[n]`` class labels: draw a stratified subset instead, the first part of
            :func:`stratified_split` with fractions ``(k / n, 1 - k / n)`` (always sorted).
        sort: return the indices sorted (else in the order of the permutation, e.g. a shuffled
            data set, or a permutation to cut into splits with ``k=None``).
        generator: ``"torch"``: the permutation is ``torch.randperm(n)`` of a
            ``torch.Generator().manual_seed(seed)``; ``"python"``: ``random.Random(seed).shuffle``
            of ``range(n)``.

    Returns:
        The indices, a list of ints.
    """
    if k is not None and k < 1:
        raise ValueError(f"seeded_subset: k must be >= 1 (or None), got {k}")
    if generator not in GENERATORS:
        raise ValueError(f"seeded_subset: `generator` must be one of {GENERATORS}, got {generator!r}")
    if labels is not None:
        if len(labels) != n or exclude or not sort or generator != "torch":
            raise ValueError("seeded_subset: a stratified subset needs n labels, no exclusions, sort=True and the torch "
                             "generator")
        if k is None or k >= n:
            return list(range(n))
        return stratified_split(labels, (k / n, 1 - k / n), seed)[0]
    if generator == "torch":
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    else:
        perm = list(range(n))
        random.Random(seed).shuffle(perm)
    bad = set(exclude)
    pool = [i for i in perm if i not in bad]
    if k is not None:
        pool = pool[:k]
    return sorted(pool) if sort else pool


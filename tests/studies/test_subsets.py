"""Seeded splits and subsets: seeded, disjoint, stratified, and the exact draws of the recorded runs."""

import random

import pytest
import torch

from nvformer_studies.common.subsets import seeded_subset, stratified_split


def test_stratified_split_is_seeded_disjoint_and_stratified():
    labels = [0] * 100 + [1] * 60
    a = stratified_split(labels, (0.6, 0.2, 0.2), seed=3)
    b = stratified_split(labels, (0.6, 0.2, 0.2), seed=3)
    c = stratified_split(labels, (0.6, 0.2, 0.2), seed=4)
    assert a == b and a != c
    assert sorted(i for p in a for i in p) == list(range(160))
    assert [sum(labels[i] for i in p) for p in a] == [36, 12, 12]
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_split(labels, (0.5, 0.2), seed=0)


def test_seeded_subset_is_seeded_sorted_and_respects_exclusions():
    a = seeded_subset(100, 10, seed=3)
    assert a == seeded_subset(100, 10, seed=3) and a != seeded_subset(100, 10, seed=4)
    assert len(set(a)) == 10 and a == sorted(a)
    b = seeded_subset(100, 50, seed=3, exclude=a)
    assert not set(a) & set(b) and len(b) == 50
    assert seeded_subset(5, None, seed=0) == [0, 1, 2, 3, 4] == seeded_subset(5, 9, seed=0)
    with pytest.raises(ValueError, match="k must be >= 1"):
        seeded_subset(5, 0, seed=0)
    with pytest.raises(ValueError, match="generator"):
        seeded_subset(5, 2, seed=0, generator="numpy")


def test_seeded_subset_draws_what_the_studies_drew():
    # the language-model and translation subsets: the first k of a torch permutation, sorted
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(7)).tolist()
    assert seeded_subset(40, 12, 7) == sorted(perm[:12])
    assert seeded_subset(40, None, 7, sort=False) == perm
    # excluded indices leave the others' places in the permutation unchanged
    assert seeded_subset(40, 12, 7, exclude=perm[:3], sort=False) == perm[3:15]
    # the Bayes study's evaluation subsets: the same draw, in drawing order
    assert seeded_subset(40, 12, 7, sort=False) == perm[:12]
    # the NVAE sentence splits: Python's random.shuffle of the items themselves
    items = [f"s{i}" for i in range(40)]
    shuffled = list(items)
    random.Random(7).shuffle(shuffled)
    assert [items[i] for i in seeded_subset(40, None, 7, sort=False, generator="python")] == shuffled
    assert [items[i] for i in seeded_subset(40, 5, 7, sort=False, generator="python")] == shuffled[:5]


def test_stratified_subset_is_the_first_part_of_a_stratified_split():
    labels = [0] * 30 + [1] * 20
    idx = seeded_subset(50, 10, 2, labels=labels)
    assert idx == stratified_split(labels, (10 / 50, 40 / 50), 2)[0]
    assert [labels[i] for i in idx].count(1) == 4 and idx == sorted(idx)
    assert seeded_subset(50, None, 2, labels=labels) == list(range(50)) == seeded_subset(50, 50, 2, labels=labels)
    with pytest.raises(ValueError, match="stratified"):
        seeded_subset(50, 10, 2, labels=labels, exclude=[1])


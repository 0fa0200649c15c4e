"""The shared study protocol: conversion at the identity, searches from the identity, choices applied alone."""

import pytest
import torch
from hf_models import build, inputs

from nvformer import IDENTITY, KnobSpace, get_knobs
from nvformer_studies.common.protocol import Choice, Protocol, convert_at_identity


@pytest.fixture()
def converted():
    model = build("bert")
    kw, _ = inputs("bert", "right")
    with torch.no_grad():
        ref = model(**kw).logits
    priors = convert_at_identity(model, [kw])
    return model, kw, ref, priors


def test_convert_at_identity_keeps_the_outputs(converted):
    model, kw, ref, priors = converted
    assert len(priors) == 2 and all(k == IDENTITY for k in get_knobs(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(**kw).logits, ref, rtol=0, atol=1e-5)


def test_search_starts_from_the_identity_and_apply_sets_only_the_choice(converted):
    model, kw, ref, _ = converted
    proto = Protocol(model, seed=3)
    proto.reset()
    moved = model.bert.encoder.layer[0].attention.self.nvib
    moved.set_knobs(alpha_tau=-3.0)  # a leftover setting the search must not start from

    def objective(m):
        with torch.no_grad():
            return -float((m(**kw).logits - ref).abs().mean())  # the identity is the best possible

    space = KnobSpace(alpha_tau=(-4.0, 4.0), layers=(1,))  # layer 0 keeps whatever the search starts from
    choice = proto.search(Choice("nv", "target"), space, objective, n_trials=4)
    assert (choice.method, choice.target, choice.space, choice.trials) == ("nv", "target", space, 4)
    assert set(choice.params) == {"encoder.1/alpha_tau", "encoder.1/stdev_tau"}
    assert get_knobs(model)["encoder.0"] == IDENTITY  # the leftover setting was reset
    assert choice.value >= choice.identity_value > -1e-3  # the identity corner (alpha_tau = 4) is near the identity
    left = get_knobs(model)  # tune leaves the model at the best knobs: the same state apply gives
    proto.apply(Choice("other", "target"))
    assert all(k == IDENTITY for k in get_knobs(model).values())
    proto.apply(choice)
    assert get_knobs(model) == left
    custom = Protocol(model, identity=IDENTITY.replace(alpha_tau=1e3))
    custom.reset()
    assert {k.alpha_tau for k in get_knobs(model).values()} == {1e3}

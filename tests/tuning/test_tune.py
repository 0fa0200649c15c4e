"""Knob search with Optuna: identity first, best applied, resumable, outputs (workers: test_tune_workers.py)."""

import json

import pytest
import torch
from hf_models import build, inputs
from tune_worker import objective_for

import nvformer as nv


def test_tune_finds_knobs_better_than_identity_and_applies_them(tmp_path):
    model = nv.convert(build("bert"))
    objective = objective_for(model)
    res = nv.tune(model, objective, space=nv.KnobSpace(alpha_tau=(-5.0, 10.0), stdev_tau=(0.0, 0.5)), n_trials=25,
                  seed=0, out_dir=tmp_path, report=lambda m: {"check": objective(m)}, show_progress=False)
    assert res.trials[0]["all/alpha_tau"] == 10.0 and res.trials[0]["all/stdev_tau"] == 0.0  # identity corner first
    assert res.identity_value == res.trials[0]["value"]
    values = [t["value"] for t in res.trials if t["state"] == "COMPLETE"]
    assert res.best_value == max(values) and res.best_value > res.identity_value
    # the model is left at the best knobs: the report and a fresh evaluation agree with best_value
    assert res.best_report["check"] == pytest.approx(res.best_value, abs=1e-6)
    knobs = {k.alpha_tau for k in nv.get_knobs(model).values()}
    assert knobs == {res.best_params["all/alpha_tau"]}
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["best_value"] == pytest.approx(res.best_value) and best["n_trials"] == 25 and best["states"] == {"COMPLETE": 25}
    assert best["best_number"] == res.best_number and res.trials[res.best_number]["value"] == res.best_value
    assert (tmp_path / "trials.csv").read_text().count("\n") == 26
    assert (tmp_path / "history.png").exists() and (tmp_path / "knobs.png").exists()


def test_tune_resumes_from_its_sqlite_storage(tmp_path):
    model = nv.convert(build("bert"))
    objective = objective_for(model)
    first = nv.tune(model, objective, n_trials=3, out_dir=tmp_path, seed=1, show_progress=False)
    again = nv.tune(model, objective, n_trials=5, out_dir=tmp_path, seed=2, show_progress=False)
    assert len(first.trials) == 3 and len(again.trials) == 5
    assert [t["number"] for t in again.trials][:3] == [0, 1, 2]


def test_per_site_and_per_layer_groups():
    model = nv.convert(build("bart"))
    space = nv.KnobSpace(sites=("encoder", "decoder", "cross"), per_layer=True, mu_tau=(0.5, 1.0))
    names = [g for g, *_ in space.groups(model)]
    assert names == ["encoder.0", "encoder.1", "decoder.0", "decoder.1", "cross"]
    kw, _ = inputs("bart", "right")

    @torch.no_grad()
    def objective(m):
        return float(m(**kw).logits.std())

    res = nv.tune(model, objective, space=space, n_trials=3, seed=0, show_progress=False)
    assert len(res.best_params) == 5 * 3
    layer1 = nv.get_knobs(model)["decoder.1"]
    assert layer1.alpha_tau == res.best_params["decoder.1/alpha_tau"] and layer1.mu_tau == res.best_params["decoder.1/mu_tau"]


def test_bad_arguments():
    with pytest.raises(ValueError, match="stdev_tau"):
        nv.KnobSpace(stdev_tau=(-0.1, 0.5))
    with pytest.raises(ValueError, match="unknown site"):
        nv.KnobSpace(sites=("attention",))
    with pytest.raises(ValueError, match="convert it first"):
        nv.tune(build("bert"), lambda m: 0.0, n_trials=1)
    with pytest.raises(ValueError, match="direction"):
        nv.tune(nv.convert(build("bert")), lambda m: 0.0, n_trials=1, direction="up")
    with pytest.raises(ValueError, match="`n_trials` must be an int >= 1, got 2.5"):
        nv.tune(nv.convert(build("bert")), lambda m: 0.0, n_trials=2.5)
    with pytest.raises(ValueError, match="`sampler` must be 'tpe' or 'random', got 'grid'"):
        nv.tune(nv.convert(build("bert")), lambda m: 0.0, n_trials=1, sampler="grid")


def test_layer_restricted_spaces_tune_only_those_layers():
    model = nv.convert(build("bart"), alpha_tau=1e4)
    assert [g for g, *_ in nv.KnobSpace(layers=(1,)).groups(model)] == ["encoder.1", "decoder.1"]
    assert [g for g, *_ in nv.KnobSpace(sites=("decoder",), layers=(0, 1)).groups(model)] == ["decoder.0+1"]
    assert [g for g, *_ in nv.KnobSpace(sites=("encoder",), layers=(0, 1), per_layer=True).groups(model)] == ["encoder.0", "encoder.1"]
    with pytest.raises(ValueError, match="no layer"):
        nv.KnobSpace(layers=(7,)).groups(model)
    with pytest.raises(ValueError, match="layer indices"):
        nv.KnobSpace(layers=())
    kw, _ = inputs("bart", "right")

    @torch.no_grad()
    def objective(m):
        return float(m(**kw).logits.std())

    space = nv.KnobSpace(sites=("encoder",), layers=(1,), alpha_tau=(-3.0, 3.0))
    res = nv.tune(model, objective, space=space, n_trials=3, seed=0, show_progress=False)
    assert set(res.best_params) == {"encoder.1/alpha_tau", "encoder.1/stdev_tau"}
    for group, k in nv.get_knobs(model).items():
        want = res.best_params["encoder.1/alpha_tau"] if group == "encoder.1" else 1e4
        assert k.alpha_tau == want


def test_log_scale_alpha_space():
    with pytest.raises(ValueError, match="log-scale"):
        nv.KnobSpace(alpha_tau=(-1.0, 10.0), log_alpha=True)
    model = nv.convert(build("gpt2"), alpha_tau=1e4)
    kw, _ = inputs("gpt2", "right")

    @torch.no_grad()
    def objective(m):
        return float(m(**kw).logits.std())

    space = nv.KnobSpace(alpha_tau=(0.1, 1000.0), stdev_tau=(0.0, 0.0), log_alpha=True)
    res = nv.tune(model, objective, space=space, n_trials=12, seed=0, show_progress=False)
    alphas = sorted(t["all/alpha_tau"] for t in res.trials)
    assert alphas[-1] == 1000.0  # the identity corner
    assert sum(a < 10.0 for a in alphas) >= 3  # a log scale puts about a third of the samples below 10

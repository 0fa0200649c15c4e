"""Resuming a study: its recorded search space, no replayed draws, honest trial states, and the
model left at the knobs that the result reports."""

import json

import optuna
import pytest
import torch
from hf_models import build, inputs
from tune_worker import objective_for

import nvformer as nv


def counting(objective):
    """``objective`` that also records every knob setting it evaluates (``calls``)."""
    calls = []

    def run(m):
        calls.append({k: (v.alpha_tau, v.stdev_tau) for k, v in nv.get_knobs(m).items()})
        return objective(m)

    run.calls = calls
    return run


def complete_points(res) -> list[tuple]:
    return [tuple(sorted((k, v) for k, v in t.items() if "/" in k)) for t in res.trials if t["state"] == "COMPLETE"]


@pytest.mark.parametrize("other", [
    nv.KnobSpace(sites=("encoder",)),  # other sites
    nv.KnobSpace(alpha_tau=(-5.0, 10.0)),  # another range
    nv.KnobSpace(per_layer=True),  # per layer
    nv.KnobSpace(mu_tau=(0.5, 1.0)),  # another knob
])
def test_another_space_on_a_study_is_an_error_unless_a_new_study_is_named(tmp_path, other):
    model = nv.convert(build("bert"))
    objective = counting(objective_for(model))
    first = nv.tune(model, objective, n_trials=3, out_dir=tmp_path, show_progress=False)
    knobs = nv.get_knobs(model)
    with pytest.raises(ValueError, match=r"tune: `space` is KnobSpace\(.*but study 'nvformer' in sqlite:.*searched KnobSpace\(.*new `study_name`"):
        nv.tune(model, objective, space=other, n_trials=5, out_dir=tmp_path, show_progress=False)
    assert len(objective.calls) == 3 and nv.get_knobs(model) == knobs  # nothing ran, nothing changed
    again = nv.tune(model, objective, space=other, n_trials=3, out_dir=tmp_path, study_name="other", show_progress=False)
    assert again.study_name == "other" and again.n_complete == 3 and set(again.best_params) == set(other.ranges(model))
    assert first.space != again.space
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["study_name"] == "other" and best["space"] == again.space
    # the first study is untouched and still resumable with its own space
    resumed = nv.tune(model, objective, n_trials=4, out_dir=tmp_path, show_progress=False)
    assert resumed.n_complete == 4 and resumed.trials[:3] == first.trials


def test_another_direction_on_a_study_is_an_error(tmp_path):
    model = nv.convert(build("bert"))
    nv.tune(model, objective_for(model), n_trials=2, out_dir=tmp_path, show_progress=False)
    with pytest.raises(ValueError, match="`direction` is 'minimize' but study 'nvformer' in .* maximizes"):
        nv.tune(model, objective_for(model), n_trials=2, out_dir=tmp_path, direction="minimize", show_progress=False)


def test_the_model_is_left_at_the_knobs_the_report_describes(tmp_path):
    model = nv.convert(build("bart"), alpha_tau=1e4)
    nv.set_knobs(model, alpha_tau=50.0, site="decoder")  # outside the space: must stay
    kw, _ = inputs("bart", "right")

    @torch.no_grad()
    def objective(m):
        return -float((m(**kw).logits.std() - 0.5).abs())

    def report(m):
        return {"knobs": nv.get_knobs(m), "objective": objective(m)}

    space = nv.KnobSpace(sites=("encoder", "cross"), alpha_tau=(-5.0, 10.0))
    nv.tune(model, objective, space=space, n_trials=4, out_dir=tmp_path, seed=3, show_progress=False)
    res = nv.tune(model, objective, space=space, n_trials=9, out_dir=tmp_path, seed=3, report=report, show_progress=False)
    assert res.best_number != res.trials[-1]["number"]  # the last trial evaluated is not the best one
    knobs = nv.get_knobs(model)
    assert knobs == res.best_report["knobs"] and res.best_report["objective"] == res.best_value
    for group, k in knobs.items():
        site = group.split(".")[0]
        want = (res.best_params[f"{site}/alpha_tau"], res.best_params[f"{site}/stdev_tau"]) if site != "decoder" else (50.0, 0.0)
        assert (k.alpha_tau, k.stdev_tau) == want


def test_a_site_the_model_lacks_is_an_error_before_the_first_trial(tmp_path):
    model = nv.convert(build("bert"))
    objective = counting(objective_for(model))
    for space in (nv.KnobSpace(sites=("decoder",)), nv.KnobSpace(sites=("encoder", "cross"))):
        with pytest.raises(ValueError, match="tune: `space` names site.* where BertForSequenceClassification has no NV module "
                                             r"\(its sites: encoder\)"):
            nv.tune(model, objective, space=space, n_trials=3, out_dir=tmp_path, show_progress=False)
    assert objective.calls == [] and not (tmp_path / "study.db").exists()


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_a_resumed_study_does_not_replay_its_draws(tmp_path, sampler):
    model = nv.convert(build("bert"))
    objective = objective_for(model)
    for n in (4, 7, 10):  # the same seed each time
        res = nv.tune(model, objective, n_trials=n, out_dir=tmp_path, seed=0, sampler=sampler, show_progress=False)
    assert res.states == {"COMPLETE": 10} and len(set(complete_points(res))) == 10  # no trial spent on a repeat
    # a new study with that seed draws as before (reproducible)
    fresh = nv.tune(model, objective, n_trials=4, out_dir=tmp_path, study_name="fresh", seed=0, sampler=sampler, show_progress=False)
    assert complete_points(fresh) == complete_points(res)[:4]


def test_a_queued_repeat_of_an_evaluated_point_is_not_evaluated(tmp_path):
    model = nv.convert(build("bert"))
    objective = counting(objective_for(model))
    first = nv.tune(model, objective, n_trials=3, out_dir=tmp_path, sampler="random", show_progress=False)
    study = optuna.load_study(study_name="nvformer", storage=f"sqlite:///{tmp_path / 'study.db'}")
    study.enqueue_trial({k: v for k, v in first.trials[2].items() if "/" in k})  # e.g. a worker replaying draws
    res = nv.tune(model, objective, n_trials=5, out_dir=tmp_path, sampler="random", show_progress=False)
    assert res.trials[3]["state"] == "FAIL" and res.trials[3]["note"] == "not evaluated: the point of trial 2"
    assert len(objective.calls) == 5 and res.n_complete == 5 and len(set(complete_points(res))) == 5


def test_objective_errors_interrupts_and_non_finite_values(tmp_path):
    model = nv.convert(build("bert"), alpha_tau=7.0)
    base = objective_for(model)
    knobs = nv.get_knobs(model)
    calls = []

    def objective(m):
        calls.append(len(calls))
        if len(calls) == 2:
            raise RuntimeError("out of\nmemory")
        if len(calls) == 4:
            raise KeyboardInterrupt
        return float("nan") if len(calls) == 6 else base(m)

    with pytest.raises(RuntimeError, match="out of"):
        nv.tune(model, objective, n_trials=5, out_dir=tmp_path, show_progress=False)
    assert nv.get_knobs(model) == knobs  # back at the knobs it had
    with pytest.raises(KeyboardInterrupt):
        nv.tune(model, objective, n_trials=5, out_dir=tmp_path, show_progress=False)
    assert nv.get_knobs(model) == knobs
    res = nv.tune(model, objective, n_trials=5, out_dir=tmp_path, show_progress=False)
    states = [(t["state"], t["note"], t["retry_of"]) for t in res.trials]
    assert states[:5] == [("COMPLETE", "", None), ("FAIL", "objective raised RuntimeError: out of memory", None),
                          ("COMPLETE", "", None), ("FAIL", "died: interrupted (KeyboardInterrupt)", None),
                          ("COMPLETE", "", 3)]  # the interrupted point is re-run, the failing one is not
    assert states[5] == ("PRUNED", "objective returned nan", None)
    assert res.trials[4]["all/alpha_tau"] == res.trials[3]["all/alpha_tau"]
    # n_trials counts evaluated trials (COMPLETE and PRUNED): 4 COMPLETE + 1 PRUNED
    assert res.states == {"COMPLETE": 4, "FAIL": 2, "PRUNED": 1} and res.n_complete == 4
    assert json.loads((tmp_path / "best.json").read_text())["n_trials"] == 4


def test_a_study_made_before_spaces_were_recorded_is_checked_by_its_trials(tmp_path):
    model = nv.convert(build("bert"))
    storage = f"sqlite:///{tmp_path / 'old.db'}"
    for name, group in (("old-all", "all"), ("old-encoder", "encoder")):
        study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
        dists = {f"{group}/alpha_tau": optuna.distributions.FloatDistribution(-15.0, 10.0),
                 f"{group}/stdev_tau": optuna.distributions.FloatDistribution(0.0, 0.5)}
        study.add_trial(optuna.trial.create_trial(params={f"{group}/alpha_tau": 1.0, f"{group}/stdev_tau": 0.2}, distributions=dists,
                                                  value=-1.0))
    res = nv.tune(model, objective_for(model), n_trials=3, storage=storage, study_name="old-all", show_progress=False)
    assert res.n_complete == 3 and res.trials[0]["all/alpha_tau"] == 1.0 and res.identity_value is not None
    assert optuna.load_study(study_name="old-all", storage=storage).user_attrs["nvformer:space"]["space"] == res.space
    with pytest.raises(ValueError, match="searched the trial parameters encoder/alpha_tau, encoder/stdev_tau; pass the same"):
        nv.tune(model, objective_for(model), n_trials=3, storage=storage, study_name="old-encoder", show_progress=False)


def test_an_objective_that_is_never_finite_is_an_error_and_leaves_the_knobs():
    model = nv.convert(build("bert"), alpha_tau=7.0)
    knobs = nv.get_knobs(model)
    calls = []
    with pytest.raises(ValueError, match="tune: study 'nvformer' in in-memory has no COMPLETE trial"):
        nv.tune(model, lambda m: calls.append(1) or float("inf"), n_trials=3, show_progress=False)
    assert len(calls) == 3 and nv.get_knobs(model) == knobs  # 3 PRUNED trials count: the search ends

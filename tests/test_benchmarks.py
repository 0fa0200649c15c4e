"""The performance command (benchmarks/performance.py): its workloads run and compute what their
baselines compute at the identity, the goal rows carry their ratio and verdict, peak memory comes from
a fresh process, and bad options are one-line errors. Speed itself is never asserted here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def perf():
    spec = importlib.util.spec_from_file_location("performance_benchmark", ROOT / "benchmarks" / "performance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_evaluation_workload_is_the_baseline_at_identity(perf):
    """The NV layer of mha-eval is identity-initialised: its output equals nn.MultiheadAttention's (the
    prior's weight ~e^-20 at alpha_tau 10 with s_alpha 2)."""
    f = perf.attention_pair("mha-eval", 2, 16, 32, 4, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(f["nv"](), f["baseline"](), rtol=1e-4, atol=1e-5)


def test_goal_rows_have_ratio_goal_and_verdict(perf):
    rows = perf.goal_rows(torch.device("cpu"), torch.float32, repeats=1, quick=True, models=False)
    assert [r["workload"] for r in rows] == [w for w in perf.WORKLOADS if w.startswith(("mha", "dirichlet"))]
    for r in rows:
        assert r["baseline_ms"] > 0 and r["nv_ms"] > 0 and r["sdpa_ms"] > 0
        assert r["ratio"] == pytest.approx(r["nv_ms"] / r["baseline_ms"])
        op, goal = perf.GOALS[r["workload"]]
        assert r["goal"] == f"{op} {goal:g}x" and r["met"] == (r["ratio"] <= goal)
        assert r["ratio_q1"] == r["ratio"] == r["ratio_q3"] and r["rounds"] == 1 and r["rounds_met"] == int(r["met"])


def test_the_ratio_is_the_median_of_the_rounds_own_ratios(perf):
    """Three rounds whose own ratios are 1.03, 1.03 and 1.2 (the machine slower in the second for both forms):
    the row's ratio is their median 1.03, quartiles 1.03-1.115, two rounds meet <= 1.05; the ratio of the
    medians (1.8 s / 1.5 s) would be 1.2."""
    r = perf.goal_row("minilm-away", {"baseline": [1.0, 2.0, 1.5], "nv": [1.03, 2.06, 1.8]})
    assert r["ratio"] == pytest.approx(1.03) and r["ratio_q1"] == pytest.approx(1.03) and r["ratio_q3"] == pytest.approx(1.115)
    assert r["baseline_ms"] == pytest.approx(1500.0) and r["nv_ms"] == pytest.approx(1800.0)
    assert r["rounds"] == 3 and r["rounds_met"] == 2 and r["met"]
    g = perf.goal_row("smollm2-generate", {"baseline": [1.0, 1.0, 1.0], "nv": [1.0, 1.25, 1.0]})  # tokens/s ratios 1, 0.8, 1
    assert g["ratio"] == pytest.approx(1.0) and g["rounds_met"] == 2 and g["met"]


def test_generation_rows_compare_tokens_per_second_compiled_or_not(perf):
    """Both generation rows (plain and compiled) report NV tokens/s over the original's against their
    ">= 0.9x" goal: 10% slower generation is 0.909x, met; 20% slower is 0.833x, not met."""
    for w in ("smollm2-generate", "smollm2-generate-compiled"):
        r = perf.goal_row(w, {"baseline": 1.0, "nv": 1.1}, identical=True, new_tokens=48)
        assert r["measure"] == "tokens/s (NV / original)" and r["ratio"] == pytest.approx(1 / 1.1) and r["met"] and r["new_tokens"] == 48
        assert not perf.goal_row(w, {"baseline": 1.0, "nv": 1.2})["met"]
    r = perf.goal_row("minilm-away", {"baseline": 1.0, "nv": 1.1})
    assert r["measure"] == "time (NV / baseline)" and r["ratio"] == pytest.approx(1.1) and not r["met"] and r["new_tokens"] is None


def test_training_workloads_reach_every_parameter(perf):
    """A training step gives every trainable parameter of both modules a gradient; with the NVIB frozen,
    its parameters get none and the rest still do."""
    for kind in ("mha-train", "mha-train-frozen-nvib", "dirichlet-train"):
        f = perf.attention_pair(kind, 1, 8, 16, 2, torch.device("cpu"), torch.float32)
        assert torch.isfinite(f["nv"]()) and torch.isfinite(f["baseline"]())
        for module in f["modules"]:
            for name, p in module.named_parameters():
                frozen = kind.endswith("frozen-nvib") and name.startswith("nvib.")
                assert p.requires_grad != frozen, (kind, name)
                assert (p.grad is None) == frozen, (kind, name)


def test_peak_memory_is_measured_in_a_fresh_process(perf):
    small = perf.memory("mha-eval", 64, 32, 4, "cpu", "float32")
    large = perf.memory("nv-train", 1024, 256, 4, "cpu", "float32")
    assert small >= 0 and large > small


@pytest.mark.parametrize("argv, needle", [(["--device", "nosuchdevice"], "--device nosuchdevice"),
                                          (["--lengths", "128,abc"], "--lengths"), (["--repeats", "0"], "--repeats")])
def test_bad_options_are_one_line_errors(perf, argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        perf.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_interleaved_rounds_alternate_their_order():
    from nvformer_studies.common.bench import interleaved_runs

    calls = []
    runs = interleaved_runs({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then rounds in order, reversed, in order
    assert [len(v) for v in runs.values()] == [3, 3] and all(t >= 0 for v in runs.values() for t in v)

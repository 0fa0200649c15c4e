"""Workers that die and workers that race: real processes on one SQLite study.

A worker killed with SIGKILL inside a trial (during the identity trial, then mid-study) leaves a
RUNNING trial; the resumed study fails it, re-runs its point, evaluates the identity and ends with
exactly ``n_trials`` COMPLETE trials at distinct points. Three workers started together on a fresh
SQLite file, five times, never crash and stop at exactly ``n_trials``."""

import csv
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from nvformer.tuning import shared

TESTS = Path(__file__).resolve().parents[1]
IDENTITY = {"all/alpha_tau": 10.0, "all/stdev_tau": 0.0}


def worker(storage: str, n_trials: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(TESTS / "tune_worker.py"), "--storage", storage, "--trials", str(n_trials),
                             "--seed", "0", "--sampler", "tpe", *extra], env=env, stderr=subprocess.PIPE, text=True)


def kill_when_blocked(proc: subprocess.Popen, flag: Path) -> None:
    """Wait until the worker blocks inside its objective (it writes ``flag``), then SIGKILL it."""
    deadline = time.monotonic() + 180
    while not flag.exists():
        assert proc.poll() is None, f"the worker ended before blocking: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "the worker never reached the blocking trial"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    proc.stderr.close()


def points(trials) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in trials]


def test_killed_during_the_identity_and_mid_study_resumes_to_exactly_n_trials(tmp_path):
    storage, n = f"sqlite:///{tmp_path / 'kill.db'}", 6
    for block_at in (1, 3):  # the 1st objective call is the identity trial; the 3rd is mid-study
        flag = tmp_path / f"blocked-{block_at}"
        kill_when_blocked(worker(storage, n, "--block-at", str(block_at), "--flag", str(flag)), flag)
        running = optuna.load_study(study_name="shared", storage=storage).get_trials(states=(optuna.trial.TrialState.RUNNING,))
        assert len(running) == 1  # the killed trial, stuck as Optuna leaves it
    proc = worker(storage, n, "--out", str(tmp_path / "out"))
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    proc.stderr.close()

    trials = optuna.load_study(study_name="shared", storage=storage).trials
    states = {t.number: t.state.name for t in trials}
    # run 1: trial 0 (identity) killed; run 2: 0 failed, identity again (1), 2, then 3 killed; run 3: 3 failed, its point again (4), 5-7
    assert states == {0: "FAIL", 1: "COMPLETE", 2: "COMPLETE", 3: "FAIL", 4: "COMPLETE", 5: "COMPLETE", 6: "COMPLETE", 7: "COMPLETE"}
    assert trials[0].params == IDENTITY and trials[1].params == IDENTITY
    assert trials[4].params == trials[3].params and trials[4].user_attrs["retry_of"] == 3
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == n and len(set(points(done))) == n  # no point evaluated twice (no replayed draws either)
    assert all("is gone" in trials[i].system_attrs[shared.DIED] for i in (0, 3))

    with open(tmp_path / "out" / "trials.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["state"] for r in rows] == [states[i] for i in range(8)]
    assert rows[0]["note"].startswith("died: its worker (pid") and rows[4]["retry_of"] == "3"
    best = json.loads((tmp_path / "out" / "best.json").read_text())
    assert best["n_trials"] == n and best["states"] == {"FAIL": 2, "COMPLETE": n}
    assert best["identity_value"] == trials[1].value


def test_three_workers_start_together_on_fresh_sqlite_files(tmp_path):
    ctx = mp.get_context("spawn")
    n, rounds, seeds = 6, 5, (1, 2, 3)
    storages = [f"sqlite:///{tmp_path / f'race-{i}.db'}" for i in range(rounds)]
    barrier, results = ctx.Barrier(len(seeds)), ctx.Queue()
    from tune_worker import race

    procs = [ctx.Process(target=race, args=(storages, seed, n, barrier, results)) for seed in seeds]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in range(rounds * len(seeds))]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    # every worker waits for the others' trials, so each reports the finished study
    assert sorted(got) == sorted((s, seed, n) for s in storages for seed in seeds)
    for storage in storages:
        trials = optuna.load_study(study_name="shared", storage=storage).trials
        assert [t.state.name for t in trials] == ["COMPLETE"] * n
        assert points(trials).count(tuple(sorted(IDENTITY.items()))) == 1 and len(set(points(trials))) == n


def test_a_dead_worker_is_recognised_by_pid_and_process_start():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    me = shared.this_owner("no-such-call")
    assert shared.owner_alive({**me, "pid": proc.pid}) is False  # gone
    assert shared.owner_alive({**me, "pid": os.getppid(), "start": -1}) is False  # the PID names another (younger) process
    assert shared.owner_alive({**me, "pid": os.getppid(), "start": None}) is True
    assert shared.owner_alive(me) is False  # this process, but no tune() call of it runs that trial
    assert shared.owner_alive({**me, "machine": "elsewhere"}) is None and shared.owner_alive(None) is None


def test_other_machines_trials_fail_by_heartbeat_and_ownerless_ones_by_age(tmp_path, monkeypatch):
    from tune_worker import run

    storage = f"sqlite:///{tmp_path / 'remote.db'}"
    run(storage, 0, 2)
    monkeypatch.setattr(shared, "HEARTBEAT_SECONDS", 1)
    monkeypatch.setattr(shared, "GRACE_SECONDS", 1)
    study = optuna.load_study(study_name="shared", storage=storage)
    remote = study.ask()  # RUNNING "on another machine"
    study.ask()  # RUNNING, its worker died before recording itself
    rdb = optuna.storages.RDBStorage(storage)
    rdb.set_trial_system_attr(remote._trial_id, shared.OWNER, {**shared.this_owner("x"), "machine": "elsewhere", "host": "far"})
    rdb.record_heartbeat(remote._trial_id)
    time.sleep(2.5)  # older than the 1 s grace period (SQLite's clock has whole seconds)
    res = run(storage, 0, 3)
    assert [t["state"] for t in res.trials] == ["COMPLETE", "COMPLETE", "FAIL", "FAIL", "COMPLETE"]
    assert res.trials[2]["note"] == "died: its worker's heartbeat stopped"
    assert res.trials[3]["note"].startswith("died: no worker recorded itself")
    # neither had parameters: nothing to re-run, the study just samples one more point
    assert res.n_complete == 3 and res.trials[4]["retry_of"] is None


@pytest.mark.parametrize("url", ["sqlite:///rel/study.db", "postgresql://u@h/db", "mysql://u@h/db", "sqlite://"])
def test_study_lock_kinds(url):
    lock = shared.StudyLock(url)
    assert lock.kind == {"sqlite:///rel/study.db": "file", "postgresql://u@h/db": "postgresql", "mysql://u@h/db": "mysql"}.get(url, "process")
    if lock.kind == "file":
        assert lock.path == Path("rel/study.db.nvformer-lock")

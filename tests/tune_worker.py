"""A tuning worker for the shared-storage and kill/resume tests (importable by spawned processes,
and a script: ``python tests/tune_worker.py --storage URL --trials N [--block-at K --flag FILE]``)."""

import argparse
import os
import threading
from pathlib import Path

import torch
from hf_models import build, inputs

import nvformer as nv


def objective_for(model):
    """``-mean |logits - target|`` on a tiny BERT batch, ``target`` the logits at alpha_tau 2, stdev_tau 0.1."""
    kw, _ = inputs("bert", "right")
    nv.set_knobs(model, alpha_tau=2.0, stdev_tau=0.1)
    with torch.no_grad():
        target = model(**kw).logits
    nv.set_knobs(model, alpha_tau=10.0, stdev_tau=0.0)

    @torch.no_grad()
    def objective(m):
        return -float((m(**kw).logits - target).abs().mean())

    return objective


def blocking(objective, block_at: int, flag: Path):
    """``objective``, except that its ``block_at``-th call writes ``flag`` and blocks until the
    process is killed (it gives up with an error after 120 s)."""
    calls = 0

    def run(m):
        nonlocal calls
        calls += 1
        if calls == block_at:
            tmp = flag.with_name(flag.name + ".tmp")
            tmp.write_text(str(os.getpid()))
            tmp.replace(flag)
            threading.Event().wait(120)
            raise TimeoutError(f"tune_worker: not killed within 120 s of blocking in call {calls}")
        return objective(m)

    return run


def run(storage: str, seed: int, n_trials: int, sampler: str = "random", out_dir=None, block_at: int = 0, flag=None):
    """One worker: tune a tiny converted BERT in ``storage`` (study "shared"); returns the :class:`TuneResult`."""
    torch.set_num_threads(1)
    model = nv.convert(build("bert"))
    objective = objective_for(model)
    if block_at:
        objective = blocking(objective, block_at, Path(flag))
    return nv.tune(model, objective, n_trials=n_trials, storage=storage, study_name="shared", seed=seed, sampler=sampler,
                   out_dir=out_dir, show_progress=False)


def race(storages: list, seed: int, n_trials: int, barrier, results) -> None:
    """For each storage in turn: wait for the other workers at ``barrier``, then :func:`run` on it;
    puts ``(storage, seed, n_complete)`` on the queue ``results``."""
    for storage in storages:
        barrier.wait(timeout=300)
        results.put((storage, seed, run(storage, seed, n_trials).n_complete))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--storage", required=True)
    p.add_argument("--trials", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", default="random")
    p.add_argument("--out", default=None)
    p.add_argument("--block-at", type=int, default=0)
    p.add_argument("--flag", default=None)
    a = p.parse_args()
    run(a.storage, a.seed, a.trials, a.sampler, a.out, a.block_at, a.flag)

"""A tuning worker for the shared-storage test (importable by spawned processes)."""

import torch
from hf_models import build, inputs

import nvformer as nv


def objective_for(model):
    kw, _ = inputs("bert", "right")
    nv.set_knobs(model, alpha_tau=2.0, stdev_tau=0.1)
    with torch.no_grad():
        target = model(**kw).logits
    nv.set_knobs(model, alpha_tau=10.0, stdev_tau=0.0)

    @torch.no_grad()
    def objective(m):
        return -float((m(**kw).logits - target).abs().mean())

    return objective


def run(storage: str, seed: int, n_trials: int) -> int:
    torch.set_num_threads(1)
    model = nv.convert(build("bert"))
    res = nv.tune(model, objective_for(model), n_trials=n_trials, storage=storage, study_name="shared", seed=seed,
                  sampler="random", show_progress=False)
    return len(res.trials)

"""One process vs two gloo processes (torchrun + Accelerate) training the same NVAE (docs/RESULTS.md
section "nvae-distributed"; text: :func:`nvformer_studies.nvae.report.distributed_section`).

Each run is ``nvformer-studies nvae train`` with the NVAE defaults on the WikiText-2 training
sentences (split seed 0), ``epochs`` epochs, global batch 64; the 2-process run splits every
batch in two (``split_batches``) and averages the gradients, so both runs take the same optimiser
steps on the same batches; they differ by the latent samples and dropout masks each process
draws, hence "equal in expectation". Compared: the logged training losses and the validation
reconstruction loss / token accuracy of the final models (500 validation sentences).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import training as vae

__all__ = ["run_distributed", "run_one"]


def run_one(out: Path, procs: int, seed: int, epochs: int, cwd: Path) -> float:
    """Train one NVAE into ``out`` on ``procs`` processes (1: a plain process; more: ``torchrun``,
    CPU, gloo), working directory ``cwd``; returns the wall time in seconds."""
    args = ["nvae", "train", "--out", str(out), "--epochs", str(epochs), "--seed", str(seed), "--log-every", "10", "--no-progress", "--cpu"]
    if procs == 1:
        cmd = [sys.executable, "-m", "nvformer_studies.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(29600 + seed), "-m",
               "nvformer_studies.cli", *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, 2 // procs)))
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, cwd=cwd)
    return time.time() - t0


def run_distributed(out: Path, seeds: list[int], epochs: int, cwd: Path) -> dict:
    """Every seed on 1 and on 2 processes (folders ``out/p{procs}-s{seed}``), each final model
    evaluated on the validation sentences; writes and returns ``out/results.json``."""
    valid = vae.wikitext_sentences(seed=0)["valid"]
    res = {"epochs": epochs, "runs": []}
    for seed in seeds:
        for procs in (1, 2):
            folder = out / f"p{procs}-s{seed}"
            seconds = run_one(folder, procs, seed, epochs, cwd)
            model, tok, meta = vae.load_model(folder)
            ev = vae.evaluate(model, tok, valid)
            log = [{k: float(v) for k, v in r.items()} for r in csv.DictReader((folder / vae.LOG_FILE).open())]
            res["runs"].append({"procs": procs, "seed": seed, "seconds": seconds, "steps": meta["train"]["steps"],
                                "valid_recon_per_token": ev["recon_per_token"], "valid_token_accuracy": ev["token_accuracy"],
                                "valid_bleu": ev["bleu"], "log": log})
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=2))
    return res

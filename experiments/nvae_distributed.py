"""One process vs two gloo processes (torchrun + Accelerate) training the same NVAE.

    .venv/bin/python experiments/nvae_distributed.py            # 2 seeds x {1, 2} processes, writes the "nvae-distributed" section
    .venv/bin/python experiments/nvae_distributed.py --reuse    # rewrite the section from runs/nvae-distributed/*

Each run: ``nvformer nvae train`` with the NVAE defaults on the WikiText-2 training sentences
(split seed 0), four epochs (``--epochs 4``), global batch 64; the 2-process run splits every
batch in two (``split_batches``) and averages the gradients, so both runs take the same optimiser
steps on the same batches; they differ by the latent samples and dropout masks each process
draws, hence "equal in expectation". Compared: the logged training losses and the validation
reconstruction loss / token accuracy of the final models (500 validation sentences).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "experiments"))

from identity import write_section  # noqa: E402
from nvformer import vae  # noqa: E402
from nvformer.plots import line_panels  # noqa: E402


def run_one(out: Path, procs: int, seed: int, epochs: int) -> float:
    args = ["nvae", "train", "--out", str(out), "--epochs", str(epochs), "--seed", str(seed), "--log-every", "10", "--no-progress", "--cpu"]
    if procs == 1:
        cmd = [sys.executable, "-m", "nvformer_studies.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(29600 + seed), "-m",
               "nvformer_studies.cli", *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, 2 // procs)), PYTHONPATH=str(ROOT / "src"))
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return time.time() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "nvae-distributed"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--results", default=str(ROOT / "docs" / "RESULTS.md"))
    parser.add_argument("--reuse", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.out)
    res_file = out / "results.json"
    if args.reuse:
        res = json.loads(res_file.read_text())
    else:
        valid = vae.wikitext_sentences(seed=0)["valid"]
        res = {"epochs": args.epochs, "runs": []}
        for seed in args.seeds:
            for procs in (1, 2):
                folder = out / f"p{procs}-s{seed}"
                seconds = run_one(folder, procs, seed, args.epochs)
                model, tok, meta = vae.load_model(folder)
                ev = vae.evaluate(model, tok, valid)
                log = [{k: float(v) for k, v in r.items()} for r in csv.DictReader((folder / vae.LOG_FILE).open())]
                res["runs"].append({"procs": procs, "seed": seed, "seconds": seconds, "steps": meta["train"]["steps"],
                                    "valid_recon_per_token": ev["recon_per_token"], "valid_token_accuracy": ev["token_accuracy"],
                                    "valid_bleu": ev["bleu"], "log": log})
        out.mkdir(parents=True, exist_ok=True)
        res_file.write_text(json.dumps(res, indent=2))
    text = section(res)
    print(text)
    write_section(text, "nvae-distributed", Path(args.results))


def section(res: dict) -> str:
    lines = ["## NVAE training on one vs two processes (Accelerate, gloo)", "",
             f"Command: `.venv/bin/python experiments/nvae_distributed.py` ({res['epochs']} epoch{'s' if res['epochs'] > 1 else ''} of the NVAE defaults on the WikiText-2 "
             "training sentences, split seed 0, global batch 64; 2 processes = `torchrun --nproc_per_node 2`, each half of every batch). "
             "Validation: the 500 validation sentences, evaluation form. Same-seed runs share data order and initialisation; they differ "
             "by the per-process latent samples and dropout masks.", "",
             "| seed | processes | steps | wall time | last logged train loss | valid nats/token | valid token acc | valid BLEU |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["runs"]:
        lines.append(f"| {r['seed']} | {r['procs']} | {r['steps']} | {r['seconds'] / 60:.1f} min | {r['log'][-1]['loss']:.3f} | "
                     f"{r['valid_recon_per_token']:.3f} | {100 * r['valid_token_accuracy']:.1f}% | {r['valid_bleu']:.1f} |")
    by = {(r["seed"], r["procs"]): r for r in res["runs"]}
    diffs = [by[(s, 2)]["valid_recon_per_token"] - by[(s, 1)]["valid_recon_per_token"] for s in sorted({r["seed"] for r in res["runs"]})
             if (s, 1) in by and (s, 2) in by]
    seeds = [by[(s, 1)]["valid_recon_per_token"] for s in sorted({r["seed"] for r in res["runs"]}) if (s, 1) in by]
    if diffs:
        lines += ["", f"Validation nats/token, 2 processes minus 1 process, per seed: {', '.join(f'{d:+.3f}' for d in diffs)}; "
                      f"spread between seeds on 1 process: {max(seeds) - min(seeds):.3f}. "
                      + ("The 2-process runs match the 1-process ones within the seed spread (equal in expectation, as intended)."
                         if max(abs(d) for d in diffs) < max(seeds) - min(seeds) else
                         "The 2-process runs differ from the 1-process ones by more than the seed spread: not equal in expectation here.")]
    panels = {f"seed {s}": {f"{p} process{'es' if p > 1 else ''}": ([row["step"] for row in by[(s, p)]["log"]], [row["loss"] for row in by[(s, p)]["log"]])
                            for p in (1, 2) if (s, p) in by} for s in sorted({r["seed"] for r in res["runs"]})}
    name = line_panels(panels, ROOT / "docs" / "figures" / "nvae_distributed.png", xlabel="step", ylabel="training loss (logged mean)").name
    lines += ["", f"![one vs two processes](figures/{name})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

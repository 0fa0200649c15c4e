"""Latency and peak memory of NV attention against scaled_dot_product_attention (SDPA).

    .venv/bin/python benchmarks/attention.py            # full grid, writes docs/PERFORMANCE.md (~15 min)
    .venv/bin/python benchmarks/attention.py --quick    # N=512, P=768 only, prints the table

B=8, float32, CPU (all cores torch uses). For every (P, H, N) it measures, in the same run and
interleaved round by round (this machine is noisy), the median latency of:

* ``sdpa``: ``F.scaled_dot_product_attention(q, k, v)`` with q, k, v ``[B, H, N, d]`` given;
* ``sdpa+kv``: the same plus the key/value projections ``k = x W_k, v = x W_v`` (what a
  standard attention layer computes between its input and SDPA);
* ``eval-paper`` / ``eval-exact``: NV evaluation form at identity-initialised knobs (empirical-like
  prior, ``mu_tau=1, stdev_tau=0, alpha_tau=10``), fast path: the NVIB layer on ``x``, keys and
  values from the latent, one SDPA call, the prior's value interpolation;
* ``eval-naive``: the same evaluation form computed like the authors' code, mapping every query
  into the model width per head (nvformer's reference path, ``impl="reference"``);
* ``train-fwd`` / ``train-fwdbwd``: NV training form (NVIB with Gaussian and Dirichlet sampling,
  ``stdev_tau=0.5``), fast path, plus both KL terms; ``fwdbwd`` includes the backward pass.
  Their baselines are ``sdpa`` / ``sdpa`` forward+backward (``sdpa-fwdbwd``) with q, k, v
  requiring gradients.

Peak memory is measured in a fresh subprocess per (method, config) as the growth of the process'
peak resident set size (VmHWM) during one call, after the inputs are allocated (large CPU tensors
are mmap-ed, so their pages are counted when touched and returned when freed).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import nvformer as nv
from nvformer_studies.common.bench import interleaved, peak_rss_bytes
from nvformer_studies.common.docs import markdown_table, read_csv, write_csv, write_section
from nvformer_studies.common.scripts import script_parser

ROOT = Path(__file__).resolve().parents[1]

B = 8
GRID = [(384, 12), (768, 12), (1024, 16)]
LENGTHS = [128, 512, 1024]
METHODS = ["sdpa", "sdpa+kv", "eval-paper", "eval-exact", "eval-naive", "sdpa-fwdbwd", "train-fwd", "train-fwdbwd"]


def setup(P: int, H: int, N: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    d = P // H
    x = torch.randn(B, N, P, generator=g)
    prior = nv.Prior(P, mean=0.0, var=1.0, log_alpha=float(P / (2 * math.sqrt(d))), log_alpha_std=2.0)
    return {
        "x": x,
        "q": torch.randn(B, H, N, d, generator=g),
        "k": torch.randn(B, H, N, d, generator=g),
        "v": torch.randn(B, H, N, d, generator=g),
        "Wk": torch.randn(P, P, generator=g) / math.sqrt(P),
        "Wv": torch.randn(P, P, generator=g) / math.sqrt(P),
        "bk": torch.zeros(P),
        "bv": torch.zeros(P),
        "nvib_eval": nv.NVIB(P, H, prior=prior, alpha_tau=10.0).eval(),
        "nvib_train": nv.NVIB(P, H, prior=prior, stdev_tau=0.5, alpha_tau=10.0).train(),
        "H": H,
    }


def make(method: str, s: dict):
    """A zero-argument callable running one call of ``method`` on the inputs ``s``."""
    H = s["H"]
    x, q, k, v = s["x"], s["q"], s["k"], s["v"]

    def heads(t):
        return t.view(B, -1, H, t.shape[-1] // H).transpose(1, 2)

    if method == "sdpa":
        return torch.no_grad()(lambda: F.scaled_dot_product_attention(q, k, v))
    if method == "sdpa+kv":
        return torch.no_grad()(lambda: F.scaled_dot_product_attention(q, heads(F.linear(x, s["Wk"], s["bk"])), heads(F.linear(x, s["Wv"], s["bv"]))))
    if method.startswith("eval"):
        formula = "exact" if method == "eval-exact" else "paper"
        impl = "reference" if method == "eval-naive" else "fast"

        @torch.no_grad()
        def run():  # inference
            lat = s["nvib_eval"](x)
            return nv.denoising_attention(q, lat, s["Wk"], s["bk"], s["Wv"], s["bv"], formula=formula, impl=impl, need_weights=impl == "reference")[0]

        return run
    if method == "sdpa-fwdbwd":
        qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
        return lambda: F.scaled_dot_product_attention(qg, kg, vg).sum().backward()
    if method.startswith("train"):
        nvib = s["nvib_train"]
        qg = q.clone().requires_grad_(method == "train-fwdbwd")
        Wk, Wv = (w.clone().requires_grad_(method == "train-fwdbwd") for w in (s["Wk"], s["Wv"]))

        def run():
            lat = nvib(x)
            out = nv.denoising_attention(qg, lat, Wk, s["bk"], Wv, s["bv"], impl="fast", need_weights=False)[0]
            kl = nv.kl_gaussian(lat, nvib.prior).sum() + nv.kl_dirichlet(lat, nvib.prior).sum().float()
            loss = out.sum() + kl
            if method == "train-fwdbwd":
                loss.backward()
            return loss

        if method == "train-fwd":
            def run_nograd():
                with torch.enable_grad():
                    return run()
            return run_nograd
        return run
    raise ValueError(method)


def time_grid(P: int, H: int, N: int, methods: list[str], repeats: int) -> dict[str, float]:
    """Median seconds of one call of each method on the inputs of ``(P, H, N)``, timed interleaved."""
    s = setup(P, H, N)
    return interleaved({m: make(m, s) for m in methods}, repeats)


def measure_memory_here(method: str, P: int, H: int, N: int) -> int:
    s = setup(P, H, N)
    fn = make(method, s)
    before = peak_rss_bytes()
    fn()
    return peak_rss_bytes() - before


def memory(method: str, P: int, H: int, N: int) -> int:
    out = subprocess.run([sys.executable, __file__, "--memory", method, str(P), str(H), str(N)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def tables(rows: list[dict]) -> str:
    """The latency and the memory table of rows ``{"P", "H", "N", "time_<method>": seconds, "mem_<method>": bytes}``."""
    def t(r, m):
        return r[f"time_{m}"]

    def mem(r, m):
        return r[f"mem_{m}"]

    def base(r):
        return max(mem(r, "sdpa"), 1)

    head = [("P", "{P}"), ("H", "{H}"), ("N", "{N}")]
    time_columns = [*head, ("SDPA ms", lambda r: f"{t(r, 'sdpa') * 1e3:.1f}"),
                    *((f"{m} (x SDPA)", lambda r, m=m: f"{t(r, m) / t(r, 'sdpa'):.2f}") for m in METHODS[1:5]),
                    ("SDPA fwd+bwd ms", lambda r: f"{t(r, 'sdpa-fwdbwd') * 1e3:.1f}"),
                    ("train-fwd (x SDPA)", lambda r: f"{t(r, 'train-fwd') / t(r, 'sdpa'):.2f}"),
                    ("train-fwdbwd (x SDPA fwd+bwd)", lambda r: f"{t(r, 'train-fwdbwd') / t(r, 'sdpa-fwdbwd'):.2f}"),
                    ("eval-paper (x sdpa+kv)", lambda r: f"{t(r, 'eval-paper') / t(r, 'sdpa+kv'):.2f}")]
    memory_columns = [*head, ("SDPA MiB", lambda r: f"{mem(r, 'sdpa') / 2**20:.1f}"),
                      *((m, lambda r, m=m: f"{mem(r, m) / base(r):.2f}") for m in METHODS[1:5]),
                      ("SDPA fwd+bwd MiB", lambda r: f"{mem(r, 'sdpa-fwdbwd') / 2**20:.1f}"),
                      ("train-fwd", lambda r: f"{mem(r, 'train-fwd') / base(r):.2f}"),
                      ("train-fwdbwd (x SDPA fwd+bwd)", lambda r: f"{mem(r, 'train-fwdbwd') / max(mem(r, 'sdpa-fwdbwd'), 1):.2f}")]
    return "\n".join([markdown_table(rows, time_columns), "", "Peak memory growth during one call, as a ratio to SDPA's (SDPA's in MiB):",
                      "", markdown_table(rows, memory_columns)])


def main(argv: list[str] | None = None) -> None:
    parser = script_parser(__doc__, ROOT, doc_file="PERFORMANCE.md", doc_option="--out", repeats=7)
    parser.add_argument("--quick", action="store_true", help="only P=768, H=12, N=512; print, do not write docs")
    parser.add_argument("--memory", nargs=4, metavar=("METHOD", "P", "H", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory:
        m, P, H, N = args.memory
        print(measure_memory_here(m, int(P), int(H), int(N)))
        return
    torch.manual_seed(0)
    configs = [(768, 12, 512)] if args.quick else [(P, H, N) for P, H in GRID for N in LENGTHS]
    rows = []
    for P, H, N in configs:
        reps = args.repeats if N < 1024 else max(3, args.repeats // 2)
        t = time_grid(P, H, N, METHODS, reps)
        mem = {m: memory(m, P, H, N) for m in METHODS}
        rows.append({"P": P, "H": H, "N": N, **{f"time_{m}": v for m, v in t.items()}, **{f"mem_{m}": v for m, v in mem.items()}})
        print(json.dumps(rows[-1]), flush=True)
    if args.quick:
        print(tables(rows))
    else:
        # both tables from the CSV file next to the docs: docs/results/attention.csv
        text = tables(read_csv(write_csv(Path(args.out).parent / "results" / "attention.csv", rows)))
        print(text)
        header = (
            "## Attention: NV vs SDPA\n\nCommand: `.venv/bin/python benchmarks/attention.py` "
            f"(B={B}, float32, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads; median of "
            f"{args.repeats} interleaved runs, {max(3, args.repeats // 2)} at N=1024). Method definitions: the docstring of "
            "`benchmarks/attention.py`.\n\n"
        )
        write_section(header + text + "\n", "attention", Path(args.out))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""What Dirichlet attention (issue 8) costs: one attention layer and a whole MiniLM training step.

    .venv/bin/python benchmarks/dirichlet.py              # ~3 minutes; writes the "dirichlet" section of docs/PERFORMANCE.md
    .venv/bin/python benchmarks/dirichlet.py --threads 1  # one thread (how the studies run)

Float32 inputs, CPU. Timed interleaved round by round, median of the repeats, ratios to the
baseline of the same run (this machine is noisy):

* one layer, ``q, k, v [16, 12, N, 32]`` (MiniLM's heads, a batch of 16): ``sdpa`` forward and
  forward+backward (q, k, v requiring gradients) against :func:`nvformer.dirichlet.functional.dirichlet_attention`
  with the default :class:`~nvformer.DirichletSpec`: ``mean`` (posterior-mean weights, forward,
  no KL: the prediction path), ``sample`` (one sampled set of weights, forward, no KL) and
  ``train`` (sampled weights and the KL term,
  forward+backward through the implicit reparameterisation gradients and ``tau``);
* all-MiniLM-L6-v2 with a classification head, one AdamW training step on 16 ``books`` reviews of
  128 tokens, standard attention (sdpa) vs Dirichlet attention in all six layers (ELBO with the KL),
  and one evaluation forward of each (Dirichlet: posterior-mean prediction).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

from nvformer import DirichletSpec, convert_dirichlet
from nvformer.dirichlet.functional import dirichlet_attention
from nvformer.dirichlet.module import dirichlet_kl_total
from nvformer_studies.common.bench import benchmark_section, interleaved
from nvformer_studies.common.checkpoints import load_minilm
from nvformer_studies.common.data import read_reviews
from nvformer_studies.common.scripts import script_parser, set_threads

ROOT = Path(__file__).resolve().parents[1]

LENGTHS = (64, 128, 256)


def layer_rows(repeats: int) -> list[dict]:
    """One row per length: seconds of the standard and the Dirichlet forms of one attention layer."""
    spec = DirichletSpec()
    rows = []
    for N in LENGTHS:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(16, 12, N, 32, generator=g, requires_grad=True) for _ in range(3))
        tau = torch.tensor(spec.tau, requires_grad=True)

        def sdpa_fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v)

        def sdpa_bwd():
            F.scaled_dot_product_attention(q, k, v).sum().backward()

        def dir_fwd(sample: bool):
            def run():
                with torch.no_grad():
                    dirichlet_attention(q, k, v, None, spec, tau, sample=sample, kl=False)
            return run

        def dir_train():
            out, _, kl = dirichlet_attention(q, k, v, None, spec, tau, sample=True)
            (out.sum() + kl.sum().float()).backward()

        t = interleaved({"sdpa": sdpa_fwd, "sdpa-bwd": sdpa_bwd, "mean": dir_fwd(False), "sample": dir_fwd(True), "train": dir_train}, repeats)
        rows.append({"workload": f"one layer, N = {N}", "kind": "layer", "forward": t["sdpa"], "mean": t["mean"], "sample": t["sample"],
                     "train": t["sdpa-bwd"], "dirichlet_train": t["train"]})
    return rows


def minilm_row(repeats: int) -> dict:
    """Seconds of an evaluation forward and of a training step of MiniLM, standard and Dirichlet attention."""
    model, tok = load_minilm(head="classification")
    dirichlet = convert_dirichlet(copy.deepcopy(model))
    batch = dict(tok(read_reviews("books").texts[:16], padding="max_length", truncation=True, max_length=128, return_tensors="pt"))
    labels = torch.zeros(16, dtype=torch.long)
    opts = {id(m): torch.optim.AdamW(m.parameters(), lr=1e-6) for m in (model, dirichlet)}

    def step(m, kl: bool):
        def run():
            m.train()
            loss = m(**batch, labels=labels).loss
            if kl:
                loss = loss + dirichlet_kl_total(m).float().mean() / 1400
            opts[id(m)].zero_grad()
            loss.backward()
            opts[id(m)].step()
        return run

    def forward(m):
        def run():
            m.eval()
            with torch.no_grad():
                m(**batch)
        return run

    t = interleaved({"std": step(model, False), "dir": step(dirichlet, True), "std-eval": forward(model), "dir-eval": forward(dirichlet)},
                    repeats)
    return {"workload": "all-MiniLM-L6-v2, 16 x 128 tokens", "kind": "model", "forward": t["std-eval"], "mean": t["dir-eval"], "sample": None,
            "train": t["std"], "dirichlet_train": t["dir"]}


def _time(key: str, base: str | None = None):
    """A table cell: milliseconds of ``key`` (and its ratio to ``base``); one layer: the standard
    times to 0.1 ms and whole ratios, the model: whole milliseconds and ratios to 0.1."""
    def cell(r: dict) -> str:
        if r[key] is None:
            return "-"
        layer = r["kind"] == "layer"
        if base is None:
            return f"{r[key] * 1e3:.{1 if layer else 0}f} ms"
        return f"{r[key] * 1e3:.0f} ms ({r[key] / r[base]:.{0 if layer else 1}f}x)"

    return cell


def main(argv: list[str] | None = None) -> None:
    args = script_parser(__doc__, ROOT, doc_file="PERFORMANCE.md", doc_option="--out", threads=True, repeats=5).parse_args(argv)
    set_threads(args)
    rows = layer_rows(args.repeats) + [minilm_row(max(3, args.repeats - 2))]
    out = Path(args.out)
    benchmark_section("Dirichlet attention (Bayesian attention weights) vs standard attention",
                      f"benchmarks/dirichlet.py{' --threads ' + str(args.threads) if args.threads else ''}", "float32 inputs, CPU", rows,
                      {"workload": "{workload}", "standard, forward": _time("forward"), "Dirichlet mean, forward": _time("mean", "forward"),
                       "Dirichlet sample, forward": _time("sample", "forward"), "standard, fwd+bwd / train step": _time("train"),
                       "Dirichlet train (sample + KL), fwd+bwd / train step": _time("dirichlet_train", "train")}, "dirichlet", out,
                      out.parent / "results",
                      note="Dirichlet attention works elementwise over every [query, key] pair in the input's precision (log-space "
                      "concentrations, Gamma draws with implicit reparameterisation gradients, lgamma/digamma for the KL; only the KL's "
                      "per-row sums are float64): it cannot use a fused attention kernel.")


if __name__ == "__main__":
    main()

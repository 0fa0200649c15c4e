"""What Dirichlet attention (issue 8) costs: one attention layer and a whole MiniLM training step.

    .venv/bin/python benchmarks/dirichlet.py              # ~3 minutes; writes the "dirichlet" section of docs/PERFORMANCE.md
    .venv/bin/python benchmarks/dirichlet.py --threads 1  # one thread (how the studies run)

Float32 inputs, CPU. Timed interleaved round by round, median of the repeats, ratios to the
baseline of the same run (this machine is noisy):

* one layer, ``q, k, v [16, 12, N, 32]`` (MiniLM's heads, a batch of 16): ``sdpa`` forward and
  forward+backward (q, k, v requiring gradients) against :func:`nvformer.bayes.dirichlet_attention`
  with the default :class:`~nvformer.DirichletSpec`: ``mean`` (posterior-mean weights, forward,
  no KL: the prediction path), ``sample`` (one sampled set of weights, forward, no KL) and
  ``train`` (sampled weights and the KL term,
  forward+backward through the implicit reparameterisation gradients and ``tau``);
* all-MiniLM-L6-v2 with a classification head, one AdamW training step on 16 ``books`` reviews of
  128 tokens, standard attention (sdpa) vs Dirichlet attention in all six layers (ELBO with the KL),
  and one evaluation forward of each (Dirichlet: posterior-mean prediction).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "experiments"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from models import interleaved, write_table  # noqa: E402
from nvformer.bayes import DirichletSpec, convert_dirichlet, dirichlet_attention, dirichlet_kl_total  # noqa: E402

LENGTHS = (64, 128, 256)


def layer_rows(repeats: int) -> list[str]:
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
        rows.append(f"| one layer, N = {N} | {t['sdpa'] * 1e3:.1f} ms | {t['mean'] * 1e3:.0f} ms ({t['mean'] / t['sdpa']:.0f}x) | "
                    f"{t['sample'] * 1e3:.0f} ms ({t['sample'] / t['sdpa']:.0f}x) | {t['sdpa-bwd'] * 1e3:.1f} ms | "
                    f"{t['train'] * 1e3:.0f} ms ({t['train'] / t['sdpa-bwd']:.0f}x) |")
    return rows


def minilm_row(repeats: int) -> str:
    from nvformer.data import read_reviews
    from nvformer.hf.checkpoints import load_minilm

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
    return (f"| all-MiniLM-L6-v2, 16 x 128 tokens | {t['std-eval'] * 1e3:.0f} ms | {t['dir-eval'] * 1e3:.0f} ms "
            f"({t['dir-eval'] / t['std-eval']:.1f}x) | - | {t['std'] * 1e3:.0f} ms | {t['dir'] * 1e3:.0f} ms ({t['dir'] / t['std']:.1f}x) |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "docs" / "PERFORMANCE.md"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = layer_rows(args.repeats) + [minilm_row(max(3, args.repeats - 2))]
    write_table("Dirichlet attention (Bayesian attention weights) vs standard attention",
                f"benchmarks/dirichlet.py{' --threads ' + str(args.threads) if args.threads else ''}", "float32 inputs, CPU",
                ["workload", "standard, forward", "Dirichlet mean, forward", "Dirichlet sample, forward",
                 "standard, fwd+bwd / train step", "Dirichlet train (sample + KL), fwd+bwd / train step"], rows, "dirichlet", Path(args.out),
                note="Dirichlet attention does its maths in float64 (log-space concentrations, Gamma sampling with implicit "
                "reparameterisation gradients, lgamma/digamma for the KL), elementwise over every [query, key] pair: it cannot use "
                "a fused attention kernel.")


if __name__ == "__main__":
    main()

"""A short demo: build an NV Transformer and check what the core promises.

Run with ``nvformer-studies demo`` (or ``python -m nvformer_studies.demo``). Every line it prints is computed
here and now; it exits non-zero if a check fails.
"""

from __future__ import annotations

import copy
import time
import warnings

import torch
from torch import nn

from nvformer import NVMultiheadAttention, convert, estimate_prior, kl_terms


def _copy_task_batch(batch: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(2, vocab, (batch, length), generator=generator)


class _Seq2Seq(nn.Module):
    """A tiny encoder-decoder on token ids around ``nn.Transformer``."""

    def __init__(self, vocab: int, dim: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(64, dim) * 0.1)
        self.core = nn.Transformer(dim, heads, layers, layers, 4 * dim, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor, src_pad: torch.Tensor | None = None) -> torch.Tensor:
        s = self.emb(src) + self.pos[: src.shape[1]]
        t = self.emb(tgt_in) + self.pos[: tgt_in.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(tgt_in.shape[1], device=src.device)
        h = self.core(s, t, tgt_mask=mask, tgt_is_causal=True, src_key_padding_mask=src_pad, memory_key_padding_mask=src_pad)
        return self.head(h)


def _train(model: nn.Module, steps: int, gen: torch.Generator, vocab: int, kl_weight: float) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for _ in range(steps):
        src = _copy_task_batch(32, 8, vocab, gen)
        tgt_in = torch.cat([torch.ones(32, 1, dtype=torch.long), src[:, :-1]], 1)
        logits = model(src, tgt_in)
        loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), src.reshape(-1))
        if kl_weight:
            loss = loss + kl_weight * kl_terms(model).total().mean().float()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _pretrained_rows() -> list[tuple[str, str, bool]]:
    """Convert all-MiniLM-L6-v2 with an empirical prior from books reviews; check it on airline reviews."""
    from nvformer import convert, estimate_prior, set_knobs

    from .common.checkpoints import load_minilm
    from .common.data import read_reviews

    model, tok = load_minilm()
    src = tok(read_reviews("books").texts[:32], padding=True, truncation=True, max_length=128, return_tensors="pt")
    tgt = tok(read_reviews("airline").texts[:32], padding=True, truncation=True, max_length=128, return_tensors="pt")
    valid = tgt["attention_mask"].bool()
    priors = estimate_prior(model, [dict(src)], show_progress=False)
    with torch.no_grad():
        ref = model(**tgt).last_hidden_state
        nvm = convert(copy.deepcopy(model), prior=priors, alpha_tau=1000.0)
        diff = float((nvm(**tgt).last_hidden_state - ref)[valid].abs().max())
        moved = []
        for a in (10.0, 1.0, 0.0, -1.0):
            set_knobs(nvm, alpha_tau=a)
            moved.append(float((nvm(**tgt).last_hidden_state - ref)[valid].abs().mean()))
    s_alpha = sorted(float(p.log_alpha_std) for p in priors.values())
    return [
        (f"all-MiniLM-L6-v2: {len(priors)} sites, prior from 32 books reviews", f"s_alpha {s_alpha[0]:.2f}..{s_alpha[-1]:.2f}", len(priors) == 6 and s_alpha[0] > 0),
        ("  identity on 32 airline reviews (alpha_tau=1000)", f"max |diff| = {diff:.2e}", diff < 1e-4),
        ("  alpha_tau 10, 1, 0, -1: mean |hidden diff|", ", ".join(f"{v:.3g}" for v in moved), all(a <= b for a, b in zip(moved, moved[1:]))),
    ]


def run(seed: int = 0, steps: int = 150) -> bool:
    """Run the demo; return True if every check passed."""
    warnings.filterwarnings("ignore", message=".*nested tensors is in prototype stage.*")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vocab = 12
    rows: list[tuple[str, str, bool]] = []
    t0 = time.perf_counter()

    # 1. a standard Transformer, trained briefly on a copy task
    base = _Seq2Seq(vocab)
    base_losses = _train(base, steps, gen, vocab, 0.0)
    rows.append(("train a standard Transformer (copy task)", f"loss {base_losses[0]:.3f} -> {base_losses[-1]:.3f}", base_losses[-1] < base_losses[0]))

    # 2. convert with the identity initialisation, then estimate every module's empirical prior
    src = _copy_task_batch(16, 8, vocab, gen)
    src_pad = torch.zeros(16, 8, dtype=torch.bool)
    src_pad[8:, 5:] = True
    tgt_in = torch.cat([torch.ones(16, 1, dtype=torch.long), src[:, :-1]], 1)
    nvmodel = convert(copy.deepcopy(base), alpha_tau=1000.0)
    estimate_prior(nvmodel, [(src, tgt_in, src_pad)], show_progress=False)
    nv_modules = [m for m in nvmodel.modules() if isinstance(m, NVMultiheadAttention)]
    nvmodel.eval()
    with torch.no_grad():
        ref = base(src, tgt_in, src_pad)
        out = nvmodel(src, tgt_in, src_pad)
    diff = float((ref - out).abs().max())
    rows.append((f"convert {len(nv_modules)} attention modules (empirical prior, alpha_tau=1000)", f"max |logit diff| = {diff:.2e}", diff < 1e-4))

    # 3. the knobs regularise: lowering alpha_tau moves mass onto the prior component
    moved, prior_w = [], []
    for alpha_tau in (1000.0, 10.0, 0.0, -2.0, -5.0):
        for m in nv_modules:
            m.nvib.set_knobs(alpha_tau=alpha_tau)
        with torch.no_grad():
            moved.append(float((nvmodel(src, tgt_in, src_pad) - ref).abs().mean()))
        prior_w.append(sum(float(m.last_latent.log_pi[:, 0].exp().mean()) for m in nv_modules) / len(nv_modules))
    monotone = all(a <= b + 1e-6 for a, b in zip(prior_w, prior_w[1:]))
    rows.append(("alpha_tau 1000, 10, 0, -2, -5: mean prior weight", ", ".join(f"{v:.2g}" for v in prior_w), monotone))
    rows.append(("                                 mean |logit diff|", ", ".join(f"{v:.3g}" for v in moved), moved[-1] > moved[0]))

    # 4. train an NV Transformer from scratch with the KL regularisers
    torch.manual_seed(seed)
    scratch = convert(_Seq2Seq(vocab), stdev_tau=0.5, alpha_tau=2.0, kappa=1)
    losses = _train(scratch, steps, gen, vocab, kl_weight=1e-3)
    scratch.eval()
    src_t = _copy_task_batch(64, 8, vocab, gen)
    tgt_t = torch.cat([torch.ones(64, 1, dtype=torch.long), src_t[:, :-1]], 1)
    with torch.no_grad():
        acc = float((scratch(src_t, tgt_t).argmax(-1) == src_t).float().mean())
        kl = kl_terms(scratch)
    ok = losses[-1] < losses[0] and torch.isfinite(kl.total()).all().item()
    rows.append(("train an NV Transformer (CE + 1e-3 KL)", f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, token acc {acc:.2f}", ok))
    kl_ok = bool(torch.isfinite(kl.gaussian).all() and torch.isfinite(kl.dirichlet).all() and (kl.dirichlet >= 0).all() and (kl.gaussian >= 0).all())
    rows.append(("KL terms of the trained model (mean per sequence)", f"KL_G {float(kl.gaussian.mean()):.3f}, KL_D {float(kl.dirichlet.mean()):.3f}", kl_ok))

    # 5. a real pretrained model: all-MiniLM-L6-v2 on real reviews (books -> airline)
    rows.extend(_pretrained_rows())

    width = max(len(r[0]) for r in rows)
    print(f"nvformer demo (seed {seed}, torch {torch.__version__}, {time.perf_counter() - t0:.1f} s)")
    for name, value, passed in rows:
        print(f"  [{'ok' if passed else 'FAIL'}] {name:<{width}}  {value}")
    all_ok = all(r[2] for r in rows)
    print("all checks passed" if all_ok else "SOME CHECKS FAILED")
    return all_ok


if __name__ == "__main__":
    raise SystemExit(0 if run() else 1)

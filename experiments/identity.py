"""Identity and knob response of the two real checkpoints after NV conversion.

Regenerates the "Identity of converted pretrained models" section of docs/RESULTS.md and the
plot docs/figures/identity_knobs.png:

    .venv/bin/python experiments/identity.py            # about 2 minutes on 2 CPU cores

Data (../shared/data): all-MiniLM-L6-v2 gets its empirical prior from the first 64 `books`
reviews and is evaluated on the first 32 `airline` reviews (max 128 tokens); SmolLM2-135M gets
its prior from the first 32 WikiText-2 `valid` paragraphs and is evaluated on the first 16
`test` paragraphs (max 64 tokens, right padding). No randomness is involved (evaluation mode, no sampling).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import nvformer as nv  # noqa: E402
from nvformer.data import read_reviews, read_wikitext  # noqa: E402
from nvformer.hf.checkpoints import load_minilm, load_smollm2  # noqa: E402

ALPHAS = (1e4, 1e3, 300.0, 100.0, 30.0, 10.0, 3.0, 1.0, 0.0, -1.0)
STDEVS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)


def _out(model, batch):
    out = model(**batch)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def _impl_noise(model, batch: dict, ref, valid) -> float:
    """Implementation noise of the original model: its eager attention vs its sdpa attention."""
    model.set_attn_implementation("eager")
    try:
        return float((_out(model, batch) - ref)[valid].abs().max())
    finally:
        model.set_attn_implementation("sdpa")


@torch.no_grad()
def measure(name: str, model, src: dict, tgt: dict, what: str) -> dict:
    valid = tgt["attention_mask"].bool()
    ref = _out(model, tgt)
    noise = _impl_noise(model, tgt, ref, valid)
    m64 = copy.deepcopy(model).double()
    ref64 = _out(m64, tgt)
    noise64 = _impl_noise(m64, tgt, ref64, valid)
    priors = nv.estimate_prior(model, [src], show_progress=False)
    s_alpha = [float(p.log_alpha_std) for p in priors.values()]
    nv.convert(model, prior=priors, alpha_tau=1e4)
    nv.convert(m64, prior=priors, alpha_tau=1e4)
    row = {
        "model": name,
        "what": what,
        "sites": len(priors),
        "s_alpha": (min(s_alpha), max(s_alpha)),
        "noise": noise,
        "noise64": noise64,
        "id32": float((_out(model, tgt) - ref)[valid].abs().max()),
        "id64": float((_out(m64, tgt) - ref64)[valid].abs().max()),
        "scale": float(ref[valid].abs().max()),
    }
    del m64
    row["alpha"] = []
    for a in ALPHAS:
        nv.set_knobs(model, alpha_tau=a, stdev_tau=0.0)
        row["alpha"].append(float((_out(model, tgt) - ref)[valid].abs().mean()))
    row["stdev"] = []
    for s in STDEVS:
        nv.set_knobs(model, alpha_tau=1e4, stdev_tau=s)
        row["stdev"].append(float((_out(model, tgt) - ref)[valid].abs().mean()))
    return row


def section(rows: list[dict], plot: str) -> str:
    lines = [
        "## Identity of converted pretrained models",
        "",
        "Command: `.venv/bin/python experiments/identity.py` (writes this section and",
        f"`{plot}`). Data: all-MiniLM-L6-v2 prior from the first 64 `books` reviews, evaluated on the",
        "first 32 `airline` reviews (Blitzer et al. 2007; Ryu & Lee 2020); SmolLM2-135M-Instruct prior",
        "from the first 32 WikiText-2 `valid` paragraphs, evaluated on the first 16 `test` paragraphs",
        "(Merity et al. 2016; right padding). Deterministic (no sampling, no seeds needed). Identity uses",
        "`mu_tau=1, stdev_tau=0, alpha_tau=1e4`; differences are max |diff| over non-pad positions.",
        "",
        "| model | output compared | sites | s_alpha range | original: eager vs sdpa, fp32 | NV vs original, fp32 | original: eager vs sdpa, fp64 | NV vs original, fp64 | output scale (max abs) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['what']} | {r['sites']} | {r['s_alpha'][0]:.3f} .. {r['s_alpha'][1]:.2f} | {r['noise']:.2e} | "
            f"{r['id32']:.2e} | {r['noise64']:.2e} | {r['id64']:.2e} | {r['scale']:.1f} |"
        )
    lines += ["", "Mean |diff| from the original output as one knob moves (all sites together; the other knobs at identity):", ""]
    lines.append("| model | " + " | ".join(f"alpha_tau={a:g}" for a in ALPHAS) + " |")
    lines.append("| --- " * (len(ALPHAS) + 1) + "|")
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join(f"{v:.3g}" for v in r["alpha"]) + " |")
    lines += ["", "| model | " + " | ".join(f"stdev_tau={s:g}" for s in STDEVS) + " |", "| --- " * (len(STDEVS) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['model']} | " + " | ".join(f"{v:.3g}" for v in r["stdev"]) + " |")
    lines += [
        "",
        f"![knob response]({Path(plot).relative_to('docs')})",
        "",
        "Reading: the converted models differ from the originals by about as much as the originals'",
        "own two attention implementations (eager, sdpa) differ from each other -- in float32, and for",
        "SmolLM2 also in float64, where its 30 layers amplify rounding differences to ~1e-5 on the",
        "logits. MiniLM in float64 differs by ~3e-12 (the per-key logit terms carry",
        "`alpha_tau * s_alpha` of up to ~5e4 before it is subtracted, which costs ~1e-12). How",
        "far `alpha_tau` must go before the prior component matters depends on `s_alpha`, which",
        "the empirical prior sets per layer: with SmolLM2's first-layer `s_alpha` near 0.02 the",
        "authors' `alpha_tau = 10` is far from identity, while for MiniLM it is close to it.",
        "",
    ]
    return "\n".join(lines)


def write_section(text: str, key: str, path: Path) -> None:
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    doc = path.read_text() if path.exists() else "# Results\n\nEvery number here is produced by the command named in its section.\n"
    block = f"{start}\n{text}\n{end}"
    if start in doc and end in doc:
        doc = doc[: doc.index(start)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in rows:
        xs = [a for a in ALPHAS if a > 0]
        axes[0].plot(xs, [v for a, v in zip(ALPHAS, r["alpha"]) if a > 0], marker="o", label=r["model"])
        axes[1].plot(STDEVS[1:], r["stdev"][1:], marker="o", label=r["model"])
    axes[0].set(xscale="log", yscale="log", xlabel="alpha_tau (stdev_tau = 0)", ylabel="mean |output - original|", title="alpha_tau")
    axes[0].invert_xaxis()
    axes[1].set(xscale="log", yscale="log", xlabel="stdev_tau (alpha_tau = 1e4)", title="stdev_tau")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(ROOT / "docs" / "RESULTS.md"))
    args = parser.parse_args(argv)
    rows = []
    model, tok = load_minilm()
    src = dict(tok(read_reviews("books").texts[:64], padding=True, truncation=True, max_length=128, return_tensors="pt"))
    tgt = dict(tok(read_reviews("airline").texts[:32], padding=True, truncation=True, max_length=128, return_tensors="pt"))
    rows.append(measure("all-MiniLM-L6-v2", model, src, tgt, "last hidden state"))
    print(rows[-1])
    model, tok = load_smollm2()
    tok.padding_side = "right"  # valid positions of a causal model ignore right padding; eager fp64 gives NaN with left padding
    tok.pad_token = tok.pad_token or tok.eos_token
    src = dict(tok(read_wikitext("valid")[:32], padding=True, truncation=True, max_length=64, return_tensors="pt"))
    tgt = dict(tok(read_wikitext("test")[:16], padding=True, truncation=True, max_length=64, return_tensors="pt"))
    rows.append(measure("SmolLM2-135M", model, src, tgt, "logits"))
    print(rows[-1])
    fig = ROOT / "docs" / "figures" / "identity_knobs.png"
    plot(rows, fig)
    write_section(section(rows, str(fig.relative_to(ROOT))), "identity", Path(args.results))
    print(f"wrote {args.results} and {fig}")


if __name__ == "__main__":
    main()

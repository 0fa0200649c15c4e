"""Whole-model speed: converted all-MiniLM-L6-v2 forward and SmolLM2-135M generate() vs the originals.

    .venv/bin/python benchmarks/models.py       # about 3 minutes; writes a section of docs/PERFORMANCE.md

Both models in float32 on CPU, sdpa attention (the converted modules then use nvformer's SDPA
fast path), knobs at the identity (empirical prior, ``alpha_tau=1e4``) and, for MiniLM, also away
from it (``alpha_tau=0, stdev_tau=0.1``). Original and converted copies are timed interleaved,
median of the repeats. MiniLM: batch of 32 `books` reviews, max 128 tokens. SmolLM2: greedy
generation of 48 new tokens with the KV cache from a batch of 4 WikiText-2 `test` prompts
(left-padded, max 32 tokens); tokens/second counts new tokens over the batch.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "experiments"))

import nvformer as nv  # noqa: E402
from identity import write_section  # noqa: E402
from nvformer.data import read_reviews, read_wikitext  # noqa: E402
from nvformer.hf.checkpoints import load_minilm, load_smollm2  # noqa: E402


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def minilm(repeats: int) -> list[str]:
    model, tok = load_minilm()
    batch = dict(tok(read_reviews("books").texts[:32], padding=True, truncation=True, max_length=128, return_tensors="pt"))
    priors = nv.estimate_prior(model, [batch], show_progress=False)
    ident = nv.convert(copy.deepcopy(model), prior=priors, alpha_tau=1e4)
    away = nv.convert(copy.deepcopy(model), prior=priors, alpha_tau=0.0, stdev_tau=0.1)
    t = interleaved({"original": lambda: model(**batch), "nv-identity": lambda: ident(**batch), "nv-away": lambda: away(**batch)}, repeats)
    return [
        f"| all-MiniLM-L6-v2 forward, 32 x {batch['input_ids'].shape[1]} tokens | {t['original'] * 1e3:.0f} ms | "
        f"{t['nv-identity'] * 1e3:.0f} ms ({t['nv-identity'] / t['original']:.2f}x) | {t['nv-away'] * 1e3:.0f} ms ({t['nv-away'] / t['original']:.2f}x) | <= 1.25x |"
    ]


@torch.no_grad()
def smollm2(repeats: int) -> list[str]:
    model, tok = load_smollm2()
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    src = dict(tok(read_wikitext("valid")[:16], padding=True, truncation=True, max_length=64, return_tensors="pt"))
    prompts = dict(tok(read_wikitext("test")[:4], padding=True, truncation=True, max_length=32, return_tensors="pt"))
    priors = nv.estimate_prior(model, [src], show_progress=False)
    conv = nv.convert(copy.deepcopy(model), prior=priors, alpha_tau=1e4)
    new = 48
    gk = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
    same = torch.equal(model.generate(**prompts, **gk), conv.generate(**prompts, **gk))
    t = interleaved({"original": lambda: model.generate(**prompts, **gk), "nv": lambda: conv.generate(**prompts, **gk)}, repeats)
    n = new * prompts["input_ids"].shape[0]
    return [
        f"| SmolLM2-135M generate, 4 prompts x {new} new tokens (greedy, KV cache) | {n / t['original']:.1f} tok/s | "
        f"{n / t['nv']:.1f} tok/s ({t['original'] / t['nv']:.2f}x){' identical tokens' if same else ' DIFFERENT tokens'} | - | >= 0.8x |"
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "docs" / "PERFORMANCE.md"))
    args = parser.parse_args(argv)
    rows = minilm(args.repeats) + smollm2(max(3, args.repeats - 2))
    write_table("Whole models: converted vs original", "benchmarks/models.py", "float32, CPU",
                ["workload", "original", "NV at identity (ratio)", "NV away from identity (ratio)", "goal"], rows, "models", Path(args.out))


def write_table(title: str, command: str, setting: str, columns: list[str], rows: list[str], key: str, out: Path,
                note: str = "") -> None:
    """Print and write the ``key`` section of ``out``: a titled table of benchmark ``rows`` (markdown
    lines) with the command, torch version and thread count it was measured with."""
    text = "\n".join([
        f"## {title}",
        "",
        f"Command: `.venv/bin/python {command}` ({setting}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"median of interleaved repeats; details in its docstring).{' ' + note if note else ''}",
        "",
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
        *rows,
        "",
    ])
    print(text)
    write_section(text, key, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

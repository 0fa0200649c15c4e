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

import copy
from pathlib import Path

import torch

import nvformer as nv
from nvformer_studies.common.bench import benchmark_section, interleaved
from nvformer_studies.common.checkpoints import load_minilm, load_smollm2
from nvformer_studies.common.data import read_reviews, read_wikitext
from nvformer_studies.common.scripts import script_parser

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def minilm(repeats: int) -> dict:
    """The MiniLM row: seconds of one forward of the original and the two converted copies."""
    model, tok = load_minilm()
    batch = dict(tok(read_reviews("books").texts[:32], padding=True, truncation=True, max_length=128, return_tensors="pt"))
    priors = nv.estimate_prior(model, [batch], show_progress=False)
    ident = nv.convert(copy.deepcopy(model), prior=priors, **nv.IDENTITY.as_dict())
    away = nv.convert(copy.deepcopy(model), prior=priors, alpha_tau=0.0, stdev_tau=0.1)
    t = interleaved({"original": lambda: model(**batch), "nv-identity": lambda: ident(**batch), "nv-away": lambda: away(**batch)}, repeats)
    return {"workload": f"all-MiniLM-L6-v2 forward, 32 x {batch['input_ids'].shape[1]} tokens", "original": t["original"],
            "identity": t["nv-identity"], "away": t["nv-away"], "new_tokens": None, "identical": None, "goal": "<= 1.25x"}


@torch.no_grad()
def smollm2(repeats: int) -> dict:
    """The SmolLM2 row: seconds of one ``generate()`` of the original and the converted copy, the
    new tokens it makes, and whether both made the same tokens (1) or not (0)."""
    model, tok = load_smollm2()
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    src = dict(tok(read_wikitext("valid")[:16], padding=True, truncation=True, max_length=64, return_tensors="pt"))
    prompts = dict(tok(read_wikitext("test")[:4], padding=True, truncation=True, max_length=32, return_tensors="pt"))
    priors = nv.estimate_prior(model, [src], show_progress=False)
    conv = nv.convert(copy.deepcopy(model), prior=priors, **nv.IDENTITY.as_dict())
    new = 48
    gk = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
    same = torch.equal(model.generate(**prompts, **gk), conv.generate(**prompts, **gk))
    t = interleaved({"original": lambda: model.generate(**prompts, **gk), "nv": lambda: conv.generate(**prompts, **gk)}, repeats)
    return {"workload": f"SmolLM2-135M generate, 4 prompts x {new} new tokens (greedy, KV cache)", "original": t["original"],
            "identity": t["nv"], "away": None, "new_tokens": new * prompts["input_ids"].shape[0], "identical": int(same), "goal": ">= 0.8x"}


def _speed(key: str):
    """A table cell: the time of ``key`` (ms, or new tokens per second for generation) and its ratio to the original's."""
    def cell(r: dict) -> str:
        if r[key] is None:
            return "-"
        n = r["new_tokens"]
        if key == "original":
            return f"{n / r[key]:.1f} tok/s" if n else f"{r[key] * 1e3:.0f} ms"
        if n:
            return f"{n / r[key]:.1f} tok/s ({r['original'] / r[key]:.2f}x){' identical tokens' if r['identical'] else ' DIFFERENT tokens'}"
        return f"{r[key] * 1e3:.0f} ms ({r[key] / r['original']:.2f}x)"

    return cell


def main(argv: list[str] | None = None) -> None:
    args = script_parser(__doc__, ROOT, doc_file="PERFORMANCE.md", doc_option="--out", repeats=5).parse_args(argv)
    out = Path(args.out)
    rows = [minilm(args.repeats), smollm2(max(3, args.repeats - 2))]
    benchmark_section("Whole models: converted vs original", "benchmarks/models.py", "float32, CPU", rows,
                      {"workload": "{workload}", "original": _speed("original"), "NV at identity (ratio)": _speed("identity"),
                       "NV away from identity (ratio)": _speed("away"), "goal": "{goal}"}, "models", out, out.parent / "results")


if __name__ == "__main__":
    main()

"""Issue 19's goal table and scaling picture: NV attention against the module a user would otherwise run.

    .venv/bin/python benchmarks/performance.py              # goal table + scaling (N 128..4096); writes the "performance"
                                                            # section of docs/PERFORMANCE.md, docs/results/performance*.csv,
                                                            # docs/figures/performance_scaling.png (~15 min on 2 cores)
    .venv/bin/python benchmarks/performance.py --quick      # small sizes, no models, prints only (seconds)
    .venv/bin/python benchmarks/performance.py --device cuda --dtype bfloat16   # the same command on a GPU

Every row is measured in this one run, its baseline and NV form back to back in each of ``--repeats``
rounds (every other round in reverse order). Milliseconds are medians over the rounds; the ratio is the
median of the rounds' own ratios, NV time over the baseline's (for generation: NV tokens/s over the
original's), with its quartiles and the number of rounds that meet the goal, so a ratio that meets its
goal only in some rounds reads as such. Baselines are what a user would otherwise run: ``nn.MultiheadAttention`` for the attention
layers, the original Hugging Face model for the models; bare ``scaled_dot_product_attention`` on ready
``q, k, v`` is an extra reference column (``sdpa_ms``).

Workloads (``WORKLOADS``):

* ``mha-eval``: ``NVMultiheadAttention`` (identity initialisation, empirical-like prior) evaluation forward
  vs ``nn.MultiheadAttention``, B=4 N=512 P=768 H=12; also the peak-memory ratio;
* ``mha-train``: the same, training form (sampled latent, both KL terms) forward + backward;
  ``mha-train-frozen-nvib``: the same with the NVIB's parameters frozen (as when a converted model is
  fine-tuned around its NV layers, or only its knobs are fitted): the NVIB's mean and log-variance
  projections, two ``P x P`` matrices that ``nn.MultiheadAttention`` does not have, then need no
  weight gradients and run in their identity structure;
* ``dirichlet-sample``: ``DirichletAttention`` with ``prediction="sample"``, evaluation forward, B=4 N=128
  P=256 H=4, vs ``nn.MultiheadAttention``; ``dirichlet-train``: its training step (forward with the KL,
  backward) vs ``nn.MultiheadAttention`` forward + backward;
* ``minilm-identity`` / ``minilm-away``: all-MiniLM-L6-v2 converted (identity knobs / ``alpha_tau=0,
  stdev_tau=0.1``) vs the original, 32 ``books`` reviews, 128 tokens;
* ``smollm2-generate``: SmolLM2-135M greedy ``generate`` (KV cache) of 48 tokens for 4 WikiText-2 prompts;
  ``smollm2-generate-compiled``: the same with :func:`nvformer.compile_attention` (``torch.compile``'d
  attention core; compiled in the untimed warm-up), measured separately. With ``--no-compile`` it is left out.

Scaling: latency and peak memory of ``nn.MultiheadAttention`` and ``NVMultiheadAttention`` (evaluation
forward; training forward + backward) against N, B=1 P=256 H=4. Peak memory on CPU is the growth of a
fresh subprocess' peak resident set (VmHWM) during one call after its inputs exist; on CUDA,
``torch.cuda.max_memory_allocated`` around the call.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import torch

import nvformer as nv
from nvformer_studies.common.bench import interleaved, interleaved_runs, peak_rss_bytes, quartiles
from nvformer_studies.common.docs import markdown_table, read_csv, write_csv, write_section
from nvformer_studies.common.scripts import script_parser

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = ("mha-eval", "mha-train", "mha-train-frozen-nvib", "dirichlet-sample", "dirichlet-train", "minilm-identity", "minilm-away", "smollm2-generate",
             "smollm2-generate-compiled")
GOALS = {"mha-eval": ("<=", 1.1), "mha-train": ("<=", 1.3), "mha-train-frozen-nvib": ("<=", 1.3), "dirichlet-sample": ("<=", 3.0), "dirichlet-train": ("<=", 4.0),
         "minilm-identity": ("<=", 1.05), "minilm-away": ("<=", 1.05), "smollm2-generate": (">=", 0.9),
         "smollm2-generate-compiled": (">=", 0.9)}
LENGTHS = (128, 256, 512, 1024, 2048, 4096)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _prior(P: int, H: int, device) -> nv.Prior:
    d = P // H
    return nv.Prior(P, mean=0.0, var=1.0, log_alpha=float(P / (2 * math.sqrt(d))), log_alpha_std=2.0).to(device=device)


def attention_pair(kind: str, B: int, N: int, P: int, H: int, device, dtype, seed: int = 0) -> dict:
    """Zero-argument callables ``{"baseline", "nv", "sdpa"}`` of one layer (and ``"modules"``: the baseline and
    NV modules they run): ``kind`` is ``mha-eval``,
    ``mha-train``, ``mha-train-frozen-nvib``, ``dirichlet-sample`` or ``dirichlet-train`` (module docstring)."""
    torch.manual_seed(seed)
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(B, N, P, generator=g).to(device=device, dtype=dtype)
    mha = torch.nn.MultiheadAttention(P, H, batch_first=True, device=device, dtype=dtype)
    train = "train" in kind
    if kind.startswith("mha"):
        nvm = nv.NVMultiheadAttention.from_mha(mha, prior=_prior(P, H, device), alpha_tau=10.0, stdev_tau=0.5 if train else 0.0)
        if kind.endswith("frozen-nvib"):
            nvm.nvib.requires_grad_(False)
    else:
        nvm = nv.DirichletAttention.from_mha(mha, nv.DirichletSpec(prediction="sample"))
    mha.train(train), nvm.train(train)
    d = P // H
    q, k, v = (torch.randn(B, H, N, d, generator=g).to(device=device, dtype=dtype).requires_grad_(train) for _ in range(3))
    xg = x.clone().requires_grad_(train)

    def step(module, loss_extra=None):
        def run():
            if not train:
                with torch.no_grad():
                    return module(x, x, x, need_weights=False)[0]
            out = module(xg, xg, xg, need_weights=False)[0]
            loss = out.float().sum() + (loss_extra(module) if loss_extra else 0.0)
            loss.backward()
            return loss
        return run

    def nv_kl(module):
        if kind.startswith("mha"):
            kl_g, kl_d = module.kl()
            return (kl_g.sum() + kl_d.sum()).float()
        return module.last_kl.sum().float()

    def sdpa():
        if not train:
            with torch.no_grad():
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        out.float().sum().backward()
        return out

    fns = {"baseline": step(mha), "nv": step(nvm, nv_kl if train else None), "sdpa": sdpa, "modules": (mha, nvm)}
    if kind == "mha-train":  # the baseline plus the NVIB's mean and log-variance projections (forward, backward), nothing else
        extra = [torch.nn.Linear(P, P, device=device, dtype=dtype) for _ in range(2)]
        fns["floor"] = step(mha, lambda _: sum(lin(xg).float().sum() for lin in extra))
    return fns


def _minilm(device, dtype) -> dict:
    from nvformer_studies.common.checkpoints import load_minilm
    from nvformer_studies.common.data import read_reviews

    model, tok = load_minilm()
    model = model.to(device=device, dtype=dtype)
    batch = {k: v.to(device) for k, v in tok(read_reviews("books").texts[:32], padding=True, truncation=True, max_length=128,
                                             return_tensors="pt").items()}
    priors = nv.estimate_prior(model, [batch], show_progress=False)
    ident = nv.convert(copy.deepcopy(model), prior=priors, **nv.IDENTITY.as_dict())
    away = nv.convert(copy.deepcopy(model), prior=priors, alpha_tau=0.0, stdev_tau=0.1)
    run = lambda m: torch.no_grad()(lambda: m(**batch))  # noqa: E731
    return {"minilm-identity": {"baseline": run(model), "nv": run(ident)}, "minilm-away": {"baseline": run(model), "nv": run(away)}}


def _smollm2(device, dtype, new: int = 48, compiled: bool = True) -> tuple[dict, int]:
    from nvformer_studies.common.checkpoints import load_smollm2
    from nvformer_studies.common.data import read_wikitext

    model, tok = load_smollm2()
    model = model.to(device=device, dtype=dtype)
    tok.padding_side = "left"
    tok.pad_token = tok.pad_token or tok.eos_token
    enc = lambda texts, n: {k: v.to(device) for k, v in tok(texts, padding=True, truncation=True, max_length=n, return_tensors="pt").items()}  # noqa: E731
    priors = nv.estimate_prior(model, [enc(read_wikitext("valid")[:16], 64)], show_progress=False)
    conv = nv.convert(copy.deepcopy(model), prior=priors, **nv.IDENTITY.as_dict())
    prompts = enc(read_wikitext("test")[:4], 32)
    gk = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
    run = lambda m: torch.no_grad()(lambda: m.generate(**prompts, **gk))  # noqa: E731
    reference = run(model)()
    rows = {"smollm2-generate": {"baseline": run(model), "nv": run(conv), "identical": torch.equal(reference, run(conv)())}}
    if compiled:
        comp = nv.compile_attention(copy.deepcopy(conv))
        rows["smollm2-generate-compiled"] = {"baseline": run(model), "nv": run(comp), "identical": torch.equal(reference, run(comp)())}
    return rows, new * prompts["input_ids"].shape[0]


def goal_rows(device, dtype, repeats: int, quick: bool, models: bool, compiled: bool = True) -> list[dict]:
    """One row per workload: baseline, NV and SDPA-reference milliseconds, the ratio, its goal and whether it is met."""
    size = {"mha": (4, 64 if quick else 512, 768, 12), "dirichlet": (4, 32 if quick else 128, 256, 4)}
    fns = {w: attention_pair(w, *size[w.split("-")[0]], device, dtype) for w in WORKLOADS if w.startswith(("mha", "dirichlet"))}
    new_tokens = None
    if models:
        fns |= _minilm(device, dtype)
        more, new_tokens = _smollm2(device, dtype, new=8 if quick else 48, compiled=compiled)
        fns |= more
    rows = []
    for w, f in fns.items():
        t = interleaved_runs({k: v for k, v in f.items() if k in ("baseline", "nv", "sdpa", "floor")}, repeats)
        rows.append(goal_row(w, t, f.get("identical"), new_tokens))
    return rows


def goal_row(workload: str, seconds: dict, identical: bool | None = None, new_tokens: int | None = None) -> dict:
    """The goal table's row of ``workload`` from the seconds of each interleaved round (``{"baseline", "nv"[, "sdpa"][, "floor"]}``,
    lists of equal length, or one number each): milliseconds are medians over the rounds; the ratio is the median
    of the rounds' own ratios (baseline and NV ran back to back in each: a slow spell of the machine cancels),
    with its quartiles and the share of rounds that meet the goal. Generation workloads (plain and compiled)
    compare tokens/s (baseline time over NV time), the others time; ``floor`` (mha-train) is the median of its rounds' own
    ratios to the baseline."""
    op, goal = GOALS[workload]
    gen = "generate" in workload
    runs = {k: v if isinstance(v, list) else [v] for k, v in seconds.items()}
    ratios = [b / n if gen else n / b for b, n in zip(runs["baseline"], runs["nv"])]
    q1, ratio, q3 = quartiles(ratios)
    meets = (lambda r: r <= goal) if op == "<=" else (lambda r: r >= goal)
    ms = {k: 1e3 * statistics.median(v) for k, v in runs.items()}
    floor = statistics.median(f / b for b, f in zip(runs["baseline"], runs["floor"])) if "floor" in runs else None
    return {"workload": workload, "baseline": "original model" if workload.startswith(("minilm", "smollm2")) else "nn.MultiheadAttention",
            "baseline_ms": ms["baseline"], "nv_ms": ms["nv"], "sdpa_ms": ms.get("sdpa"), "ratio": ratio, "ratio_q1": q1, "ratio_q3": q3,
            "floor_ratio": floor, "rounds": len(ratios), "rounds_met": sum(map(meets, ratios)),
            "measure": "tokens/s (NV / original)" if gen else "time (NV / baseline)", "goal": f"{op} {goal:g}x",
            "met": meets(ratio), "identical_tokens": identical, "new_tokens": new_tokens if gen else None}


def _floor_note(rows: list[dict]) -> str:
    """The sentence under the goal table that reads ``mha-train``'s measured floor."""
    row = next((r for r in rows if r["workload"] == "mha-train" and r.get("floor_ratio") is not None), None)
    if row is None:
        return ""
    return ("`floor` (`mha-train` only): `nn.MultiheadAttention`'s training step with the NVIB's mean and log-variance projections "
            "(two more P x P matrices, part of the NV layer) added to it, forward and backward and nothing else, over the baseline: "
            f"{row['floor_ratio']:.2f}x in this run, the least a training step that trains those two matrices can take. The rest of "
            f"`mha-train`'s {row['ratio']:.2f}x is the NV layer's own work: the sampled latent, the KL terms and the attention call's "
            "per-key channel. `mha-train-frozen-nvib` is the same step with the NVIB's parameters frozen.")


def measure_memory_here(method: str, N: int, P: int, H: int, device: str, dtype: str) -> int:
    """Bytes the peak memory grows by during one call of ``method`` (``mha-eval|nv-eval|mha-train|nv-train``)."""
    kind = "mha-" + method.split("-")[1]
    fns = attention_pair(kind, 1, N, P, H, torch.device(device), DTYPES[dtype])
    fn = fns["baseline"] if method.startswith("mha") else fns["nv"]
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = peak_rss_bytes()
    fn()
    return peak_rss_bytes() - before


def memory(method: str, N: int, P: int, H: int, device: str, dtype: str) -> int:
    """:func:`measure_memory_here` in a fresh subprocess (a process' peak resident set never goes down)."""
    out = subprocess.run([sys.executable, __file__, "--memory", json.dumps([method, N, P, H, device, dtype])], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def scaling_rows(device, dtype_name: str, repeats: int, lengths) -> list[dict]:
    """Latency and peak memory of MHA and NV (evaluation; training forward + backward) against N (B=1, P=256, H=4)."""
    rows = []
    for N in lengths:
        for form in ("eval", "train"):
            f = attention_pair(f"mha-{form}", 1, N, 256, 4, device, DTYPES[dtype_name])
            t = interleaved({"mha": f["baseline"], "nv": f["nv"]}, repeats)
            for who in ("mha", "nv"):
                rows.append({"N": N, "form": form, "module": who, "ms": 1e3 * t[who],
                             "peak_mib": memory(f"{who}-{form}", N, 256, 4, str(device), dtype_name) / 2**20})
    return rows


def _plot(rows: list[dict], path: Path) -> str:
    from nvformer_studies.common.plots import pyplot, save

    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for form, style in (("eval", "-"), ("train", "--")):
        for who, color in (("mha", "tab:gray"), ("nv", "tab:blue")):
            rs = [r for r in rows if r["form"] == form and r["module"] == who]
            label = f"{'nn.MultiheadAttention' if who == 'mha' else 'NVMultiheadAttention'}, {form}"
            axes[0].plot([r["N"] for r in rs], [r["ms"] for r in rs], style, color=color, marker="o", ms=3, label=label)
            axes[1].plot([r["N"] for r in rs], [r["peak_mib"] for r in rs], style, color=color, marker="o", ms=3, label=label)
    for ax, ylabel in zip(axes, ("latency (ms)", "peak memory growth (MiB)")):
        ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel=ylabel)
        ax.set_xticks([r["N"] for r in rows if r["form"] == "eval" and r["module"] == "mha"])
        ax.get_xaxis().set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(plt.matplotlib.ticker.NullFormatter())  # log-axis minor labels would overlap the N ticks
    axes[0].legend(fontsize=6)
    fig.suptitle("Scaling with N (B=1, P=256, H=4)", fontsize=9)
    return save(fig, path).name


_GOAL_COLUMNS = [("workload", "{workload}"), ("baseline", "{baseline}"), ("baseline ms", "{baseline_ms:.2f}"), ("NV ms", "{nv_ms:.2f}"),
                 ("SDPA ms", lambda r: "-" if r["sdpa_ms"] is None else f"{r['sdpa_ms']:.2f}"), ("ratio", "{ratio:.2f}x"), ("quartiles", "{ratio_q1:.2f}-{ratio_q3:.2f}"),
                 ("rounds met", "{rounds_met}/{rounds}"), ("floor", "{floor_ratio:.2f}x"),
                 ("measure", "{measure}"), ("goal", "{goal}"), ("met", lambda r: "yes" if str(r["met"]) == "True" else "no")]
_SCALING_COLUMNS = [("N", "{N}"), ("form", "{form}"), ("module", "{module}"), ("ms", "{ms:.2f}"), ("peak MiB", "{peak_mib:.1f}")]


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--memory":  # the subprocess of `memory`
        method, N, P, H, device, dtype = json.loads(sys.argv[2])
        print(measure_memory_here(method, N, P, H, device, dtype))
        return
    parser = script_parser(__doc__, ROOT, doc_file="PERFORMANCE.md", doc_option="--out", threads=True, repeats=15)
    parser.add_argument("--device", default="cpu", help="torch device to measure on")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="the modules' and inputs' dtype")
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="comma list of N for the scaling rows")
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repeats, N 128 and 256, no models; prints only")
    parser.add_argument("--no-models", action="store_true", help="leave out the MiniLM and SmolLM2 rows")
    parser.add_argument("--no-compile", action="store_true", help="leave out the smollm2-generate-compiled row (torch.compile)")
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
        torch.empty(1, device=device, dtype=DTYPES[args.dtype])
    except (RuntimeError, TypeError) as e:
        parser.error(f"--device {args.device} / --dtype {args.dtype}: {str(e).splitlines()[0]}")
    try:
        lengths = [int(n) for n in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths: comma list of integers, got {args.lengths!r}")
    if args.repeats < 1 or any(n < 1 for n in lengths):
        parser.error("--repeats and every --lengths value must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    rows = goal_rows(device, DTYPES[args.dtype], repeats, args.quick, models=not (args.quick or args.no_models), compiled=not args.no_compile)
    scaling = scaling_rows(device, args.dtype, repeats, (128, 256) if args.quick else lengths)
    setting = f"{args.device}, {args.dtype}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {repeats} interleaved rounds"
    if args.quick:
        print(markdown_table(rows, _GOAL_COLUMNS))
        print(markdown_table(scaling, _SCALING_COLUMNS))
        return
    csv_dir, fig_dir = ROOT / "docs" / "results", ROOT / "docs" / "figures"
    rows = read_csv(write_csv(csv_dir / "performance.csv", rows))
    scaling = read_csv(write_csv(csv_dir / "performance_scaling.csv", scaling))
    fig = _plot(scaling, fig_dir / "performance_scaling.png")
    text = "\n".join([
        "## Goals of issue 19: NV attention against what it replaces", "",
        f"Command: `.venv/bin/python benchmarks/performance.py` ({setting}; details in its docstring). Baseline and NV ran back to "
        "back in every round. Ratio: the median over the rounds of each round's NV time over the baseline's (generation: NV "
        "tokens/s over the original's), with its quartiles and the rounds whose own ratio meets the goal; milliseconds are medians; "
        "`SDPA ms`: bare `scaled_dot_product_attention` on ready q, k, v (reference only). Table: `docs/results/performance.csv`.", "",
        markdown_table(rows, _GOAL_COLUMNS), "",
        _floor_note(rows), "",
        "Scaling with N (`docs/results/performance_scaling.csv`; peak memory: growth during one call, measured in a fresh process):", "",
        markdown_table(scaling, _SCALING_COLUMNS), "", f"![scaling](figures/{fig})", ""])
    print(text)
    write_section(text, "performance", Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

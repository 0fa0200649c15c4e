"""The ``nvformer-studies`` command line: the project's own studies (sentiment, translation, NVAE) and the demo."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common.scripts import HelpFormatter

DEFAULT_MODELS = {"study": "runs/minilm-books", "translate-study": "runs/marian-koran"}


class _Parser(argparse.ArgumentParser):
    """Errors are one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str):  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _refuse(command: str, message: str) -> int:
    print(f"nvformer-studies {command}: error: {message}", file=sys.stderr)
    return 2


def _model_dir(command: str, given: str | None) -> tuple[str | None, str | None]:
    """``(model folder, error)``: a folder given with ``--model`` must exist (a typo is never a reason
    to train); without ``--model`` the study's own folder is used, trained there once if missing."""
    if given is None:
        return DEFAULT_MODELS[command], None
    if not Path(given).is_dir():
        return None, (f"--model {given}: no such folder (omit --model to use {DEFAULT_MODELS[command]}, "
                      "trained there once if missing)")
    return given, None


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="nvformer-studies", description="The studies of nvformer (docs/RESULTS.md) and a self-check demo",
                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="build an NV Transformer and print what it verifies", formatter_class=HelpFormatter)
    demo.add_argument("--seed", type=int, default=0, help="seed of the models and data")
    demo.add_argument("--steps", type=int, default=150, help="training steps of the two small models")
    study = sub.add_parser("study", help="the out-of-domain sentiment study (fine-tunes MiniLM on books once, then no training)", formatter_class=HelpFormatter)
    study.add_argument("--budget", choices=("demo", "full"), default="demo", help="demo: minutes; full: the docs/RESULTS.md budget")
    study.add_argument("--model", default=None, help="a fine-tuned classifier folder (none: runs/minilm-books, fine-tuned there once if missing)")
    study.add_argument("--data", default=None, help="folder holding reviews/ (default: ../shared/data or $NVFORMER_DATA)")
    study.add_argument("--targets", default=None, help="comma list of target domains (default: all six)")
    study.add_argument("--out", default=None, help="output folder (default: runs/study-BUDGET)")
    study.add_argument("--seed", type=int, default=0, help="sampler seed")
    study.add_argument("--split-seed", type=int, default=0, help="seed of the stratified train/validation/test splits")
    ts = sub.add_parser("translate-study", help="the cross-domain translation study (trains the koran Marian model once, ~1 h on 2 cores)", formatter_class=HelpFormatter)
    ts.add_argument("--model", default=None, help="a trained checkpoint folder (none: runs/marian-koran, trained there once if missing)")
    ts.add_argument("--out", default="runs/translation-study", help="output folder: results.json, summary.md, Optuna studies")
    ts.add_argument("--domains", default=None, help="comma list of target domains (default: koran,law,medical,it)")
    ts.add_argument("--sites", default=None, help="comma list of sites tuned separately (default: encoder,cross,decoder)")
    ts.add_argument("--n-dev", type=int, default=None, help="dev pairs per domain for the knob search")
    ts.add_argument("--n-test", type=int, default=None, help="test pairs per domain")
    ts.add_argument("--trials", type=int, default=None, help="Optuna trials per (domain, site)")
    ts.add_argument("--seed", type=int, default=0, help="sampler seed")
    _nvae_parser(sub)
    args = parser.parse_args(argv)
    if args.command == "nvae":
        return _nvae(args)
    if args.command == "translate-study":
        return _translate_study(args)
    if args.command == "demo":
        from .demo import run

        return 0 if run(seed=args.seed, steps=args.steps) else 1
    if args.command == "study":
        return _study(args)
    return 2  # pragma: no cover - argparse rejects unknown commands


def _study(args) -> int:
    from .common.data import default_data_dir
    from .sentiment.report import headline, summary_markdown, write_outputs
    from .sentiment.study import StudyConfig, run_study

    try:
        data = Path(args.data) if args.data else default_data_dir()
    except FileNotFoundError:
        data = Path("../shared/data")
    if not (data / "reviews").is_dir():
        return _refuse("study", f"no reviews/ folder under {data}. Point --data (or $NVFORMER_DATA) at the data folder "
                                "that holds reviews/ (see ../shared/data/README.md).")
    model_dir, error = _model_dir("study", args.model)
    if error:
        return _refuse("study", error)
    kw = {"model_dir": model_dir, "data_dir": str(data), "seed": args.seed, "split_seed": args.split_seed}
    if args.targets:
        kw["targets"] = tuple(t.strip() for t in args.targets.split(","))
    try:
        cfg = StudyConfig.demo(**kw) if args.budget == "demo" else StudyConfig.full(**kw)
    except ValueError as e:
        return _refuse("study", str(e))
    out = Path(args.out or f"runs/study-{args.budget}")
    result = run_study(cfg, out)
    write_outputs(result, out)
    print(summary_markdown(result))
    if cfg.frozen:
        print(summary_markdown(result, "frozen"))
    print(headline(result))
    print(f"({result.info['seconds']:.0f} s; tables, plots, results.json and logits.safetensors in {out}/)")
    return 0


def _translate_study(args) -> int:
    from dataclasses import replace

    from .translation.report import study_markdown
    from .translation.study import TranslationStudyConfig, run_translation_study

    over = {k: v for k, v in (("n_dev", args.n_dev), ("n_test", args.n_test), ("trials", args.trials)) if v is not None}
    if args.domains:
        over["domains"] = tuple(d.strip() for d in args.domains.split(","))
    if args.sites:
        over["sites"] = tuple(s.strip() for s in args.sites.split(","))
    model_dir, error = _model_dir("translate-study", args.model)
    if error:
        return _refuse("translate-study", error)
    try:
        cfg = replace(TranslationStudyConfig(tune_seed=args.seed), **over)
    except ValueError as e:
        return _refuse("translate-study", str(e))
    res = run_translation_study(cfg, args.out, model_dir=model_dir)
    print(study_markdown(res))
    print(f"({res['seconds'] / 60:.1f} min; results.json and summary.md in {args.out}/)")
    return 0


def _nvae_parser(sub) -> None:
    nv = sub.add_parser("nvae", help="train an NVAE (or a baseline) and encode / reconstruct / sample / interpolate with it", formatter_class=HelpFormatter)
    ops = nv.add_subparsers(dest="op", required=True)
    tr = ops.add_parser("train", help="train on WikiText-2 sentences or a text file (run under `torchrun --nproc_per_node N -m "
                                      "nvformer_studies.cli nvae train ...` for N processes; gloo on CPU)", formatter_class=HelpFormatter)
    tr.add_argument("--out", required=True, help="output folder: model, tokenizer, log.csv, checkpoint/ (resumed if present)")
    tr.add_argument("--bottleneck", choices=("nvib", "none", "pooled"), default="nvib", help="nvib = NVAE; none = autoencoder; pooled = Gaussian VAE")
    tr.add_argument("--texts", default=None, help="a text file, one sentence per line (default: WikiText-2 training sentences, split seed 0)")
    tr.add_argument("--vocab", type=int, default=4000, help="BPE vocabulary trained on the training text")
    for name, typ, default in (("epochs", int, 6), ("batch-size", int, 64), ("lr", float, 1e-3), ("seed", int, 0), ("max-steps", int, None),
                               ("log-every", int, 50), ("save-every", int, 500)):
        tr.add_argument(f"--{name}", type=typ, default=default)
    for name, typ, default in (("d-model", int, 128), ("heads", int, 4), ("encoder-layers", int, 2), ("decoder-layers", int, 2), ("ffn", int, 512),
                               ("dropout", float, 0.1), ("max-length", int, 64), ("lambda-g", float, 0.1), ("lambda-d", float, 0.1),
                               ("delta", float, 1.0), ("kappa", int, 1), ("warmup", int, 400), ("cycle", int, 300)):
        tr.add_argument(f"--{name}", type=typ, default=default)
    tr.add_argument("--schedule", choices=("constant", "monotonic", "cyclic"), default="monotonic", help="KL annealing")
    tr.add_argument("--cpu", action="store_true", help="force the CPU even when an accelerator is available")
    tr.add_argument("--no-progress", action="store_true")
    for op, text in (("encode", "print the latent of each sentence (vectors kept, pseudo-counts)"), ("reconstruct", "greedy reconstructions")):
        o = ops.add_parser(op, help=text, formatter_class=HelpFormatter)
        o.add_argument("model")
        o.add_argument("sentences", nargs="+")
    sa = ops.add_parser("sample", help="decode latents drawn from the prior", formatter_class=HelpFormatter)
    sa.add_argument("model")
    sa.add_argument("-n", type=int, default=5)
    sa.add_argument("--seed", type=int, default=0)
    ip = ops.add_parser("interpolate", help="decode along t between two sentences", formatter_class=HelpFormatter)
    ip.add_argument("model")
    ip.add_argument("a")
    ip.add_argument("b")
    ip.add_argument("--steps", type=int, default=5, help="number of t values from 0 to 1")


def _nvae(args) -> int:
    import torch

    from .nvae import training as vae

    if args.op == "train":
        from nvformer.models import NVAE, NVAEConfig

        from .common.tokenizer import train_tokenizer

        if args.texts:
            texts = [s.strip() for s in open(args.texts, encoding="utf-8") if s.strip()]
        else:
            texts = vae.wikitext_sentences(seed=0)["train"]
        tok = train_tokenizer(texts, args.vocab)
        cfg = NVAEConfig(vocab_size=len(tok), bottleneck=args.bottleneck, d_model=args.d_model, heads=args.heads,
                         encoder_layers=args.encoder_layers, decoder_layers=args.decoder_layers, ffn=args.ffn, dropout=args.dropout,
                         max_length=args.max_length, lambda_g=args.lambda_g, lambda_d=args.lambda_d, delta=args.delta, kappa=args.kappa,
                         schedule=args.schedule, warmup=args.warmup, cycle=args.cycle)
        tcfg = vae.TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed, max_steps=args.max_steps,
                               log_every=args.log_every, save_every=args.save_every)
        torch.manual_seed(args.seed)
        summary = vae.train(NVAE(cfg), tok, texts, args.out, tcfg, show_progress=not args.no_progress, cpu=args.cpu)
        print(f"{summary['steps']} steps on {summary['processes']} process(es) in {summary['seconds']:.0f} s; last log: {summary['last']}")
        return 0
    model, tok, _ = vae.load_model(args.model)
    if args.op in ("encode", "reconstruct"):
        x, m = vae.pad_batch(vae.encode_texts(tok, args.sentences, model.config.max_length), model.config.pad_id)
        if args.op == "reconstruct":
            for s, r in zip(args.sentences, tok.batch_decode(model.reconstruct(x, m), skip_special_tokens=True)):
                print(f"{s}\n  -> {r}")
            return 0
        memory, kl_g, kl_d = model.encode(x, m)
        for i, s in enumerate(args.sentences):
            n = int(m[i].sum())
            if memory.latent is not None:
                lat = memory.latent
                a = lat.log_alpha[i, 1 : n + 1].exp()
                kept = int(torch.isfinite(lat.log_pi[i, 1 : n + 1]).sum())
                print(f"{s}\n  {n} tokens, {kept} vectors kept, pseudo-counts {[round(float(v), 3) for v in a]}, "
                      f"KL_G {float(kl_g[i]):.3f}, KL_D {float(kl_d[i]):.3f}")
            else:
                z = memory.z[i, :n] if memory.pad is not None else memory.z[i]
                print(f"{s}\n  {z.shape[0]} vector(s) of width {z.shape[1]}, norm {float(z.norm(dim=-1).mean()):.3f}, KL {float(kl_g[i]):.3f}")
        return 0
    if args.op == "sample":
        for s in tok.batch_decode(model.sample_prior(args.n, torch.Generator().manual_seed(args.seed)), skip_special_tokens=True):
            print(s)
        return 0
    if args.steps < 2:
        raise SystemExit("nvformer-studies nvae interpolate: --steps must be >= 2")
    ts = [k / (args.steps - 1) for k in range(args.steps)]
    xa, ma = vae.pad_batch(vae.encode_texts(tok, [args.a], model.config.max_length), model.config.pad_id)
    xb, mb = vae.pad_batch(vae.encode_texts(tok, [args.b], model.config.max_length), model.config.pad_id)
    for t, rows in zip(ts, model.interpolate(xa, xb, ts, ma, mb)):
        print(f"t={t:.2f}  {tok.decode(rows[0], skip_special_tokens=True)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

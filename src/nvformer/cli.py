"""The ``nvformer`` command line: NV post-training regularisation of your own model on your own data.

::

    nvformer prior    --model DIR --data FILE --out ADAPTER                        # empirical prior, identity knobs
    nvformer tune     --model DIR --adapter ADAPTER --task T --validation FILE --out ADAPTER2   # choose the knobs
    nvformer evaluate --model DIR [--adapter ADAPTER] --task T --data FILE         # original vs NV, paired bootstrap

A thin layer over the library (:func:`nvformer.estimate_prior`, :func:`nvformer.convert`,
:func:`nvformer.save_adapter`, :func:`nvformer.load_adapter`, :func:`nvformer.tune`,
:mod:`nvformer.tasks`, :func:`nvformer.metrics.paired_bootstrap`, :mod:`nvformer.files`).

Every argument is checked before a model is loaded: paths, columns, labels, sites, ranges,
counts, the adapter's JSON and whether it fits the model (the model's attention modules are found
on an instance built on the ``meta`` device: no weights are read). Bad input is one line on stderr
and exit code 2, never a traceback (``NVFORMER_TRACEBACK=1`` shows it); a failure that is no
input error (a bug) is one line and exit code 1. ``transformers``, ``datasets`` and ``optuna`` are
imported only when a command runs, so ``nvformer --help`` is quick.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import __version__
from ._progress import progress
from .api import nv_modules
from .config import SITES
from .files import DataFileError, check_data_file, read_columns
from .tasks import TASKS, Task

__all__ = ["CLIError", "build_parser", "main"]

GENERATION_METRICS = ("bleu", "chrf")  # metrics that generate text (greedy decoding)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                   "source.spm", "sentencepiece.bpe.model")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
EXPECTED = (ValueError, OSError, KeyError, IndexError, RuntimeError, ImportError)  # failures of input: exit code 2


class CLIError(Exception):
    """Bad input: printed as one line on stderr, exit code 2."""

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


# ---------------------------------------------------------------------------------------------- the parser


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (raised as :class:`CLIError`, not printed with the usage)."""

    def error(self, message: str):  # type: ignore[override]
        raise CLIError(f"{message} (see {self.prog} --help)", self.prog)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default: ``(default: X)``, ``(required)`` or ``(default: off)``."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=min(110, max(80, _terminal_width())))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "(default: " in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if action.required:
            return f"{text} (required)"
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        d = action.default
        if isinstance(d, (tuple, list)):
            shown = " ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in d)
        elif d is None:
            shown = "none"
        else:
            shown = str(d)
        return f"{text} (default: {shown})"


def _terminal_width() -> int:
    try:
        return os.get_terminal_size().columns
    except OSError:
        return 100


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _sites(text: str) -> tuple[str, ...]:
    """A comma list of sites (``encoder,cross``)."""
    sites = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in sites if s not in SITES]
    if bad or not sites:
        raise argparse.ArgumentTypeError(f"unknown site(s) {', '.join(map(repr, bad)) or '(none given)'}; sites are {', '.join(SITES)}")
    return tuple(dict.fromkeys(sites))


def _metrics(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
    if not names:
        raise argparse.ArgumentTypeError("no metric given")
    return names


FIT_OBJECTIVES = ("nll", "entropy", "information_maximisation")


def _fit_knobs(text: str) -> tuple[str, ...]:
    from .config import KNOBS

    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in names if x not in KNOBS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"knobs are {', '.join(KNOBS)}, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    """The ``nvformer`` parser (subcommands ``prior``, ``tune``, ``evaluate``)."""
    parser = _Parser(prog="nvformer", formatter_class=_Formatter,
                     description="Nonparametric variational (NV) attention for your own Hugging Face model: estimate the empirical "
                                 "prior from source text (prior), choose the knobs on target data (tune), compare with the "
                                 "original model (evaluate).")
    parser.add_argument("--version", action="version", version=f"nvformer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{prior,tune,evaluate}", parser_class=_Parser)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=_Formatter)

    def model_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, metavar="DIR",
                       help="a local model folder that from_pretrained reads: config.json, weights and tokenizer files")

    def reading(p: argparse.ArgumentParser, seeded: str, target_default: str | None = "target") -> None:
        g = p.add_argument_group("data columns and size")
        g.add_argument("--text-column", default="text", metavar="C", help="the input text column (a .txt file has one column: text)")
        if target_default is not None:
            g.add_argument("--label-column", default="label", metavar="C",
                           help="classification: the label column (class indices, or names in the model's config.label2id)")
            g.add_argument("--target-column", default=target_default, metavar="C", help="seq2seq: the target (reference) text column")
        else:
            g.add_argument("--target-column", default=None, metavar="C",
                           help="the target text column that feeds the decoder (default: none; required for encoder-decoder models)")
        g.add_argument("--max-examples", type=_positive_int, default=None, metavar="N",
                       help="use a random subset of N rows (seeded by --seed), kept in file order (default: all rows)")
        g.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="examples per forward pass")
        g.add_argument("--max-length", type=_positive_int, default=128, metavar="N", help="truncate texts (and targets) to N tokens")
        g.add_argument("--seed", type=int, default=0, metavar="N", help=f"seeds the row subset{seeded}")

    def task_args(p: argparse.ArgumentParser, metric_help: str, metric_type=str) -> None:
        p.add_argument("--task", required=True, choices=sorted(TASKS), help="what the model does and how it is scored")
        p.add_argument("--metric", type=metric_type, default=None, metavar="M", help=metric_help)

    # prior
    p = command("prior", "estimate the empirical prior of every attention module from source text; write an NV adapter at the "
                         "identity knobs (the converted model computes what the original does)")
    model_arg(p)
    p.add_argument("--data", required=True, metavar="FILE", help="source text: a csv, tsv, json, jsonl, parquet or txt file")
    p.add_argument("--out", required=True, metavar="ADAPTER", help="the adapter folder to write (nvformer.json, nvformer.safetensors)")
    p.add_argument("--sites", type=_sites, default=None, metavar="S",
                   help=f"comma list of attention sites to convert ({', '.join(SITES)}) (default: every site the model has)")
    reading(p, "", target_default=None)

    # tune
    p = command("tune", "choose the NV knobs (alpha_tau, stdev_tau) on the target's validation data, by an Optuna search "
                        "(--method search: trials.csv, best.json, plots) or fitted by gradient (--method fit: per site or layer, "
                        "labelled or label-free objectives; fit.json, plots); write the adapter at the chosen knobs")
    model_arg(p)
    p.add_argument("--adapter", required=True, metavar="ADAPTER", help="the prior adapter written by `nvformer prior`")
    task_args(p, "the objective: classification accuracy|nll|macro_f1|ece, causal-lm perplexity|nll, seq2seq "
                 "nll|perplexity|chrf|bleu (chrf/bleu generate greedily) (default: the task's first: accuracy, perplexity, nll)")
    p.add_argument("--validation", required=True, metavar="FILE", help="target validation data: csv, tsv, json, jsonl, parquet or txt")
    p.add_argument("--out", required=True, metavar="ADAPTER2",
                   help="output folder: the adapter at the best knobs, trials.csv, best.json, history.png, knobs.png "
                        "(and study.db without --storage: rerun with more --trials to resume)")
    p.add_argument("--method", choices=("search", "fit"), default="search",
                   help="search: Optuna over knob settings (forward passes only); fit: gradient descent on the knobs (nvformer.fit_knobs)")
    g = p.add_argument_group("fit (--method fit)")
    g.add_argument("--objective", choices=FIT_OBJECTIVES, default="nll",
                   help="minimised on the validation data: nll (needs labels; a causal LM's NLL of the text itself is label-free), "
                        "entropy or information_maximisation (label-free: the labels are not read; classification and causal-lm)")
    g.add_argument("--groups", choices=("site", "layer", "head"), default="layer",
                   help="one knob setting per site, per layer, or alpha_tau and stdev_tau per key/value head of every layer")
    g.add_argument("--fit-knobs", type=_fit_knobs, default="alpha_tau,stdev_tau", metavar="K",
                   help="comma list of the knobs fitted (alpha_tau, stdev_tau, mu_tau)")
    g.add_argument("--steps", type=_positive_int, default=50, metavar="N", help="Adam steps (at most: early stopping)")
    g.add_argument("--lr", type=_finite_float, default=0.3, metavar="X", help="Adam learning rate (nats, log stdev_tau, mu_tau)")
    g.add_argument("--to-identity", type=_finite_float, default=0, metavar="X", help="weight of the pull towards the identity knobs")
    g.add_argument("--holdout", type=_finite_float, default=0.25, metavar="F",
                   help="share of the validation rows held out (seeded by --seed) to choose the step and stop early")
    g.add_argument("--patience", type=_positive_int, default=3, metavar="N", help="held-out measurements without improvement before stopping")
    g = p.add_argument_group("search (--method search)")
    g.add_argument("--sites", type=_sites, default=None, metavar="S",
                   help="comma list of sites tuned separately, each with its own knobs (the others keep theirs); "
                        "(default: one setting shared by all of the adapter's sites)")
    g.add_argument("--per-layer", action="store_true", help="separate knobs per layer within each site")
    g.add_argument("--trials", type=_positive_int, default=50, metavar="N", help="Optuna trials (the first is the identity corner)")
    g.add_argument("--alpha-range", type=_finite_float, nargs=2, default=(-15.0, 10.0), metavar=("LO", "HI"),
                   help="range of alpha_tau (the authors' search)")
    g.add_argument("--stdev-range", type=_finite_float, nargs=2, default=(0.0, 0.5), metavar=("LO", "HI"), help="range of stdev_tau (>= 0)")
    g.add_argument("--mu-range", type=_finite_float, nargs=2, default=None, metavar=("LO", "HI"), help="range of mu_tau (default: none, mu_tau stays 1)")
    g.add_argument("--log-alpha", action="store_true", help="sample alpha_tau on a log scale (needs a positive --alpha-range)")
    g.add_argument("--sampler", choices=("tpe", "random"), default="tpe", help="Optuna sampler")
    g.add_argument("--storage", default=None, metavar="URL",
                   help="an Optuna RDB URL shared by several workers, e.g. sqlite:///study.db (default: OUT/study.db)")
    g.add_argument("--study", default="nvformer", metavar="NAME", help="the study's name in the storage")
    reading(p, " and the knob sampler")

    # evaluate
    p = command("evaluate", "print the metrics of the original model and of the NV model (with --adapter) side by side, with a "
                            "paired bootstrap confidence interval of the difference")
    model_arg(p)
    p.add_argument("--adapter", default=None, metavar="ADAPTER", help="an NV adapter (default: none, the original model's metrics only)")
    task_args(p, "comma list of metrics to add to the task's metrics that need no generation (seq2seq chrf, bleu generate "
                 "greedily) (default: none, those metrics only)", _metrics)
    p.add_argument("--data", required=True, metavar="FILE", help="evaluation data: csv, tsv, json, jsonl, parquet or txt")
    p.add_argument("--bootstrap", type=_positive_int, default=1000, metavar="N", help="bootstrap resamples (paired, over examples)")
    p.add_argument("--confidence", type=_finite_float, default=0.95, metavar="P", help="the confidence level of the interval")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    reading(p, " and the bootstrap")
    return parser


# ---------------------------------------------------------------------------------------------- checks (no model loaded)


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_range(option: str, values: Sequence[float] | None, minimum: float | None = None) -> tuple[float, float] | None:
    """A ``(low, high)`` option: finite, ``low <= high``, ``low >= minimum``."""
    if values is None:
        return None
    lo, hi = (float(v) for v in values)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise CLIError(f"{option} must be two finite numbers, got {lo:g} {hi:g}")
    if lo > hi:
        raise CLIError(f"{option} is reversed: LO {lo:g} > HI {hi:g}")
    if minimum is not None and lo < minimum:
        raise CLIError(f"{option} must be >= {minimum:g}, got LO {lo:g}")
    return lo, hi


def check_model_dir(path: str) -> Path:
    """A local model folder: exists, has config.json, weights and tokenizer files."""
    p = Path(path)
    if not p.exists():
        raise CLIError(f"--model {path}: no such folder")
    if not p.is_dir():
        raise CLIError(f"--model {path}: not a folder (give the folder that holds config.json, the weights and the tokenizer)")
    if not (p / "config.json").is_file():
        raise CLIError(f"--model {path}: no config.json (not a Hugging Face model folder)")
    if not any(next(p.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        raise CLIError(f"--model {path}: no weights (model.safetensors or pytorch_model.bin)")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise CLIError(f"--model {path}: no tokenizer files (tokenizer.json, tokenizer_config.json, vocab...); "
                       "save the tokenizer beside the model: tokenizer.save_pretrained(DIR)")
    return p


def check_data_path(option: str, path: str) -> Path:
    try:
        return check_data_file(path)
    except DataFileError as e:
        raise CLIError(f"{option} {e}") from None


def check_out(option: str, path: str, *, not_same_as: str | None = None) -> Path:
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CLIError(f"{option} {path}: exists and is not a folder")
    if not_same_as is not None and p.resolve() == Path(not_same_as).resolve():
        raise CLIError(f"{option} {path}: is the input adapter; write the tuned adapter to another folder")
    return p


def check_adapter(path: str) -> tuple[dict[str, Any], Any]:
    """``(metadata, NVConfig)`` of a valid adapter folder (the JSON checked strictly)."""
    from .adapter import read_adapter

    p = Path(path)
    if not p.exists():
        raise CLIError(f"--adapter {path}: no such folder")
    if not p.is_dir():
        raise CLIError(f"--adapter {path}: not a folder")
    try:
        meta, config = read_adapter(p)
    except ValueError as e:
        raise CLIError(f"--adapter {path}: {_strip_who(str(e))}") from None
    if meta["kind"] != "hf":
        raise CLIError(f"--adapter {path}: saved from a plain PyTorch model ({meta.get('architecture')}), not a Hugging Face model")
    check_adapter_priors(p, meta, path)
    return meta, config


def check_adapter_priors(folder: Path, meta: dict[str, Any], path: str) -> None:
    """Every NVIB's prior is in the adapter's tensors file, finite and of the module's width (kilobytes: cheap to read)."""
    from .adapter import read_tensors

    try:
        read_tensors(folder, meta)
    except ValueError as e:
        raise CLIError(f"--adapter {path}: {_strip_who(str(e))}") from None


def _strip_who(text: str) -> str:
    return text.split(": ", 1)[1] if text.startswith("nvformer.") and ": " in text else text


def load_config(model_dir: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:
        raise CLIError(f"--model {model_dir}: cannot read config.json ({_one_line(e)})") from None


def is_encoder_decoder(config) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def meta_model(config, auto_class: str, model_dir: Path, task: str | None = None):
    """The model class ``auto_class`` would load, built on the meta device: its modules, no weights."""
    import torch
    import transformers

    auto = getattr(transformers, auto_class)
    try:
        with torch.device("meta"):
            return auto.from_config(config)
    except Exception as e:
        kind = getattr(config, "model_type", "?")
        what = f"--task {task} ({auto_class})" if task else auto_class
        if str(e).startswith("Unrecognized configuration class"):
            raise CLIError(f"--model {model_dir}: transformers has no {auto_class} for a {kind} model ({what})") from None
        raise CLIError(f"--model {model_dir}: a {kind} model cannot be built for {what}: {_one_line(e, 300)}") from None


def model_sites(meta, model_dir: Path) -> tuple[str, ...]:
    """The attention sites of a (meta) model, in :data:`SITES` order."""
    from .hf.convert import attention_modules

    try:
        found = {site for *_, site in attention_modules(meta)}
    except ValueError as e:
        raise CLIError(f"--model {model_dir}: {_strip_who(str(e))}") from None
    if not found:
        raise CLIError(f"--model {model_dir}: {type(meta).__name__} has no attention module nvformer can convert")
    return tuple(s for s in SITES if s in found)


def check_sites(option: str, wanted: Sequence[str], present: Sequence[str], model_dir: Path) -> None:
    missing = [s for s in wanted if s not in present]
    if missing:
        raise CLIError(f"{option}: the model at {model_dir} has no {', '.join(map(repr, missing))} attention; its sites are {', '.join(present)}")


def check_adapter_fits(meta: dict[str, Any], config, model, adapter_path: str, model_dir: Path) -> tuple[str, ...]:
    """The adapter's modules (names relative to the base model) and widths must be the (meta) model's
    (:func:`nvformer.adapter.match_modules`). Returns the sites the adapter converted."""
    from .adapter import match_modules

    try:
        match_modules(model, meta, config)
    except ValueError as e:
        raise CLIError(f"--adapter {adapter_path}: made for another model than {model_dir}: {_strip_who(str(e))}") from None
    return tuple(s for s in SITES if any(e["site"] == s for e in meta["modules"].values()))


def check_positions(config, max_length: int, causal: bool, model_dir: Path) -> None:
    """``--max-length`` must fit the model's position embeddings (a causal LM also reads a BOS token)."""
    positions = getattr(config, "max_position_embeddings", None)
    need = max_length + (1 if causal else 0)
    if isinstance(positions, int) and need > positions:
        raise CLIError(f"--max-length {max_length} needs {need} positions but the model at {model_dir} has {positions}")


def check_task_model(task: Task, config, sites: Sequence[str] | None, model_dir: Path) -> None:
    """The task fits the model: seq2seq needs an encoder-decoder, causal-lm a causal model (``sites``
    from the meta model; None = check what the config alone tells)."""
    if task.name == "seq2seq" and not is_encoder_decoder(config):
        raise CLIError(f"--task seq2seq: the model at {model_dir} ({config.model_type}) is not an encoder-decoder")
    if task.name == "causal-lm" and sites is None and is_encoder_decoder(config):
        raise CLIError(f"--task causal-lm: the model at {model_dir} ({config.model_type}) is an encoder-decoder (use --task seq2seq)")
    if task.name == "causal-lm" and sites is not None and "decoder" not in sites:
        raise CLIError(f"--task causal-lm: the model at {model_dir} ({config.model_type}) is not a causal language model "
                       f"(its attention sites are {', '.join(sites)})")


def task_metric(task: Task, name: str | None) -> Any:
    try:
        return task.metric(name)
    except ValueError:
        raise CLIError(f"--metric {name}: task {task.name} has no such metric; its metrics are {', '.join(task.metrics)}") from None


def label_ids(values: Sequence[Any], config, column: str, path: Path, rows: Sequence[int] | None = None) -> list[int]:
    """Class indices of the labels: integers ``0..num_labels-1``, or names in ``config.label2id``
    (``rows``: the data row of each value, for the error message)."""
    n = int(getattr(config, "num_labels", 0) or 0)
    by_name = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    out = []
    for k, v in enumerate(values):
        idx = None
        if isinstance(v, bool):
            idx = int(v)
        elif isinstance(v, int):
            idx = v
        elif isinstance(v, float) and v.is_integer():
            idx = int(v)
        elif isinstance(v, str):
            s = v.strip()
            if s in by_name:
                idx = by_name[s]
            elif s.lstrip("+-").isdigit():
                idx = int(s)
        if idx is None or not 0 <= idx < n:
            classes = ", ".join(f"{i}={id2label[i]!r}" if i in id2label else str(i) for i in range(n))
            row = (rows[k] if rows is not None else k) + 1
            raise CLIError(f"{path}: label {v!r} (column {column!r}, data row {row}) is not one of the model's classes: {classes}")
        out.append(idx)
    return out


def _texts(values: Sequence[Any], column: str, path: Path, rows: Sequence[int]) -> list[str]:
    for k, v in enumerate(values):
        if not isinstance(v, str):
            raise CLIError(f"{path}: column {column!r} must hold text, data row {rows[k] + 1} has {type(v).__name__} {v!r}")
    return list(values)


@dataclass
class Examples:
    """Texts read from a data file (labels as class indices, targets as texts)."""

    path: Path
    texts: list[str]
    labels: list[int] | None = None
    targets: list[str] | None = None


def read_examples(path: Path, args, task: Task | None, config, *, targets: bool = False) -> Examples:
    """The columns a task (or the prior, ``task=None``) needs, checked."""
    cols = {args.text_column: "--text-column"}
    need_labels = task is not None and "label" in task.needs
    need_targets = targets or (task is not None and "target" in task.needs)
    if need_labels:
        cols[args.label_column] = "--label-column"
    if need_targets:
        cols[args.target_column] = "--target-column"
    try:
        rows = read_columns(path, list(cols), max_examples=args.max_examples, seed=args.seed, what=cols)
    except DataFileError as e:
        raise CLIError(str(e)) from None
    ex = Examples(path, _texts(rows[args.text_column], args.text_column, path, rows.rows))
    if need_labels:
        ex.labels = label_ids(rows[args.label_column], config, args.label_column, path, rows.rows)
    if need_targets:
        ex.targets = _texts(rows[args.target_column], args.target_column, path, rows.rows)
    return ex


# ---------------------------------------------------------------------------------------------- loading and scoring


def load_tokenizer(model_dir: Path, config):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:
        raise CLIError(f"--model {model_dir}: cannot load the tokenizer ({_one_line(e, 300)})") from None
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tok) > vocab:
        raise CLIError(f"--model {model_dir}: the tokenizer has {len(tok)} tokens but the model's vocabulary only {vocab}")
    return tok


def load_model(model_dir: Path, auto_class: str, *, warn_missing: str | None = None):
    """``auto_class.from_pretrained(model_dir)`` in float32, evaluation mode (a failure is a :class:`CLIError`)."""
    import torch
    import transformers

    auto = getattr(transformers, auto_class)
    try:
        model, info = auto.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32, output_loading_info=True)
    except Exception as e:
        raise CLIError(f"--model {model_dir}: cannot load it as {auto_class} ({_one_line(e, 300)})") from None
    missing = sorted(info.get("missing_keys") or [])
    if warn_missing and missing:
        print(f"{warn_missing}: warning: {model_dir} has no weights for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
              "(randomly initialised: is it a model fine-tuned for this task?)", file=sys.stderr)
    return model.eval()


def prepare(task: Task | str, tokenizer, ex: Examples, args):
    """The :class:`~nvformer.tasks.TextBatches` of the examples (``task`` may be ``"encoder"``: texts only)."""
    from .tasks import classification_batches, lm_batches, seq2seq_batches

    name = task if isinstance(task, str) else task.name
    try:
        if name == "encoder":
            return classification_batches(tokenizer, ex.texts, None, batch_size=args.batch_size, max_length=args.max_length)
        if name == "causal-lm":
            return lm_batches(tokenizer, ex.texts, max_tokens=args.max_length, batch_size=args.batch_size)
        if name == "seq2seq":
            return seq2seq_batches(tokenizer, ex.texts, ex.targets, batch_size=args.batch_size, max_length=args.max_length)
        return classification_batches(tokenizer, ex.texts, ex.labels, batch_size=args.batch_size, max_length=args.max_length)
    except Exception as e:
        raise CLIError(f"{ex.path}: cannot tokenise it for {name} ({_one_line(e, 300)})") from None


class _Bar(list):
    """A list of batches that shows a progress bar while it is iterated."""

    def __init__(self, items, desc: str, enabled: bool) -> None:
        super().__init__(items)
        self.desc, self.enabled = desc, enabled

    def __iter__(self) -> Iterator:
        return iter(progress(list.__iter__(self), self.desc, self.enabled, total=len(self)))


def score(task: Task, model, data, tokenizer, names: Sequence[str], *, max_length: int, batch_size: int = 32, desc: str = "",
          bars: bool = False):
    """``{metric name: [N, K] per-example statistics}``: one pass for the metrics without generation,
    one greedy generation shared by chrF and BLEU."""
    from .tasks import generate_texts, sentence_stats

    out = {}
    plain = [n for n in names if n not in GENERATION_METRICS]
    if plain:
        rows = task.stats(model, replace(data, batches=_Bar(data.batches, desc, bars)), plain[0], tokenizer)
        out.update({n: rows for n in plain})
    gen = [n for n in names if n in GENERATION_METRICS]
    if gen:
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        new = min(max_length, positions - 1) if isinstance(positions, int) else max_length
        hyps = generate_texts(model, tokenizer, data.sources, batch_size=batch_size, max_new_tokens=max(1, new), max_length=max_length)
        for n in gen:
            out[n] = sentence_stats(n, hyps, data.references)
    return out


def _bars() -> bool:
    return sys.stderr.isatty()


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence transformers' loading reports and progress bars while a command runs (restored afterwards)."""
    try:
        from transformers.utils import logging as tlog
    except ImportError:  # pragma: no cover - the hf extra is missing; the command will say so
        yield
        return
    verbosity, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(verbosity)
        if bars:
            tlog.enable_progress_bar()


def _fmt(x: float) -> str:
    return f"{x:.6g}"


# ---------------------------------------------------------------------------------------------- prior


def cmd_prior(args) -> int:
    import nvformer as nv

    model_dir = check_model_dir(args.model)
    data_path = check_data_path("--data", args.data)
    out = check_out("--out", args.out)
    config = load_config(model_dir)
    enc_dec = is_encoder_decoder(config)
    if enc_dec and args.target_column is None:
        raise CLIError(f"--target-column is required: the model at {model_dir} ({config.model_type}) is an encoder-decoder "
                       "and its decoder reads target text")
    auto = "AutoModelForSeq2SeqLM" if enc_dec else "AutoModel"
    present = model_sites(meta_model(config, auto, model_dir), model_dir)
    sites = args.sites or present
    check_sites("--sites", sites, present, model_dir)
    kind = "seq2seq" if enc_dec else ("causal-lm" if "decoder" in present else "encoder")
    check_positions(config, args.max_length, kind == "causal-lm", model_dir)
    ex = read_examples(data_path, args, None, config, targets=enc_dec)
    tokenizer = load_tokenizer(model_dir, config)
    data = prepare(kind, tokenizer, ex, args)
    model = load_model(model_dir, auto)
    priors = nv.estimate_prior(model, data.batches, show_progress=_bars())
    nv.convert(model, prior=priors, sites=tuple(sites))
    nv.save_adapter(model, out)
    n_modules = len(nv_modules(model))
    print(f"nvformer prior: {n_modules} attention modules (sites: {', '.join(sites)}) of {type(model).__name__}, prior from "
          f"{len(ex.texts)} texts of {data_path}; adapter at the identity knobs written to {out}")
    return 0


# ---------------------------------------------------------------------------------------------- tune


def knob_space(args):
    from .tuning.space import KnobSpace

    alpha = check_range("--alpha-range", args.alpha_range)
    stdev = check_range("--stdev-range", args.stdev_range, minimum=0.0)
    mu = check_range("--mu-range", args.mu_range)
    if args.log_alpha and alpha[0] <= 0:
        raise CLIError(f"--log-alpha needs a positive --alpha-range, got {alpha[0]:g} {alpha[1]:g}")
    try:
        return KnobSpace(sites=args.sites, per_layer=args.per_layer, alpha_tau=alpha, stdev_tau=stdev, mu_tau=mu, log_alpha=args.log_alpha)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _task_setup(args, task: Task, data_option: str, data_arg: str):
    """Checks shared by tune and evaluate; returns ``(model_dir, data_path, config, meta model, sites)``."""
    model_dir = check_model_dir(args.model)
    data_path = check_data_path(data_option, data_arg)
    config = load_config(model_dir)
    check_task_model(task, config, None, model_dir)
    meta = meta_model(config, task.auto_class, model_dir, task.name)
    present = model_sites(meta, model_dir)
    check_task_model(task, config, present, model_dir)
    check_positions(config, args.max_length, task.name == "causal-lm", model_dir)
    return model_dir, data_path, config, meta, present


def cmd_tune(args) -> int:
    import torch

    import nvformer as nv

    task = TASKS[args.task]
    metric = task_metric(task, args.metric)
    space = knob_space(args)
    if args.method == "fit":
        _check_fit_args(args, task)
    if args.storage is not None and "://" not in args.storage:
        raise CLIError(f"--storage {args.storage}: not an Optuna RDB URL (e.g. sqlite:///study.db, postgresql://...)")
    adapter_meta, adapter_config = check_adapter(args.adapter)
    model_dir, data_path, config, meta, present = _task_setup(args, task, "--validation", args.validation)
    out = check_out("--out", args.out, not_same_as=args.adapter)
    adapter_sites = check_adapter_fits(adapter_meta, adapter_config, meta, args.adapter, model_dir)
    if args.sites:
        check_sites("--sites", args.sites, present, model_dir)
        missing = [s for s in args.sites if s not in adapter_sites]
        if missing:
            raise CLIError(f"--sites: the adapter {args.adapter} has no NV module at {', '.join(map(repr, missing))} (its sites: "
                           f"{', '.join(adapter_sites)}); estimate the prior with `nvformer prior --sites ...`")
    ex = read_examples(data_path, args, task, config)
    tokenizer = load_tokenizer(model_dir, config)
    data = prepare(task, tokenizer, ex, args)
    torch.manual_seed(args.seed)
    model = load_model(model_dir, task.auto_class, warn_missing="nvformer tune")
    nv.load_adapter(model, args.adapter)
    cheap = [n for n in task.metrics if n not in GENERATION_METRICS]

    def objective(m) -> float:
        return metric(score(task, m, data, tokenizer, [metric.name], max_length=args.max_length, batch_size=args.batch_size)[metric.name])

    def report(m) -> dict[str, float]:
        stats = score(task, m, data, tokenizer, cheap, max_length=args.max_length, batch_size=args.batch_size)
        return {n: task.metrics[n](stats[n]) for n in cheap}

    if args.method == "fit":
        return _fit(args, task, metric, model, data, tokenizer, ex, data_path, out, report)
    try:
        result = nv.tune(model, objective, space=space, n_trials=args.trials, direction=metric.direction, storage=args.storage,
                         study_name=args.study, seed=args.seed, sampler=args.sampler, out_dir=out, report=report, show_progress=_bars())
    except ValueError as e:  # an existing study searched another space or direction
        if "`space`" not in str(e) and "`direction`" not in str(e):
            raise
        raise CLIError(_strip_who(str(e)).replace("`study_name` (or out_dir)", "--study NAME (or another --out)")) from None
    nv.save_adapter(model, out)
    knobs = ", ".join(f"{k}={v:.4g}" for k, v in result.best_params.items())
    identity = "" if result.identity_value is None else f" (identity knobs: {_fmt(result.identity_value)})"
    print(f"nvformer tune: best {metric.name} {_fmt(result.best_value)}{identity} on {len(ex.texts)} examples of {data_path} "
          f"after {sum(t['state'] == 'COMPLETE' for t in result.trials)} trials; knobs {knobs}")
    print(f"adapter at the best knobs, trials.csv, best.json and plots written to {out}")
    return 0


def _check_fit_args(args, task: Task) -> None:
    """The --method fit options, checked before anything is loaded."""
    if args.objective in ("entropy", "information_maximisation") and task.name == "seq2seq":
        raise CLIError(f"--objective {args.objective}: label-free objectives need predictions without targets; seq2seq fits nll only")
    if not 0.0 < args.holdout < 1.0:
        raise CLIError(f"--holdout must lie in (0, 1), got {args.holdout:g}")
    if args.lr <= 0:
        raise CLIError(f"--lr must be > 0, got {args.lr:g}")
    if args.to_identity < 0:
        raise CLIError(f"--to-identity must be >= 0, got {args.to_identity:g}")


def fit_batches(task: Task, data) -> list[dict]:
    """The model-input batches with what the objective reads: classification labels in batch order,
    a causal LM's own tokens as labels (padding -100); seq2seq batches already carry labels."""
    import torch

    from .tasks import labelled_batches

    out = labelled_batches(data, task.name)
    if task.name == "classification" and any(int(b["labels"].min()) < 0 for b in out):
        raise CLIError("classification labels must be class indices")
    return [{k: v for k, v in b.items() if isinstance(v, torch.Tensor)} for b in out]


def _fit(args, task: Task, metric, model, data, tokenizer, ex, data_path, out, report) -> int:

    import nvformer as nv

    from .tasks import batch_on, holdout_split, model_device
    from .tuning.report import write_fit_outputs

    batches = fit_batches(task, data)
    if len(batches) < 2:
        raise CLIError(f"{data_path}: {len(ex.texts)} rows make {len(batches)} batch of --batch-size {args.batch_size}; fitting holds "
                       "out a share of the batches: use a smaller --batch-size or more rows")
    held_idx, fit_idx = holdout_split(len(batches), args.holdout, args.seed)
    device = model_device(model)
    held = [batch_on(batches[i], device) for i in held_idx]
    fit_on = [batch_on(batches[i], device) for i in fit_idx]
    label_free = args.objective != "nll" or task.name == "causal-lm"
    if args.objective != "nll":
        fit_on = [{k: v for k, v in b.items() if k != "labels"} for b in fit_on]
        held = [{k: v for k, v in b.items() if k != "labels"} for b in held]
    before = report(model)
    result = nv.fit_knobs(model, fit_on, args.objective, groups=args.groups, knobs=args.fit_knobs, steps=args.steps, lr=args.lr,
                          to_identity=args.to_identity, validation=held, patience=args.patience, show_progress=_bars())
    after = report(model)
    nv.save_adapter(model, out)
    write_fit_outputs(result, out)
    (out / "fit_report.json").write_text(json.dumps({"before": before, "after": after, "objective": args.objective,
                                                     "label_free": label_free, "batches": {"fit": len(fit_on), "held_out": len(held)}}, indent=2))
    metrics = ", ".join(f"{n} {_fmt(before[n])} -> {_fmt(after[n])}" for n in before)
    stayed = " (no step beat the starting knobs on the held-out batches: kept them)" if result.best_step == 0 else ""
    print(f"nvformer tune --method fit: {args.objective} on {len(fit_on)} batches, held-out {_fmt(result.initial_value)} -> "
          f"{_fmt(result.best_value)} at step {result.best_step} of {result.steps}{stayed}; on all {len(ex.texts)} rows of {data_path}: "
          f"{metrics}; {result.forward_equivalents:.0f} forward equivalents, {result.seconds:.1f} s")
    print(f"adapter at the fitted knobs, fit.json, fit_report.json and plots written to {out}")
    return 0


# ---------------------------------------------------------------------------------------------- evaluate


def evaluate_metrics(task: Task, chosen: Sequence[str] | None) -> list[str]:
    """The task's metrics that need no generation, then the chosen ones."""
    names = [n for n in task.metrics if n not in GENERATION_METRICS]
    for n in chosen or ():
        task_metric(task, n)
        if n not in names:
            names.append(n)
    return names


def compare(task: Task, names: Sequence[str], original: dict, nv_stats: dict | None, *, n_resamples: int, seed: int,
            confidence: float) -> dict[str, dict[str, float]]:
    """Per metric: the original value, and with NV statistics the NV value, the difference and its paired bootstrap interval."""
    out = {}
    for n in names:
        m = task.metrics[n]
        row: dict[str, Any] = {"direction": m.direction, "original": m(original[n])}
        if nv_stats is not None:
            boot = m.compare(original[n], nv_stats[n], n_resamples=n_resamples, confidence=confidence, seed=seed)
            row.update({"nv": m(nv_stats[n]), "diff": m(nv_stats[n]) - row["original"], "low": boot["low"], "high": boot["high"]})
        out[n] = row
    return out


def format_table(metrics: dict[str, dict[str, float]], confidence: float) -> str:
    """The side-by-side table of :func:`compare` (values to 6 significant digits)."""
    with_nv = any("nv" in r for r in metrics.values())
    head = ["metric", "original"] + (["NV", "NV - original", f"{confidence:.0%} CI"] if with_nv else [])
    rows = [head]
    for n, r in metrics.items():
        arrow = "higher is better" if r["direction"] == "maximize" else "lower is better"
        line = [f"{n} ({arrow})", _fmt(r["original"])]
        if with_nv:
            line += [_fmt(r["nv"]), f"{r['diff']:+.6g}", f"[{r['low']:+.6g}, {r['high']:+.6g}]"]
        rows.append(line)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows)


def cmd_evaluate(args) -> int:
    import torch

    import nvformer as nv

    task = TASKS[args.task]
    names = evaluate_metrics(task, args.metric)
    if not 0 < args.confidence < 1:
        raise CLIError(f"--confidence must be between 0 and 1, got {args.confidence:g}")
    adapter = check_adapter(args.adapter) if args.adapter is not None else None
    model_dir, data_path, config, meta, present = _task_setup(args, task, "--data", args.data)
    if adapter is not None:
        check_adapter_fits(*adapter, meta, args.adapter, model_dir)
    ex = read_examples(data_path, args, task, config)
    tokenizer = load_tokenizer(model_dir, config)
    data = prepare(task, tokenizer, ex, args)
    torch.manual_seed(args.seed)
    model = load_model(model_dir, task.auto_class, warn_missing="nvformer evaluate")
    bars = _bars()
    original = score(task, model, data, tokenizer, names, max_length=args.max_length, batch_size=args.batch_size, desc="original", bars=bars)
    nv_stats, knobs = None, None
    if adapter is not None:
        nv.load_adapter(model, args.adapter)
        nv_stats = score(task, model, data, tokenizer, names, max_length=args.max_length, batch_size=args.batch_size, desc="NV", bars=bars)
        knobs = {k: v.as_dict() for k, v in nv.get_config(model).knobs.items()}
    metrics = compare(task, names, original, nv_stats, n_resamples=args.bootstrap, seed=args.seed, confidence=args.confidence)
    if args.json:
        print(json.dumps({"task": task.name, "model": str(model_dir), "adapter": args.adapter, "data": str(data_path),
                          "n_examples": len(ex.texts), "knobs": knobs,
                          "bootstrap": {"n_resamples": args.bootstrap, "confidence": args.confidence, "seed": args.seed},
                          "metrics": metrics}, indent=2))
        return 0
    what = f"{model_dir} with adapter {args.adapter}" if adapter is not None else f"{model_dir}"
    print(f"{task.name}: {what} on {len(ex.texts)} examples of {data_path}")
    if knobs is not None:
        print("NV knobs: " + "; ".join(f"{k}: " + ", ".join(f"{n}={v:.4g}" for n, v in d.items()) for k, d in knobs.items()))
    print(format_table(metrics, args.confidence))
    if adapter is not None:
        print(f"(paired bootstrap over examples, {args.bootstrap} resamples, seed {args.seed})")
    return 0


# ---------------------------------------------------------------------------------------------- main

COMMANDS = {"prior": cmd_prior, "tune": cmd_tune, "evaluate": cmd_evaluate}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``nvformer`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    prog = "nvformer"
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help, --version
            return int(e.code or 0) if not isinstance(e.code, str) else 2
        prog = f"nvformer {args.command}"
        with _quiet_libraries():
            return COMMANDS[args.command](args)
    except CLIError as e:
        print(f"{e.prog or prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("NVFORMER_TRACEBACK"):
            raise
        code = 2 if isinstance(e, EXPECTED) else 1
        hint = "" if code == 2 else " (a bug? NVFORMER_TRACEBACK=1 shows where)"
        print(f"{prog}: error: {type(e).__name__}: {_one_line(_strip_who(str(e)))}{hint}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())

"""The command line of the scripts in experiments/ and benchmarks/: one parser with the options
they share, every option's help showing its default."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["HelpFormatter", "ScriptParser", "comma_choices", "doc_dirs", "positive_int", "publish", "script_parser", "set_threads"]


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and ``(default: ...)`` after every option's help (also options without one)."""

    def add_argument(self, action: argparse.Action) -> None:
        if action.help is None and action.option_strings and action.default is not argparse.SUPPRESS:
            action.help = "(default: %(default)s)"
        super().add_argument(action)


class ScriptParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``prog: error: ...``, exit code 2), without the usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (anything else is the parser's one-line error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def comma_choices(parser: argparse.ArgumentParser, text: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    """The comma list ``text`` of option ``option``, each item one of ``allowed`` (in the given order);
    an unknown item or an empty list is the parser's one-line error."""
    chosen = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in chosen if x not in allowed]
    if bad or not chosen:
        parser.error(f"{option}: unknown {', '.join(bad) or 'empty list'}; choose from {', '.join(allowed)}")
    return chosen


def script_parser(doc: str | None, root: Path, *, run: str | None = None, doc_file: str = "RESULTS.md", doc_option: str = "--results",
                  no_results: bool = False, reuse: bool | str = False, smoke: bool | str = False, threads: bool = False,
                  repeats: int | None = None) -> argparse.ArgumentParser:
    """A parser for a script of the repository at ``root`` with the shared options.

    Args:
        run: the run folder's name under ``root/runs`` (``--out``: cached models and results).
        doc_file, doc_option: the doc under ``root/docs`` whose section the script writes, and the
            option naming it (``--results``; benchmarks: ``--out``).
        no_results: add ``--no-results`` (compute, print, but do not write the doc).
        reuse, smoke: add ``--reuse`` (rewrite the section from the saved run) / ``--smoke`` (a tiny
            end-to-end run); a string replaces the option's standard help.
        threads: add ``--threads``; repeats: add ``--repeats`` with this default.
    """
    p = ScriptParser(description=doc, formatter_class=HelpFormatter)
    if run is not None:
        p.add_argument("--out", default=str(root / "runs" / run), help="the run's folder (cached models, results.json)")
    p.add_argument(doc_option, default=str(root / "docs" / doc_file), help="the markdown file whose section this command writes")
    if no_results:
        p.add_argument("--no-results", action="store_true", help="print the section, do not write it")
    if reuse:
        p.add_argument("--reuse", action="store_true", help=reuse if isinstance(reuse, str) else "rewrite the section from OUT without rerunning")
    if smoke:
        p.add_argument("--smoke", action="store_true",
                       help=smoke if isinstance(smoke, str) else "tiny models and data (seconds; checks the command end to end)")
    if threads:
        p.add_argument("--threads", type=positive_int, default=None, help="torch threads (none: torch's choice)")
    if repeats is not None:
        p.add_argument("--repeats", type=int, default=repeats, help="timed repeats of each workload (interleaved; the median is reported)")
    return p


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` (if given) to torch."""
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)


def doc_dirs(args: argparse.Namespace) -> tuple[Path, Path | None]:
    """``(figures folder, CSV folder)`` of a script's section: the ``figures/`` and ``results/``
    folders beside ``--results`` (``docs/figures``, ``docs/results`` by default; the section links
    its figures relative to the markdown file); with ``--no-results`` the run's own ``OUT/figures``
    and no CSV."""
    if getattr(args, "no_results", False):
        return Path(args.out) / "figures", None
    return Path(args.results).parent / "figures", Path(args.results).parent / "results"


def publish(text: str, key: str, args: argparse.Namespace) -> None:
    """Print a section and write it into ``--results`` under ``key`` (not with ``--no-results``)."""
    from .docs import write_section

    print(text)
    if not getattr(args, "no_results", False):
        write_section(text, key, Path(args.results))

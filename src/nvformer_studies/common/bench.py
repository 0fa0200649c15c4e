"""What the benchmarks (``benchmarks/*.py``, docs/PERFORMANCE.md) share: interleaved timing and
the section writer (every table through ``docs/results/<section>.csv``, :mod:`.docs`)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .docs import Columns, table, write_section

__all__ = ["benchmark_section", "interleaved", "interleaved_runs", "peak_rss_bytes", "quartiles"]


def peak_rss_bytes() -> int:
    """Peak resident set of this process in bytes (VmHWM: per address space, so not inherited from the
    parent across fork+exec the way getrusage's ru_maxrss is); ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def interleaved_runs(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each zero-argument callable in each of ``repeats`` rounds, after one untimed warm-up round.
    Every round runs each once, back to back (a noisy machine then slows all of them alike); every other
    round runs them in reverse order, so that none always runs first, or right after the same one."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    items = list(fns.items())
    for r in range(repeats):
        for k, fn in items if r % 2 == 0 else reversed(items):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return times


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each zero-argument callable over ``repeats`` interleaved rounds (:func:`interleaved_runs`)."""
    return {k: statistics.median(v) for k, v in interleaved_runs(fns, repeats).items()}


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """``(first quartile, median, third quartile)`` of ``values`` (inclusive method; one value: itself three times)."""
    if len(values) == 1:
        return (values[0],) * 3
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def benchmark_section(title: str, command: str, setting: str, rows: Sequence[dict[str, Any]], columns: Columns, key: str,
                      out: Path, csv_dir: Path, note: str = "") -> str:
    """Print and write the ``key`` section of ``out``: a titled table of benchmark ``rows`` (raw
    measurements, through ``csv_dir/key.csv``) with the command, torch version and thread count it
    was measured with; returns the section text."""
    text = "\n".join([
        f"## {title}",
        "",
        f"Command: `.venv/bin/python {command}` ({setting}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"median of interleaved repeats; details in its docstring).{' ' + note if note else ''}",
        "",
        table(rows, columns, csv_dir, key),
        "",
    ])
    print(text)
    write_section(text, key, out)
    print(f"wrote {out}")
    return text

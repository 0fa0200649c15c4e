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

__all__ = ["benchmark_section", "interleaved", "peak_rss_bytes"]


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


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    """Median seconds of each zero-argument callable over ``repeats`` rounds; every round runs
    each once, in order (a noisy machine then slows all of them alike); one untimed warm-up round."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


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

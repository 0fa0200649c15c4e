"""Read a user's data file: any file Hugging Face ``datasets`` reads, as plain Python columns.

:func:`read_columns` loads a csv, json / jsonl, parquet or txt file (optionally compressed:
``.gz``, ``.bz2``, ``.xz``, ``.zst``) with ``datasets.load_dataset(<builder>, data_files=...,
split="train")``, checks that the wanted columns exist (an error names the columns the file
has), optionally draws a reproducible random subset of rows, and returns ``{column: list}``.

Nothing is left behind: the Arrow cache goes to a temporary folder removed afterwards (the rows
are kept in memory), and ``datasets``' progress bars and logging are silenced while it reads.
``datasets`` is imported on first use.
"""

from __future__ import annotations

import math
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["BUILDERS", "COMPRESSIONS", "Columns", "DataFileError", "builder_for", "check_data_file", "read_columns", "sample_rows"]

BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


class DataFileError(ValueError):
    """A data file that is missing, of an unknown kind, unreadable, or lacks a wanted column."""


def builder_for(path: str | Path) -> str:
    """The ``datasets`` builder of a file, from its extension (a compression suffix is skipped)."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext not in BUILDERS:
        kinds = ", ".join(sorted(BUILDERS))
        raise DataFileError(f"{path}: unknown data file kind {ext or '(no extension)'!r}; use one of {kinds} (optionally {', '.join(COMPRESSIONS)})")
    return BUILDERS[ext]


def check_data_file(path: str | Path) -> Path:
    """``path`` as a :class:`Path` if it is an existing file of a known kind, else :class:`DataFileError`."""
    p = Path(path)
    if not p.exists():
        raise DataFileError(f"{path}: no such file")
    if not p.is_file():
        raise DataFileError(f"{path}: not a file")
    builder_for(p)
    return p


def _load(path: Path):
    import datasets

    builder = builder_for(path)
    kwargs: dict[str, Any] = {"delimiter": "\t"} if builder == "csv" and ".tsv" in [s.lower() for s in path.suffixes] else {}
    bars = datasets.is_progress_bar_enabled()
    verbosity = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a parse failure is reported once, below
    try:
        with tempfile.TemporaryDirectory(prefix="nvformer-data-") as cache:
            return datasets.load_dataset(builder, data_files=str(path.resolve()), split="train", cache_dir=cache, keep_in_memory=True, **kwargs)
    except Exception as e:  # the file exists: anything datasets raises means it could not parse it
        reason = _reason(e)
        if "corresponds to no data" in reason:  # a header and no rows
            raise DataFileError(f"{path}: no rows") from None
        raise DataFileError(f"{path}: cannot read it as {builder} ({reason})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()


def _reason(e: BaseException) -> str:
    """The innermost cause of an exception, as one line."""
    while e.__cause__ is not None or (e.__context__ is not None and not e.__suppress_context__):
        e = e.__cause__ or e.__context__
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def sample_rows(n_rows: int, max_examples: int | None, seed: int = 0) -> list[int]:
    """Row indices: all rows, or a random subset of ``max_examples`` (seeded) kept in file order."""
    if max_examples is None or max_examples >= n_rows:
        return list(range(n_rows))
    return sorted(random.Random(seed).sample(range(n_rows), max_examples))


class Columns(dict):
    """``{column: values}``, and ``rows``: the data row (0-based, header excluded) of each value."""

    rows: list[int]


def read_columns(path: str | Path, columns: Sequence[str], *, max_examples: int | None = None, seed: int = 0,
                 what: dict[str, str] | None = None) -> Columns:
    """``{column: values}`` of the wanted ``columns`` of a data file (a :class:`Columns`).

    Args:
        path: a csv / tsv, json / jsonl, parquet or txt file (a txt file has one column, ``text``:
            one example per line).
        columns: the columns to return; a missing one is an error naming the file's columns.
        max_examples: keep a random subset of this many rows (``seed``), in file order.
        what: ``{column: option}`` used in error messages (``{"review": "--text-column"}``).

    Raises:
        DataFileError: a missing or unreadable file, a missing column, no rows, or an empty
            (null) value in a wanted column (naming the data row, counted from 1 below the header).
    """
    p = check_data_file(path)
    ds = _load(p)
    what = what or {}
    for c in columns:
        if c not in ds.column_names:
            hint = f" ({what[c]})" if c in what else ""
            raise DataFileError(f"{path}: no column {c!r}{hint}; its columns are {', '.join(map(repr, ds.column_names))}")
    if len(ds) == 0:
        raise DataFileError(f"{path}: no rows")
    if max_examples is not None and max_examples < 1:
        raise DataFileError(f"max_examples must be >= 1, got {max_examples}")
    rows = sample_rows(len(ds), max_examples, seed)
    out = Columns()
    out.rows = rows
    for c in dict.fromkeys(columns):
        values = list(ds[c])
        values = values if len(rows) == len(values) else [values[i] for i in rows]
        for i, v in enumerate(values):
            if v is None or (isinstance(v, float) and math.isnan(v)):
                raise DataFileError(f"{path}: column {c!r} has an empty value (data row {rows[i] + 1})")
        out[c] = values
    return out

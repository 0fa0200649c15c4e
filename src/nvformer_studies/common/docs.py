"""What a command writes into the docs: sections of docs/RESULTS.md and docs/PERFORMANCE.md, and
their tables.

Every table that goes into the docs passes through a CSV file, ``docs/results/<name>.csv`` (one per
table): :func:`table` writes the rows there and renders the markdown table from what it reads
back, so the docs show exactly the numbers of the machine-readable file. Values round-trip
exactly (floats are written as ``repr``, read back as the same float).

A table is rows (dicts of plain values: numbers, strings, None) and columns: ``{header: cell}``
(or ``(header, cell)`` pairs, where headers repeat) where a cell is a format template over the
row (``"{ratio:.3f} [{low:.3f}, {high:.3f}]"``; ``-`` when a field it names is None) or a function
of the row.
"""

from __future__ import annotations

import csv
import re
import string
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Cell", "Columns", "markdown_table", "read_csv", "table", "write_csv", "write_section"]

Cell = str | Callable[[dict[str, Any]], str]
Columns = Mapping[str, Cell] | Sequence[tuple[str, Cell]]


def write_section(text: str, key: str, path: Path) -> None:
    """Put ``text`` between ``<!-- key:start -->`` and ``<!-- key:end -->`` in the markdown file
    ``path`` (replacing what was there, or appended as a new section; the file is created with a
    title if missing)."""
    start, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    title = "# Results\n\nEvery number here is produced by the command named in its section.\n"
    doc = path.read_text() if path.exists() else title
    block = f"{start}\n{text}\n{end}"
    if start in doc and end in doc:
        doc = doc[: doc.index(start)] + block + doc[doc.index(end) + len(end):]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    path.write_text(doc)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write ``rows`` to the CSV file ``path`` (parents created): one column per key, in order of
    first appearance; None is written as an empty field."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if v is None else v for k, v in r.items()})
    return path


def _value(text: str) -> Any:
    """A CSV field as written by :func:`write_csv`: None for an empty field, an int or float if the
    text is exactly how Python writes that number (so any other text, e.g. ``"007"``, stays text)."""
    if text == "":
        return None
    for cast, show in ((int, str), (float, repr)):
        try:
            value = cast(text)
        except ValueError:
            continue
        if show(value) == text:
            return value
    return text


def read_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of a CSV file written by :func:`write_csv`: numbers as the ints and floats that
    were written, empty fields as None, anything else as the string."""
    with path.open(newline="", encoding="utf-8") as f:
        return [{k: _value(v) for k, v in r.items()} for r in csv.DictReader(f)]


def _fields(template: str) -> list[str]:
    return [re.split(r"[.\[]", name)[0] for _, name, _, _ in string.Formatter().parse(template) if name]


def _cell(cell: Cell, row: dict[str, Any]) -> str:
    if callable(cell):
        return cell(row)
    if any(row.get(name) is None for name in _fields(cell)):
        return "-"
    return cell.format_map(row)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Columns) -> str:
    """The markdown table (header, ``---`` line, one line per row; no trailing newline)."""
    pairs = list(columns.items()) if isinstance(columns, Mapping) else list(columns)
    lines = ["| " + " | ".join(h for h, _ in pairs) + " |", "| " + " | ".join("---" for _ in pairs) + " |"]
    lines += ["| " + " | ".join(_cell(c, r) for _, c in pairs) + " |" for r in rows]
    return "\n".join(lines)


def table(rows: Sequence[dict[str, Any]], columns: Columns, csv_dir: Path | None = None, name: str | None = None) -> str:
    """The markdown table of ``rows``; with ``csv_dir``, the rows are first written to
    ``csv_dir / f"{name}.csv"`` and the table is rendered from that file."""
    if csv_dir is None:
        return markdown_table(rows, columns)
    if not name:
        raise ValueError("table: a table written to a CSV file needs a name")
    return markdown_table(read_csv(write_csv(Path(csv_dir) / f"{name}.csv", rows)), columns)

"""Readers for the data sets in ``../shared/data`` (see its README for sources and licences).

* ``reviews/``: binary sentiment in 7 domains. ``books``, ``dvd``, ``electronics``, ``kitchen``
  are the multi-domain Amazon reviews of Blitzer, Dredze & Pereira (ACL 2007): pseudo-XML in
  latin-1, one ``positive.review`` and one ``negative.review`` file each; ``airline``, ``imdb``,
  ``blog`` are CSV files ``reviews,labels`` (Ryu & Lee 2020).
* ``mt-domains/``: German-English parallel text in 4 domains (Koehn & Knowles 2017; Aharoni &
  Goldberg 2020). Some lines of ``it/`` are double- or triple-encoded UTF-8; :func:`repair_mojibake`
  undoes that and :func:`read_parallel` reports how many lines it repaired.
* ``wikitext-2/``: ``valid.txt`` and ``test.txt`` of WikiText-2 (Merity et al. 2016).

No file is copied into the repository: every reader takes a path (default:
:func:`default_data_dir`).
"""

from __future__ import annotations

import csv
import html
import os
import re
from dataclasses import dataclass
from pathlib import Path

REVIEW_DOMAINS = ("books", "dvd", "electronics", "kitchen", "airline", "imdb", "blog")
MT_DOMAINS = ("koran", "it", "law", "medical")
_REVIEW_TEXT = re.compile(r"<review_text>(.*?)</review_text>", re.DOTALL)
_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)  # IMDB and some Amazon reviews keep <br /> tags


def default_data_dir() -> Path:
    """``$NVFORMER_DATA`` if set, else ``../shared/data`` next to the repository (or the working directory)."""
    env = os.environ.get("NVFORMER_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for base in [Path.cwd(), *here.parents]:
        cand = base.parent / "shared" / "data"
        if (cand / "reviews").is_dir():
            return cand
    raise FileNotFoundError("could not find ../shared/data; set NVFORMER_DATA to its path")


@dataclass
class Reviews:
    """Texts and binary labels (1 = positive) of one review domain."""

    domain: str
    texts: list[str]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.texts)


def read_reviews(domain: str, data_dir: str | Path | None = None) -> Reviews:
    """All reviews of ``domain`` (one of :data:`REVIEW_DOMAINS`), in file order."""
    if domain not in REVIEW_DOMAINS:
        raise ValueError(f"read_reviews: unknown domain {domain!r}; domains are {REVIEW_DOMAINS}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    folder = root / "reviews" / domain
    texts, labels = [], []
    if (folder / "positive.review").exists():
        for name, label in (("negative.review", 0), ("positive.review", 1)):
            raw = (folder / name).read_text(encoding="latin-1")
            for t in _REVIEW_TEXT.findall(raw):
                texts.append(" ".join(_HTML_BREAK.sub(" ", html.unescape(t)).split()))
                labels.append(label)
    else:
        with open(folder / f"{domain}.csv", encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                texts.append(" ".join(_HTML_BREAK.sub(" ", row["reviews"]).split()))
                labels.append(int(row["labels"]))
    if not texts:
        raise ValueError(f"read_reviews: no reviews found in {folder}")
    return Reviews(domain, texts, labels)


def _as_byte(ch: str) -> int | None:
    """The byte a character came from if UTF-8 bytes were decoded as latin-1 or cp1252."""
    o = ord(ch)
    if o < 256:
        return o
    try:
        return ch.encode("cp1252")[0]
    except UnicodeEncodeError:
        return None


def _repair_once(line: str) -> str:
    out, i, n = [], 0, len(line)
    while i < n:
        b = _as_byte(line[i])
        need = 1 if b is not None and 0xC2 <= b <= 0xDF else 2 if b is not None and 0xE0 <= b <= 0xEF else 3 if b is not None and 0xF0 <= b <= 0xF4 else 0
        if need and i + need < n:
            cont = [_as_byte(c) for c in line[i + 1 : i + 1 + need]]
            if all(c is not None and 0x80 <= c <= 0xBF for c in cont):
                try:
                    out.append(bytes([b, *cont]).decode("utf-8"))
                    i += need + 1
                    continue
                except UnicodeDecodeError:
                    pass
        out.append(line[i])
        i += 1
    return "".join(out)


def repair_mojibake(line: str, max_rounds: int = 3) -> str:
    """Undo UTF-8 text that was decoded as latin-1/cp1252 and re-encoded, possibly repeatedly.

    Works sequence by sequence, so lines that mix damaged and intact characters are repaired
    too: ``"Währung ... lÃ¶schen" -> "Währung ... löschen"``; text without such sequences is
    returned unchanged.
    """
    for _ in range(max_rounds):
        fixed = _repair_once(line)
        if fixed == line:
            break
        line = fixed
    return line


@dataclass
class Parallel:
    """Aligned German-English sentence pairs of one domain and split."""

    domain: str
    split: str
    de: list[str]
    en: list[str]
    repaired: int

    def __len__(self) -> int:
        return len(self.de)


def _read_lines(path: Path) -> list[str]:
    # split on "\n" only: some corpora contain other Unicode line separators inside a sentence
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_parallel(domain: str, split: str, data_dir: str | Path | None = None) -> Parallel:
    """``mt-domains/{domain}/{split}.{de,en}``, mojibake repaired (the count is in ``repaired``)."""
    if domain not in MT_DOMAINS:
        raise ValueError(f"read_parallel: unknown domain {domain!r}; domains are {MT_DOMAINS}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    folder = root / "mt-domains" / domain
    if not (folder / f"{split}.de").exists():
        raise ValueError(f"read_parallel: {domain} has no {split!r} split (files: {sorted(p.name for p in folder.iterdir())})")
    de_raw, en_raw = _read_lines(folder / f"{split}.de"), _read_lines(folder / f"{split}.en")
    if len(de_raw) != len(en_raw):
        raise ValueError(f"read_parallel: {domain}/{split} has {len(de_raw)} German but {len(en_raw)} English lines")
    de = [repair_mojibake(s) for s in de_raw]
    en = [repair_mojibake(s) for s in en_raw]
    repaired = sum(a != b for a, b in zip(de + en, de_raw + en_raw))
    return Parallel(domain, split, de, en, repaired)


def read_wikitext(split: str, data_dir: str | Path | None = None) -> list[str]:
    """Non-empty, non-heading lines (paragraphs) of WikiText-2 ``valid`` or ``test``."""
    if split not in ("valid", "test"):
        raise ValueError(f"read_wikitext: split must be 'valid' or 'test' (train is not available), got {split!r}")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    lines = (root / "wikitext-2" / f"{split}.txt").read_text(encoding="utf-8").split("\n")
    return [s.strip() for s in lines if s.strip() and not s.strip().startswith("=")]

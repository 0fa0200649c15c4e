"""nvformer.files: every data file kind datasets reads, checked columns, seeded subsets, nothing left behind."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest

from nvformer.files import DataFileError, builder_for, read_columns, sample_rows

ROWS = [{"text": "a fine film", "label": "positive"}, {"text": "dull, slow", "label": "negative"}, {"text": 'a "quoted" line', "label": "positive"}]


@pytest.fixture
def files(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    pd.DataFrame(ROWS).to_csv(folder / "d.csv", index=False)
    pd.DataFrame(ROWS).to_csv(folder / "d.tsv", index=False, sep="\t")
    pd.DataFrame(ROWS).to_parquet(folder / "d.parquet")
    (folder / "d.json").write_text(json.dumps(ROWS))
    (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    with gzip.open(folder / "d.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    (folder / "d.txt").write_text("".join(r["text"] + "\n" for r in ROWS))
    return folder


@pytest.mark.parametrize("name", ["d.csv", "d.tsv", "d.parquet", "d.json", "d.jsonl", "d.jsonl.gz"])
def test_every_kind_reads_the_same_columns_and_leaves_nothing_behind(files, name):
    before = sorted(p.name for p in files.iterdir())
    cols = read_columns(files / name, ["text", "label"])
    assert cols == {"text": [r["text"] for r in ROWS], "label": [r["label"] for r in ROWS]}
    assert sorted(p.name for p in files.iterdir()) == before


def test_a_text_file_is_one_example_per_line(files):
    assert builder_for(files / "d.txt") == "text"
    assert read_columns(files / "d.txt", ["text"]) == {"text": [r["text"] for r in ROWS]}
    with pytest.raises(DataFileError, match="no column 'label' \\(--label-column\\); its columns are 'text'"):
        read_columns(files / "d.txt", ["text", "label"], what={"label": "--label-column"})


def test_subsets_are_seeded_and_keep_file_order(files):
    one = read_columns(files / "d.csv", ["text"], max_examples=2, seed=3)["text"]
    assert one == read_columns(files / "d.csv", ["text"], max_examples=2, seed=3)["text"]
    assert len(one) == 2 and one == [t for t in (r["text"] for r in ROWS) if t in one]
    assert sample_rows(5, None) == sample_rows(5, 9) == [0, 1, 2, 3, 4]
    assert len({tuple(sample_rows(50, 10, s)) for s in range(5)}) == 5


def test_bad_files(files, tmp_path):
    with pytest.raises(DataFileError, match="no such file"):
        read_columns(tmp_path / "missing.csv", ["text"])
    (tmp_path / "data.xlsx").write_bytes(b"PK")
    with pytest.raises(DataFileError, match="unknown data file kind '.xlsx'"):
        read_columns(tmp_path / "data.xlsx", ["text"])
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataFileError, match="cannot read it as json"):
        read_columns(tmp_path / "broken.jsonl", ["text"])
    (tmp_path / "holes.csv").write_text("text,label\nfine,1\n,0\n")
    with pytest.raises(DataFileError, match="column 'text' has an empty value \\(data row 2\\)"):
        read_columns(tmp_path / "holes.csv", ["text"])

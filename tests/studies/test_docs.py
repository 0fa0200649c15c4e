"""Doc tables through CSV files: exact round trip, rendering from the file, and section replacement."""

import pytest

from nvformer_studies.common.docs import markdown_table, read_csv, table, write_csv, write_section

ROWS = [{"domain": "koran", "units": 192, "ppl": 138.7013, "low": 0.9074999999999999, "high": 0.942, "note": "007", "text": " a | b\n"},
        {"domain": "it", "units": 12, "ppl": float("inf"), "low": None, "high": None, "note": "1.50", "text": ""}]
COLUMNS = [("domain", "{domain}"), ("units", "{units}"), ("ppl", "{ppl:.2f}"), ("CI", "[{low:.3f}, {high:.3f}]"), ("CI", "{low:+.1%}"),
           ("note", "{note}"), ("text", lambda r: (r["text"] or "").replace("|", "\\|").replace("\n", " ").strip())]


def test_csv_round_trip_is_exact(tmp_path):
    back = read_csv(write_csv(tmp_path / "sub" / "t.csv", ROWS))
    assert back[0] == ROWS[0]  # numbers, text that merely looks numeric ("007"), newlines, separators
    assert back[1] == {**ROWS[1], "text": None}  # an empty text reads back as None (an empty field)
    assert type(back[0]["units"]) is int and type(back[0]["low"]) is float and back[1]["note"] == "1.50"
    assert (tmp_path / "sub" / "t.csv").read_text().splitlines()[0] == "domain,units,ppl,low,high,note,text"


def test_markdown_from_the_csv_equals_markdown_from_the_rows(tmp_path):
    direct = markdown_table(ROWS, COLUMNS)
    assert direct.splitlines() == [
        "| domain | units | ppl | CI | CI | note | text |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        "| koran | 192 | 138.70 | [0.907, 0.942] | +90.7% | 007 | a \\| b |",
        "| it | 12 | inf | - | - | 1.50 |  |",
    ]
    assert table(ROWS, COLUMNS, tmp_path, "t") == direct and (tmp_path / "t.csv").exists()
    assert table(ROWS, COLUMNS) == direct
    assert markdown_table(ROWS, {"domain": "{domain}"}) == "| domain |\n| --- |\n| koran |\n| it |"
    with pytest.raises(ValueError, match="needs a name"):
        table(ROWS, COLUMNS, tmp_path)


def test_write_section_replaces_or_appends(tmp_path):
    path = tmp_path / "R.md"
    write_section("first", "a", path)
    write_section("second", "b", path)
    write_section("third", "a", path)
    text = path.read_text()
    assert text.startswith("# Results\n") and "first" not in text
    assert text.index("<!-- a:start -->\nthird\n<!-- a:end -->") < text.index("<!-- b:start -->\nsecond\n<!-- b:end -->")


def test_a_section_written_elsewhere_keeps_its_figures_and_tables_beside_it(tmp_path):
    """doc_dirs: figures and CSVs go beside --results (the section links figures relative to it),
    so a results file outside docs/ never writes into docs/; --no-results: the run's folder, no CSV."""
    import argparse

    from nvformer_studies.common.scripts import doc_dirs

    args = argparse.Namespace(results=str(tmp_path / "elsewhere" / "R.md"), out=str(tmp_path / "run"), no_results=False)
    assert doc_dirs(args) == (tmp_path / "elsewhere" / "figures", tmp_path / "elsewhere" / "results")
    assert doc_dirs(argparse.Namespace(**{**vars(args), "no_results": True})) == (tmp_path / "run" / "figures", None)

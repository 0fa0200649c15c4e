"""Readers of ../shared/data: counts from the data README, mojibake repair."""

import pytest

from nvformer_studies.common import data as D


@pytest.mark.parametrize("domain, n_pos", [("books", 1000), ("kitchen", 1000), ("airline", 1068), ("imdb", 1000), ("blog", 1140)])
def test_review_counts_and_labels_match_the_readme(domain, n_pos):
    r = D.read_reviews(domain)
    assert len(r) == 2000 and sum(r.labels) == n_pos
    assert all(t and "<br" not in t for t in r.texts)


def test_review_text_is_extracted_from_the_pseudo_xml():
    r = D.read_reviews("books")
    assert r.texts[1000].startswith("Sphere by Michael Crichton is an excellant novel")  # first positive review
    assert r.labels[1000] == 1 and r.labels[0] == 0


@pytest.mark.parametrize(
    "broken, fixed",
    [
        ("Methode fÃ¼r die Berechnung", "Methode für die Berechnung"),  # double-encoded
        ("Typ fÃ\x83Â¼r FeldÃ¢Â\x80Â\x9e %1Ã¢Â\x80Â\x9c", "Typ für Feld„ %1“"),  # triple-encoded, with quotes
        ("Dateiâ\x80\x9e %1â\x80\x9c liegt Ã¼ber", "Datei„ %1“ liegt über"),
        ("Kann neue Währung %1 nicht lÃ¶schen", "Kann neue Währung %1 nicht löschen"),  # mixed line
        ("already fine: für Ärger „quoted“ 5 €", "already fine: für Ärger „quoted“ 5 €"),
    ],
)
def test_repair_mojibake(broken, fixed):
    assert D.repair_mojibake(broken) == fixed
    assert D.repair_mojibake(fixed) == fixed


def test_parallel_reader_repairs_it_and_keeps_alignment():
    p = D.read_parallel("it", "test")
    assert len(p.de) == len(p.en) == 2000
    assert 80 <= p.repaired <= 100  # the README: about 88 lines of it/test.de
    assert p.de[0] == "Methode für die Berechnung der Vorhersage"
    assert not any("Ã" in s for s in p.de)
    koran = D.read_parallel("koran", "train")
    assert len(koran) == 17982 and koran.repaired == 0
    with pytest.raises(ValueError, match="no 'train' split"):
        D.read_parallel("law", "train")


def test_wikitext_reader():
    lines = D.read_wikitext("valid")
    assert lines[0].startswith("Homarus gammarus , known as the European lobster")
    assert not any(s.startswith("=") for s in lines)
    with pytest.raises(ValueError, match="train is not available"):
        D.read_wikitext("train")

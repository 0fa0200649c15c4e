"""The shared command line of experiments/ and benchmarks/: one-line errors (exit code 2) for bad
``--threads`` and comma lists, defaults shown in ``--help``."""

from pathlib import Path

import pytest

from nvformer_studies.common.scripts import comma_choices, script_parser, set_threads


def _parser():
    p = script_parser("doc", Path("/tmp/root"), run="x", threads=True)
    p.add_argument("--models", default="a,b", help="comma list")
    return p


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_threads_must_be_a_positive_integer(value, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["--threads", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--threads" in err[0] and "expected an integer >= 1" in err[0]


def test_threads_are_applied(monkeypatch):
    import torch

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    set_threads(_parser().parse_args(["--threads", "3"]))
    set_threads(_parser().parse_args([]))
    assert seen == [3]


def test_comma_choices(capsys):
    p = _parser()
    assert comma_choices(p, " b, a ,", ("a", "b", "c"), "--models") == ("b", "a")
    for text, needle in (("a,z", "unknown z; choose from a, b, c"), (" , ", "unknown empty list")):
        with pytest.raises(SystemExit) as e:
            comma_choices(p, text, ("a", "b", "c"), "--models")
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and needle in err[0]


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: a,b)" in out and "(default: None)" in out and "/tmp/root/runs/x" in out

from nvformer_studies.cli import main
from nvformer_studies.demo import run


def test_demo_passes_its_checks(capsys):
    assert run(seed=1, steps=40)
    out = capsys.readouterr().out
    assert "all checks passed" in out and "FAIL" not in out


def test_cli_demo_exit_code():
    assert main(["demo", "--steps", "30"]) == 0

"""`nvformer-studies`: bad input is one line and exit code 2, before any training starts."""

import pytest

from nvformer_studies.cli import main


@pytest.mark.parametrize("argv, needle", [
    (["study", "--model", "runs/a-typo"], "--model runs/a-typo: no such folder"),
    (["study", "--targets", "mars"], "unknown domain(s) ['mars']"),
    (["study", "--budget", "huge"], "invalid choice: 'huge'"),
    (["study", "--data", "/nonexistent"], "no reviews/ folder under /nonexistent"),
    (["translate-study", "--model", "nowhere"], "--model nowhere: no such folder"),
    (["translate-study", "--domains", "physics"], "unknown or no domain(s) ['physics']"),
    (["nvae", "train"], "the following arguments are required: --out"),
])
def test_bad_input_is_one_line_and_exit_code_2(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default run folders would be created here
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not any(tmp_path.iterdir())  # nothing was fine-tuned or trained

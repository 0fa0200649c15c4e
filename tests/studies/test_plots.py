"""The shared plotting helpers write readable PNGs and reject inconsistent input."""

import pytest

from nvformer_studies.common.plots import interval_panels, line_panels


def _png_size(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.format, im.size


def test_interval_panels_writes_png(tmp_path):
    path = interval_panels({"a": {"s1": [("x", 0.1, -0.1, 0.3), ("y", 0.0, -0.2, 0.1)], "s2": [("x", 0.2, 0.1, 0.3)]},
                            "b": {"s1": [("z", 1.0, 0.9, 1.2)]}}, tmp_path / "sub" / "f.png", xlabel="diff", reference=0.0)
    fmt, (w, h) = _png_size(path)
    assert fmt == "PNG" and w > h > 0


def test_interval_panels_rejects_value_outside_interval(tmp_path):
    with pytest.raises(ValueError, match="outside its interval"):
        interval_panels({"a": {"s": [("x", 0.5, 0.0, 0.4)]}}, tmp_path / "f.png", xlabel="d")
    with pytest.raises(ValueError, match="nothing to plot"):
        interval_panels({}, tmp_path / "f.png", xlabel="d")


def test_line_panels(tmp_path):
    path = line_panels({"p": {"s": ([0.1, 0.5, 0.9], [0.2, 0.4, 0.95])}}, tmp_path / "l.png", xlabel="x", ylabel="y", diagonal=True)
    assert _png_size(path)[0] == "PNG"
    with pytest.raises(ValueError, match="2 x but 3 y"):
        line_panels({"p": {"s": ([0.1, 0.5], [0.2, 0.4, 0.9])}}, tmp_path / "l.png", xlabel="x", ylabel="y")

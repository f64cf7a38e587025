"""Plot files in the format their name asks for (tcache.pngs, issue 34): .png, .jpg/.jpeg, .pdf and .svg are drawn
as such and signed as tcache's in that format's own text, so the ownership rule (replace only what tcache drew)
holds for each; any other name is refused before anything is drawn."""

from __future__ import annotations

import io

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tcache import pngs
from tcache.errors import TcacheError

# suffix -> how its bytes start (what a viewer goes by, whatever the name says)
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpg": b"\xff\xd8\xff", "jpeg": b"\xff\xd8\xff", "pdf": b"%PDF-",
         "svg": b"<?xml"}


def figure() -> Figure:
    fig = Figure(figsize=(2, 1.5), dpi=50)
    fig.add_subplot().plot([0, 1, 4])
    return fig


def foreign(ext: str) -> bytes:
    """An image of this format that tcache did not draw (matplotlib's, PIL's: unsigned)."""
    buf = io.BytesIO()
    if ext in ("jpg", "jpeg"):
        from PIL import Image

        Image.new("RGB", (4, 4), "red").save(buf, format="JPEG")
    else:
        FigureCanvasAgg(figure()).print_figure(buf, format=ext)
    return buf.getvalue()


@pytest.mark.parametrize("ext", list(MAGIC))
def test_each_format_is_drawn_as_named_and_signed(tmp_path, ext):
    out = pngs.save(figure(), FigureCanvasAgg, tmp_path / f"plot.{ext}", "--out")
    assert out.read_bytes().startswith(MAGIC[ext]) and pngs.written_by_tcache(out)
    pngs.check_target(out, "--out")  # tcache's own: a later draw may replace it
    pngs.save(figure(), FigureCanvasAgg, out, "--out")
    user, theirs = tmp_path / f"user.{ext}", foreign(ext)
    user.write_bytes(theirs)
    assert not pngs.written_by_tcache(user)
    for refused in (lambda: pngs.check_target(user, "--out"), lambda: pngs.save(figure(), FigureCanvasAgg, user, "--out")):
        with pytest.raises(TcacheError, match=r"exists and was not written by tcache"):
            refused()
    assert user.read_bytes() == theirs
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("name", ["curves.txt", "curves.gif", "curves"])
def test_a_name_of_another_format_is_refused_before_drawing(tmp_path, name):
    with pytest.raises(TcacheError, match=rf"^--plot \S+{name}: .*; name it \.png, \.jpg, \.pdf or \.svg$"):
        pngs.check_target(tmp_path / name, "--plot")
    with pytest.raises(TcacheError, match=r"name it \.png"):
        pngs.save(figure(), FigureCanvasAgg, tmp_path / name, "--plot")
    assert list(tmp_path.iterdir()) == []


def test_png_bytes_an_older_tcache_wrote_under_a_jpg_name_are_replaced_by_a_jpeg(tmp_path):
    """tcache before issue 34 wrote PNG bytes whatever the name: still tcache's (by its content), so redrawn."""
    old = tmp_path / "cache.JPG"
    pngs.save(figure(), FigureCanvasAgg, tmp_path / "old.png")
    (tmp_path / "old.png").rename(old)
    pngs.check_target(old, "--plot")
    pngs.save(figure(), FigureCanvasAgg, old, "--plot")
    assert old.read_bytes().startswith(MAGIC["jpg"]) and pngs.written_by_tcache(old)

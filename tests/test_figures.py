"""Tests for brainray.figures: PNG rendering, and that drawing does not pull in the metrics'
dependencies (scoring actors draw Grad-CAM overlays and should not import scipy or sklearn)."""

from __future__ import annotations

import io
import subprocess
import sys

from PIL import Image

from brainray import figures


def test_a_figure_renders_to_a_png_of_its_size_at_100_dpi():
    fig = figures.new_figure((3.0, 2.0))
    fig.add_subplot().plot([0, 1], [1, 0])
    png = figures.figure_png(fig)
    with Image.open(io.BytesIO(png)) as image:
        assert (image.format, image.size) == ("PNG", (300, 200))


def test_drawing_and_the_scoring_module_import_neither_scipy_nor_sklearn():
    code = ("import sys, brainray.score, brainray.explain, brainray.figures as f; "
            "f.figure_png(f.new_figure((1, 1))); "
            "print(sorted(m for m in ('scipy', 'sklearn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"

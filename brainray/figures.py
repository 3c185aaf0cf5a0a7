"""Matplotlib figures rendered to PNG bytes, for the reports, plots and overlays.

Apart from the metrics so that what draws (Grad-CAM overlays in a scoring actor) does not import
scipy and scikit-learn; matplotlib itself is imported on first use.
"""

from __future__ import annotations

import io


def new_figure(figsize: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    # A bare Figure avoids pyplot's global figure registry, so rendering is thread-safe.
    return Figure(figsize=figsize, layout="constrained")


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()

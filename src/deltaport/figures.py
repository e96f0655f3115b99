"""Figures: matplotlib with its non-interactive backend, and a figure written to a file atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, *, overwrite: bool = True, record: bool = False, dpi: int = 120,
                bbox_inches: str | None = "tight") -> Path:
    """Save a matplotlib figure through :func:`deltaport.io.atomic.atomic_write_file` (format from the
    suffix, default PNG) and close it. ``record``: a command's final output (see ``atomic_write_file``)."""
    import matplotlib.pyplot as plt

    from deltaport.io.atomic import atomic_write_file

    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    try:
        return atomic_write_file(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches=bbox_inches),
                                 overwrite=overwrite, record=record)
    finally:
        plt.close(fig)

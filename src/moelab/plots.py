"""Matplotlib for reports: the Agg backend (no display needed) and figures as PNG bytes."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402


def png(fig, dpi: int = 110, metadata: dict[str, str] | None = None) -> bytes:
    """The figure as PNG bytes (tight bounding box; `metadata`: PNG text chunks); closes it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata=metadata)
    plt.close(fig)
    return buffer.getvalue()


class _PlainLogFormatter(LogFormatter):
    """`LogFormatter`'s choice of the ticks to label, each labelled in positional notation (0.2,
    20000, 0.00001, 3000000): LogFormatter itself writes a value below 1 or above 10^4 as 2e-01,
    2e+04, and `:g` one below 10^-4 or from 10^6 up as 1e-05, 1e+06."""

    def __call__(self, x, pos=None) -> str:
        return np.format_float_positional(x, precision=6, trim="-") if super().__call__(x, pos) else ""


def plain_log_ticks(axis) -> None:
    """A log-scaled axis (`ax.xaxis` or `ax.yaxis`) labelled in plain numbers (0.3, 300, 1000),
    where matplotlib's default mixes 3×10^2 and 10^3 on an axis of about a decade."""
    axis.set_major_formatter(_PlainLogFormatter())
    axis.set_minor_formatter(_PlainLogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))


__all__ = ["plain_log_ticks", "plt", "png"]

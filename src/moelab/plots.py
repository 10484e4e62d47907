"""Matplotlib for reports: the Agg backend (no display needed) and figures as PNG bytes."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def png(fig, dpi: int = 110, metadata: dict[str, str] | None = None) -> bytes:
    """The figure as PNG bytes (tight bounding box; `metadata`: PNG text chunks); closes it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight", metadata=metadata)
    plt.close(fig)
    return buffer.getvalue()


__all__ = ["plt", "png"]

"""The training plot: loss and validation accuracy against the step, from the metrics log."""

from __future__ import annotations

import io
import os
from typing import Any

from cudablocks.classify.atomic import atomic_write_bytes

__all__ = ["plot_metrics"]


def _series(records: list[dict[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    """The (steps, values) of ``key`` in the records of one split, in log order."""
    points = [(r["step"], r[key]) for r in records if r.get("split") == split and r.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def plot_metrics(records: list[dict[str, Any]], png_path: str | os.PathLike[str]) -> None:
    """Writes a PNG of two panels: train and validation loss vs step, and validation accuracy
    (and macro-F1 where logged) vs step. The file is replaced atomically, so a viewer watching it
    never reads half an image.

    matplotlib draws on its own Agg canvas, so the caller's pyplot state and backend are left
    untouched (and no display is needed).
    """
    # Imported here: matplotlib is slow to import and only the plot needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(1, 2)

    loss_ax.plot(*_series(records, "train", "loss"), label="train", linewidth=1)
    loss_ax.plot(*_series(records, "valid", "loss"), "o-", label="valid", markersize=3)
    loss_ax.set(title="Loss", xlabel="step", ylabel="cross-entropy")
    loss_ax.legend()
    loss_ax.grid(alpha=0.3)

    acc_ax.plot(*_series(records, "valid", "accuracy"), "o-", label="accuracy", markersize=3)
    f1_steps, f1 = _series(records, "valid", "macro_f1")
    if f1:
        acc_ax.plot(f1_steps, f1, "s--", label="macro-F1", markersize=3)
    acc_ax.set(title="Validation", xlabel="step", ylim=(0, 1))
    acc_ax.legend()
    acc_ax.grid(alpha=0.3)

    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    atomic_write_bytes(png_path, image.getvalue())

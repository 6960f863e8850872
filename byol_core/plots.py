"""Figures of a run's history: what people look at after training."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt


def plot_history(history: list[dict[str, float]], path: str | Path, title: str = "") -> Path:
    """Loss, linear/kNN top-1 and the collapse diagnostics (cos_pos, cos_neg) over epochs."""
    path = Path(path)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    panels = [
        ("training loss", ["train/loss"]),
        ("evaluation top-1 (%)", ["eval/linear_top1", "eval/knn_top1"]),
        ("cosine z vs z' (collapse: both -> 1)", ["diag/cos_pos", "diag/cos_neg"]),
    ]
    for ax, (label, keys) in zip(axes, panels, strict=True):
        for key in keys:
            points = [(m["epoch"], m[key]) for m in history if key in m]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=key.split("/")[-1])
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

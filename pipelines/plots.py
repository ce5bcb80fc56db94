"""PNG artifacts for MLflow: loss/accuracy curves and a confusion matrix.

Figures are made with matplotlib's object API (`Figure`), not pyplot: no backend is selected and no
global state is touched, so importing this module has no side effects and works headless.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure


def curves(series: dict[str, list[tuple[int, float]]], path: str) -> None:
    fig = Figure(figsize=(4 * len(series), 3))
    axes = fig.subplots(1, len(series), squeeze=False)
    for ax, (name, points) in zip(axes[0], series.items()):
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="." if len(points) < 50 else None)
        ax.set_title(name)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def confusion_matrix(matrix: np.ndarray, labels: list[str], path: str) -> None:
    size = max(4, 0.45 * len(labels) + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ticks = np.arange(len(labels))
    if len(labels) <= 60:
        ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
        ax.set_yticks(ticks, labels, fontsize=7)
        for (i, j), count in np.ndenumerate(matrix):
            if count:
                ax.text(j, i, int(count), ha="center", va="center", fontsize=6)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=100)

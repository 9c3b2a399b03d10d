"""The audit's histograms over every scanned sample (caption lengths, boxes per image, OCR
confidence and detector scores), as PNGs drawn with matplotlib (Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _hist(ax, values, bins, title: str, xlabel: str, color: str) -> None:
    if values:
        ax.hist(values, bins=bins, color=color, edgecolor="white")
    else:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"{title} (n={len(values)})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")


def plot_histograms(out: Path, *, lengths: list[int], boxes: list[int], ocr_conf: list[float],
                    obj_score: list[float]) -> list[Path]:
    """caption_lengths.png, boxes_per_image.png, confidence.png in `out`; returns the paths."""
    paths = []
    specs = [
        ("caption_lengths.png", [(lengths, 30, "caption length", "characters", "#1f77b4")]),
        ("boxes_per_image.png", [(boxes, range(0, max(boxes, default=0) + 2), "boxes per image",
                                  "OCR entries + objects", "#2ca02c")]),
        ("confidence.png", [(ocr_conf, 20, "OCR confidence", "confidence", "#d62728"),
                            (obj_score, 20, "object score", "score", "#1f3fd6")]),
    ]
    for fname, panels in specs:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.2), constrained_layout=True, squeeze=False)
        for ax, (values, bins, title, xlabel, color) in zip(axes[0], panels):
            _hist(ax, values, bins, title, xlabel, color)
        path = out / fname
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths

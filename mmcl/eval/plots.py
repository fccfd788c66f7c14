"""Pictures of evaluation results, drawn with matplotlib's file-only Agg backend (no display needed)."""
from __future__ import annotations

import os
import textwrap

import numpy as np
import torch

__all__ = ["plot_confusion_matrix", "plot_similarity"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: works on headless machines and inside tests
    import matplotlib.pyplot as plt

    return plt


def _check_out(path) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"cannot write plot {path}: directory {parent} does not exist")
    return path


def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class."""
    y = np.asarray(torch.as_tensor(labels).cpu(), dtype=np.int64)
    p = np.asarray(torch.as_tensor(predictions).cpu(), dtype=np.int64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"labels and predictions must be 1-D and of equal length, got {y.shape} and {p.shape}")
    if y.size and (min(y.min(), p.min()) < 0 or max(y.max(), p.max()) >= num_classes):
        raise ValueError(f"labels and predictions must be class indices in [0, {num_classes})")
    return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def plot_confusion_matrix(labels, predictions, class_names, path, *, title: str | None = None) -> np.ndarray:
    """Save a confusion matrix as an image; returns the (C, C) counts.

    labels, predictions: (N,) class indices into `class_names`. Cells are coloured by the share of
    each true class (rows sum to 1) so rare classes read as clearly as common ones; counts are
    written in the cells when C <= 25.
    """
    path = _check_out(path)
    names = [str(c) for c in class_names]
    counts = confusion_matrix(labels, predictions, len(names))
    rows = counts.sum(axis=1, keepdims=True)
    share = counts / np.maximum(rows, 1)
    plt = _pyplot()
    side = min(4 + 0.45 * len(names), 24)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = np.arange(len(names))
    ax.set_xticks(ticks, labels=[textwrap.shorten(n, 24) for n in names], rotation=45, ha="right")
    ax.set_yticks(ticks, labels=[textwrap.shorten(n, 24) for n in names])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if len(names) <= 25:
        for i in range(len(names)):
            for j in range(len(names)):
                if counts[i, j]:
                    colour = "white" if share[i, j] > 0.5 else "black"
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8, color=colour)
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"{title + ': ' if title else ''}top-1 {accuracy:.1%} on {counts.sum()} images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return counts


def plot_similarity(
    similarity, path, *, texts=None, images=None, max_items: int = 16, title: str | None = None,
    diagonal: bool = True,
) -> None:
    """Save an image x text cosine-similarity heat-map (the first `max_items` of each).

    similarity: (I, T) scores; texts: T caption strings for the x-axis; images: I PIL images drawn
    as thumbnails beside their rows (else rows are numbered). Pass matching pairs in order so the
    diagonal holds the true pairs (outlined when `diagonal`); a model that retrieves well shows
    a bright diagonal.
    """
    path = _check_out(path)
    sim = np.asarray(torch.as_tensor(similarity, dtype=torch.float32).cpu())
    if sim.ndim != 2 or 0 in sim.shape:
        raise ValueError(f"similarity must be a non-empty 2-D matrix, got shape {sim.shape}")
    n_img, n_txt = min(sim.shape[0], max_items), min(sim.shape[1], max_items)
    sim = sim[:n_img, :n_txt]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(3 + 0.55 * n_txt, 2.5 + 0.55 * n_img))
    im = ax.imshow(sim, cmap="viridis", aspect="equal")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    if texts is not None:
        labels = [textwrap.shorten(str(t), 40, placeholder="…") for t in list(texts)[:n_txt]]
        ax.set_xticks(np.arange(n_txt), labels=labels, rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xticks(np.arange(n_txt))
        ax.set_xlabel("text")
    ax.set_yticks(np.arange(n_img))
    if images is not None:
        from matplotlib.offsetbox import AnnotationBbox, OffsetImage

        ax.set_yticklabels([])
        for i, img in enumerate(list(images)[:n_img]):
            thumb = img.convert("RGB").copy()
            thumb.thumbnail((32, 32))
            box = AnnotationBbox(
                OffsetImage(np.asarray(thumb), zoom=1.0), (-0.6, i), xybox=(-22, 0), xycoords="data",
                boxcoords="offset points", frameon=False, annotation_clip=False,
            )
            ax.add_artist(box)
    else:
        ax.set_ylabel("image")
    bright = sim > sim.min() + 0.6 * (sim.max() - sim.min())  # dark text on the yellow end of viridis
    for i in range(n_img):
        for j in range(n_txt):
            ax.text(j, i, f"{sim[i, j]:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if bright[i, j] else "white")
    if diagonal:
        from matplotlib.patches import Rectangle

        for i in range(min(n_img, n_txt)):  # outline the true pairs
            ax.add_patch(Rectangle((i - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    ax.set_title(title or "image x text similarity")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)

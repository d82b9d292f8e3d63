"""Figures of the evaluation stage (matplotlib, Agg): confusion matrix, per-class accuracy, linear-probe
accuracy against shots, and a grid of retrieval examples (query caption + top-k retrieved images)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def confusion_matrix_figure(matrix: Sequence[Sequence[int]], classnames: Sequence[str], title: str = ""):
    m = np.asarray(matrix, dtype=float)
    n = len(classnames)
    side = min(4 + 0.45 * n, 30)
    fig, ax = plt.subplots(figsize=(side, side))
    row = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(row, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 40:
        ax.set_xticks(range(n), classnames, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), classnames, fontsize=8)
        if n <= 15:
            for i in range(n):
                for j in range(n):
                    if m[i, j]:
                        ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=8,
                                color="white" if row[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "zero-shot confusion matrix")
    fig.tight_layout()
    return fig


def per_class_accuracy_figure(per_class: Sequence[float], classnames: Sequence[str], chance: float,
                              title: str = ""):
    n = len(classnames)
    order = np.argsort(per_class)[::-1]
    shown = order if n <= 60 else np.concatenate([order[:30], order[-30:]])
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(shown) + 2), 4))
    ax.bar(range(len(shown)), [per_class[i] for i in shown], color="tab:blue")
    ax.axhline(chance, color="tab:red", linestyle="--", label=f"chance {chance:.3f}")
    ax.set_xticks(range(len(shown)), [classnames[i] for i in shown], rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(title or ("zero-shot accuracy per class" + (" (best 30 / worst 30)" if n > 60 else "")))
    ax.legend()
    fig.tight_layout()
    return fig


def linear_probe_figure(settings: dict, zeroshot_top1: float | None, chance: float):
    names = list(settings)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(len(names)), [settings[n]["top1"] for n in names], marker="o", label="linear probe")
    if zeroshot_top1 is not None:
        ax.axhline(zeroshot_top1, color="tab:green", linestyle=":", label=f"zero-shot {zeroshot_top1:.3f}")
    ax.axhline(chance, color="tab:red", linestyle="--", label=f"chance {chance:.3f}")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("training samples per class")
    ax.set_ylabel("test top-1 accuracy")
    ax.set_title("linear probe on frozen image features")
    ax.legend()
    fig.tight_layout()
    return fig


def retrieval_examples_figure(captions: Sequence[str], ranked: Sequence[Sequence[int]],
                              thumbnails: Sequence[Image.Image], targets: Sequence[int]):
    """One row per query: the caption, then the top-k retrieved images (green frame = the true pair)."""
    rows, k = len(captions), max(len(r) for r in ranked)
    fig, axes = plt.subplots(rows, k + 1, figsize=(2.0 * (k + 1) + 1.5, 2.0 * rows), squeeze=False)
    for r, (caption, hits, target) in enumerate(zip(captions, ranked, targets)):
        ax = axes[r][0]
        ax.axis("off")
        ax.text(0.0, 0.5, "\n".join(textwrap.wrap(caption, 28)[:6]), va="center", ha="left", fontsize=8,
                transform=ax.transAxes)
        for c in range(k):
            ax = axes[r][c + 1]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(hits):
                ax.axis("off")
                continue
            ax.imshow(np.asarray(thumbnails[hits[c]]))
            hit = hits[c] == target
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if hit else "lightgray")
                spine.set_linewidth(4 if hit else 1)
            if r == 0:
                ax.set_title(f"#{c + 1}", fontsize=9)
    fig.suptitle("text -> image retrieval: query caption, top retrieved images (green = its own image)")
    fig.tight_layout()
    return fig

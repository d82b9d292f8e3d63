"""Figures of the evaluation stage (matplotlib, Agg): confusion matrix, per-class accuracy, the few-shot curves
against zero-shot, accuracy under shift against accuracy on the reference, retrieval recall@K, and a grid of
retrieval examples (query caption + top-k retrieved images)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402


def close(fig) -> None:
    plt.close(fig)


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


def few_shot_figure(datasets: dict[str, dict]):
    """One panel per dataset: linear-probe accuracy against training samples per class (log scale; "full" at
    its average per class), the zero-shot accuracy as a line and where the two meet (the paper's Figure 6)."""
    names = list(datasets)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        entry = datasets[name]
        probe, zs = entry["linear_probe"], entry.get("zeroshot")
        n_classes = entry["num_classes"]
        points = sorted((s["shots"] or s["n_train"] / n_classes, s["top1"], s["shots"] is None)
                        for s in probe["settings"].values())
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color="tab:blue", label="linear probe")
        for x, y, full in points:
            if full:
                ax.annotate("full", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        if zs:
            ax.axhline(zs["top1"], color="tab:green", linestyle=":", label=f"zero-shot {zs['top1']:.3f}")
            few = entry.get("few_shot") or {}
            if few.get("relation") == "matches":
                ax.axvline(few["shots"], color="tab:green", alpha=0.5)
                ax.annotate(f"= {few['shots']:.1f}-shot", (few["shots"], zs["top1"]), textcoords="offset points",
                            xytext=(4, -12), fontsize=8, color="tab:green")
        ax.axhline(probe["chance"], color="tab:red", linestyle="--", linewidth=1, label="chance")
        ax.set_xscale("log", base=2)
        ax.set_xticks([p[0] for p in points], [f"{p[0]:g}" if not p[2] else f"{p[0]:.3g}" for p in points])
        ax.minorticks_off()
        ax.set_ylim(0, 1.02)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("training samples per class")
        ax.set_ylabel("test top-1")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("few-shot linear probe vs zero-shot")
    fig.tight_layout()
    return fig


def robustness_figure(entry: dict):
    """Accuracy on the reference (x) against accuracy under shift (y), one point per (method, shifted set):
    colour = the shifted set, circle = zero-shot, square = the linear probe fitted on the reference, a thin
    line joining a set's two points; points under y = x lost accuracy under shift."""
    reference, shifted = entry["rows"][0], entry["rows"][1:]
    methods = [("zeroshot", "o", "zero-shot"), ("linear_probe", "s", f"linear probe (fitted on {entry['reference']})")]
    methods = [m for m in methods if reference[f"{m[0]}_top1"] is not None]
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
    colours = plt.get_cmap("tab10")
    for i, row in enumerate(shifted):
        xy = [(reference[f"{m}_top1"], row[f"{m}_top1"]) for m, _mk, _l in methods]
        ax.plot([p[0] for p in xy], [p[1] for p in xy], color=colours(i % 10), linewidth=0.8, alpha=0.6)
        for (x, y), (_m, marker, _l) in zip(xy, methods):
            ax.scatter([x], [y], color=colours(i % 10), marker=marker, s=55, zorder=3)
        ax.scatter([], [], color=colours(i % 10), marker="o", label=row["dataset"])
    for _m, marker, label in methods:
        ax.scatter([], [], color="black", marker=marker, facecolors="none", label=label)
    ax.plot([], [], color="gray", linestyle="--", linewidth=1, label="y = x (no loss under shift)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_aspect("equal")
    ax.set_xlabel(f"top-1 on the reference ({reference['dataset']})")
    ax.set_ylabel("top-1 on the shifted set")
    ax.set_title("robustness under distribution shift")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def retrieval_recall_figure(datasets: dict[str, dict]):
    """Recall@K (K = 1, 5, 10) in both directions, one group of bars per dataset with retrieval."""
    directions = (("image_to_text", "image -> text"), ("text_to_image", "text -> image"))
    ks = (1, 5, 10)
    names = list(datasets)
    fig, axes = plt.subplots(1, 2, figsize=(max(7, 2.2 * len(names) + 3), 3.8), sharey=True, squeeze=False)
    width = 0.8 / len(ks)
    for ax, (direction, title) in zip(axes[0], directions):
        for j, k in enumerate(ks):
            values = [datasets[n]["retrieval"].get(f"{direction}_R@{k}", 0.0) for n in names]
            bars = ax.bar(np.arange(len(names)) + (j - (len(ks) - 1) / 2) * width, values, width, label=f"R@{k}")
            ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
        ax.set_xticks(range(len(names)), [f"{n}\n(n={datasets[n]['retrieval'].get('n', '?')})" for n in names],
                      fontsize=8)
        ax.set_ylim(0, 1.08)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("recall")
    axes[0][1].legend(fontsize=8, loc="upper left")
    fig.suptitle("retrieval recall@K")
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

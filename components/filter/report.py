"""The filter stage's accounting: stats.json, the reasons plot and samples of rejected records."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict

from components.common import config, storage
from components.filter.config import REASONS, FilterConfig


def build_stats(meta: dict[int, dict], cfg: FilterConfig, written: int, timing: dict, t0: float, source_uri: str,
                output_uri: str, clip_stats: dict, concept_counts: dict) -> dict:
    """stats.json: totals per reason (asserting kept + rejected = total), languages, timing, config."""
    total = len(meta)
    reasons = Counter(m["reason"] for m in meta.values() if m["reason"])
    kept = total - sum(reasons.values())
    if kept + sum(reasons.values()) != total or written != kept:
        raise AssertionError(f"filter accounting broken: kept {kept} (written {written}) + rejected "
                             f"{sum(reasons.values())} != total {total}")
    timing["total_s"] = time.perf_counter() - t0
    timing["records_per_s"] = total / timing["total_s"] if timing["total_s"] > 0 else 0.0
    langs = Counter(m["language"] for m in meta.values() if m["language"])
    return {
        "source_uri": source_uri, "output_uri": output_uri, "total": total, "kept": kept,
        "rejected": {r: reasons[r] for r in REASONS if reasons.get(r)},
        "kept_fraction": kept / total if total else 0.0,
        "languages": dict(langs.most_common(20)),
        "clip_score": clip_stats, "concept_counts": concept_counts,
        "config": config.to_dict(cfg), "timing": timing,
    }


def write_reports(meta: dict[int, dict], stats: dict, output_uri: str, reject_samples: int) -> None:
    """rejects/<reason>.jsonl (the first `reject_samples` of each reason), stats.png and stats.json."""
    samples: dict[str, list[dict]] = defaultdict(list)
    for m in sorted(meta.values(), key=lambda m: m["uid"]):
        r = m["reason"]
        if r and len(samples[r]) < reject_samples:
            samples[r].append({"key": m["key"], "source_uri": m["source_uri"], "caption": m["caption"],
                               "detail": m["detail"]})
    for old in storage.list_files(storage.join(output_uri, "rejects")):
        storage.delete(old)
    for r, rows in samples.items():
        storage.write_text(storage.join(output_uri, "rejects", f"{r}.jsonl"),
                           "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows))
    storage.write_bytes(storage.join(output_uri, "stats.png"), _stats_png(stats))
    storage.write_json(storage.join(output_uri, "stats.json"), stats)


def _stats_png(stats: dict) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["kept"] + list(stats["rejected"])
    values = [stats["kept"]] + list(stats["rejected"].values())
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(labels) + 1.2))
    bars = ax.barh(labels[::-1], values[::-1], color=["#c44e52"] * (len(labels) - 1) + ["#55a868"])
    ax.bar_label(bars, padding=2, fontsize=8)
    ax.set_xlabel("records")
    ax.set_title(f"filter: {stats['kept']} of {stats['total']} kept")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()

"""The filter stage's record of every decision: the decisions dataset, stats.json (computed from it), reject
samples and the reasons plot.

`OUT/decisions/part-<unit>.parquet` is a partitioned parquet dataset with one row per input record, one
part per source unit, each in source order (`units.DECISION_SCHEMA`: key, source_uri, kept, reason, detail,
caption, language, language_score, width, height, sha256, phash, clip_score, duplicate_of); read it whole
with `read_decisions(OUT)` or `pyarrow.dataset.dataset(OUT/decisions)`. Each part is written by its unit's
task (units.finish_unit), which also counts it; the driver adds the counts up (`Tally`: a counter per
reason and language and a bounded sample per reason, nothing per record).
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pyarrow as pa

from components.common import config, storage
from components.filter.config import REASONS, FilterConfig
from components.common.shuffle import read_table


def decisions_uri(output_uri: str) -> str:
    return storage.join(output_uri, "decisions")


def decision_parts(output_uri: str) -> list[str]:
    return [p for p in storage.list_files(decisions_uri(output_uri)) if p.endswith(".parquet")]


def read_decisions(output_uri: str, columns: list[str] | None = None) -> pa.Table:
    """The whole decisions dataset in source order (for tests and small runs: it is one row per record)."""
    return pa.concat_tables([read_table(p, columns) for p in decision_parts(output_uri)])


class Tally:
    """The totals of the units' counts (units.finish_unit), added up as they arrive, in any order."""

    def __init__(self, reject_samples: int) -> None:
        self.total = self.kept = self.written = 0
        self.reasons: Counter = Counter()
        self.languages: Counter = Counter()
        self.samples: dict[str, list[tuple[int, int, dict]]] = {}
        self.limit = reject_samples

    def add(self, unit: dict) -> None:
        self.total += unit["total"]
        self.kept += unit["kept"]
        self.written += unit["written"]
        self.reasons.update(unit["reasons"])
        self.languages.update(unit["languages"])
        for reason, rows in unit["samples"].items():  # the first samples in source order, whatever came first
            have = self.samples.setdefault(reason, []) + [(unit["idx"], i, r) for i, r in enumerate(rows)]
            self.samples[reason] = sorted(have, key=lambda x: x[:2])[:self.limit]

    def counts(self) -> dict:
        top = sorted(self.languages.items(), key=lambda kv: (-kv[1], kv[0]))[:20]
        return {"total": self.total, "kept": self.kept,
                "rejected": {r: self.reasons[r] for r in REASONS if self.reasons.get(r)},
                "unknown_reasons": sorted(set(self.reasons) - set(REASONS)), "languages": dict(top)}

    def write_samples(self, output_uri: str) -> None:
        for old in storage.list_files(storage.join(output_uri, "rejects")):
            storage.delete(old)
        for reason, rows in self.samples.items():
            storage.write_text(storage.join(output_uri, "rejects", f"{reason}.jsonl"),
                               "".join(json.dumps(r, ensure_ascii=False) + "\n" for _, _, r in rows))


def build_stats(counts: dict, written: int, cfg: FilterConfig, timing: dict, t0: float, source_uri: str,
                output_uri: str, rules_report: dict) -> dict:
    """stats.json from the decision counts (asserting kept + rejected = total and kept = rows written)."""
    rejected = sum(counts["rejected"].values())
    if counts["unknown_reasons"] or counts["kept"] + rejected != counts["total"] or written != counts["kept"]:
        raise AssertionError(f"filter accounting broken: decisions say kept {counts['kept']} + rejected {rejected} "
                             f"of {counts['total']} (unknown reasons {counts['unknown_reasons']}); {written} kept "
                             "rows written")
    timing["total_s"] = time.perf_counter() - t0
    timing["records_per_s"] = counts["total"] / timing["total_s"] if timing["total_s"] > 0 else 0.0
    return {
        "source_uri": source_uri, "output_uri": output_uri, "total": counts["total"], "kept": counts["kept"],
        "rejected": counts["rejected"], "kept_fraction": counts["kept"] / counts["total"] if counts["total"] else 0.0,
        "languages": counts["languages"], "decisions_uri": decisions_uri(output_uri),
        **rules_report, "config": config.to_dict(cfg), "timing": timing,
    }


def write_stats(stats: dict, output_uri: str) -> None:
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

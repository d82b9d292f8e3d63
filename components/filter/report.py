"""The filter stage's record of every decision: decisions.parquet, stats.json (computed from it), reject
samples and the reasons plot.

`decisions.parquet` has one row per input record, in source order (`units.DECISION_SCHEMA`: key,
source_uri, kept, reason, detail, caption, language, language_score, width, height, sha256, phash,
clip_score, duplicate_of). It is streamed together unit by unit from the per-unit parts, with the
whole-dataset rejections applied, so the driver holds one unit's rows at a time.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.common import config, storage
from components.filter.config import REASONS, FilterConfig
from components.filter.units import DECISION_SCHEMA, UNIT_SHIFT, part_uri, read_parquet

SAMPLE_FIELDS = ("key", "source_uri", "caption", "detail", "duplicate_of")


def _apply(part: pa.Table, rejects: pa.Table) -> pa.Table:
    """The unit's decision rows with the whole-dataset rejections (`rejects`: this unit's, by uid) applied."""
    if rejects.num_rows:
        at = pc.index_in(part["uid"], value_set=rejects["uid"])
        hit = pc.is_valid(at)
        for col in ("reason", "detail", "duplicate_of"):
            part = part.set_column(part.schema.get_field_index(col), col,
                                   pc.if_else(hit, pc.take(rejects[col], at), part[col]))
        part = part.set_column(part.schema.get_field_index("kept"), "kept", pc.equal(part["reason"], ""))
    return part.select(DECISION_SCHEMA.names).cast(DECISION_SCHEMA)


def write_decisions(work_uri: str, unit_ids: list[int], rejects: pa.Table, output_uri: str,
                    reject_samples: int) -> dict:
    """Write OUT/decisions.parquet and OUT/rejects/<reason>.jsonl; returns the counts read back from
    decisions.parquet: {"total", "kept", "rejected": {reason: n}, "languages": {lang: kept}}."""
    rejects = rejects.sort_by("uid")
    rej_units = rejects["uid"].to_numpy() >> UNIT_SHIFT  # each unit's rejections are one slice
    samples: dict[str, list[dict]] = {}
    uri = storage.join(output_uri, "decisions.parquet")
    with tempfile.TemporaryDirectory(prefix="decisions-") as tmp:
        local = os.path.join(tmp, "decisions.parquet") if storage.is_s3(uri) else uri + ".partial"
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        with pq.ParquetWriter(local, DECISION_SCHEMA, compression="zstd") as writer:
            for idx in unit_ids:
                lo, hi = np.searchsorted(rej_units, [idx, idx + 1])
                part = _apply(read_parquet(part_uri(work_uri, "decisions", idx)), rejects.slice(lo, hi - lo))
                writer.write_table(part)
                _collect_samples(part, samples, reject_samples)
                storage.delete(part_uri(work_uri, "decisions", idx))
        counts = count_decisions(local)
        if storage.is_s3(uri):
            storage.upload_file(local, uri)
        else:
            os.replace(local, uri)
    for old in storage.list_files(storage.join(output_uri, "rejects")):
        storage.delete(old)
    for reason, rows in samples.items():
        storage.write_text(storage.join(output_uri, "rejects", f"{reason}.jsonl"),
                           "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows))
    return counts


def _collect_samples(part: pa.Table, samples: dict[str, list[dict]], limit: int) -> None:
    rejected = part.filter(pc.invert(part["kept"]))
    if not rejected.num_rows or limit <= 0:
        return
    for reason in pc.unique(rejected["reason"]).to_pylist():
        have = samples.setdefault(reason, [])
        if len(have) < limit:
            rows = rejected.filter(pc.equal(rejected["reason"], reason)).slice(0, limit - len(have))
            have += rows.select(list(SAMPLE_FIELDS)).to_pylist()


def count_decisions(path: str) -> dict:
    """Totals of a decisions.parquet, read back from the file row group by row group."""
    reasons: Counter = Counter()
    languages: Counter = Counter()
    total = 0
    for batch in pq.ParquetFile(path).iter_batches(columns=["kept", "reason", "language"], batch_size=65536):
        total += batch.num_rows
        for item in pc.value_counts(batch.column("reason")).to_pylist():
            reasons[item["values"]] += item["counts"]
        kept_lang = pc.filter(batch.column("language"), batch.column("kept"))
        for item in pc.value_counts(kept_lang).to_pylist():
            languages[item["values"]] += item["counts"]
    kept = reasons.pop("", 0)
    return {"total": total, "kept": kept, "rejected": {r: reasons[r] for r in REASONS if reasons.get(r)},
            "unknown_reasons": sorted(set(reasons) - set(REASONS)), "languages": dict(languages.most_common(20))}


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
        "languages": counts["languages"], "decisions_uri": storage.join(output_uri, "decisions.parquet"),
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

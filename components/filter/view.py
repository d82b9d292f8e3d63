"""What the filter stage shows when it ends: the reasons table (KFP Markdown, MLflow description) and
its key figures (the console's end line)."""

from __future__ import annotations

from typing import Any

from components.common import storage
from components.common.publish import Figure, markdown_table, publish


def headline(stats: dict) -> str:
    total, kept = stats["total"], stats["kept"]
    top = sorted(stats["rejected"].items(), key=lambda kv: -kv[1])[:3]
    reasons = ", ".join(f"{reason} {n}" for reason, n in top) + (", ..." if len(stats["rejected"]) > 3 else "")
    return (f"kept {kept} of {total} pairs ({kept / total if total else 0:.0%}); rejected {total - kept}"
            + (f" ({reasons})" if reasons else ""))


def markdown(stats: dict) -> str:
    total, kept = stats["total"], stats["kept"]
    timing = stats.get("timing") or {}
    lines = ["# Filter", "", f"- source: `{stats['source_uri']}`", f"- preset: {stats['config'].get('preset')}",
             f"- kept **{kept}** of {total} pairs ({kept / total if total else 0:.1%})"
             + (f" in {timing['total_s']:.1f} s ({timing.get('records_per_s', 0):.1f} records/s)"
                if timing.get("total_s") else ""), f"- output: `{stats['output_uri']}`", "",
             "## Why records were rejected", ""]
    rows = [[reason, n, f"{n / total:.1%}"] for reason, n in sorted(stats["rejected"].items(), key=lambda kv: -kv[1])]
    lines += markdown_table(["reason", "records", "share of all"], rows + [["**kept**", kept, f"{kept / total:.1%}"
                                                                              if total else "-"]])
    if stats.get("languages"):
        lines += ["", "## Languages (top 5)", ""]
        top = sorted(stats["languages"].items(), key=lambda kv: -kv[1])[:5]
        lines += markdown_table(["language", "records"], [list(kv) for kv in top])
    lines += ["", "Samples of each rejection reason: `rejects/<reason>.jsonl` in the stage's MLflow run; every "
                  f"record's decision (key, kept or the rule that rejected it): `{stats['decisions_uri']}`."]
    return "\n".join(lines)


def show(artifact: Any, pointer: dict, tracking: Any = None) -> dict:
    """Publish the finished filter stage; returns `pointer` (the step's result) unchanged."""
    stats = pointer["stats"]
    plot = storage.join(stats["output_uri"], "stats.png")  # drawn by the stage, logged by the step
    figures = [Figure("Kept and rejected records", "plots/stats.png", storage.read_bytes(plot), logged=True)] \
        if storage.exists(plot) else []
    publish("filter", artifact, markdown(stats), headline(stats), tracking, pointer.get("run_id"), figures)
    return pointer

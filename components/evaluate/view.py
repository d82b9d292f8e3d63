"""What the evaluate stage shows when it ends: the evaluation report (KFP Markdown, MLflow description;
`components.evaluate.report.markdown_report`) and its key figures (the console's end line)."""

from __future__ import annotations

from typing import Any

from components.common import storage
from components.common.publish import Figure, publish
from components.evaluate.report import markdown_report

HEADLINE_METRICS = (("mean/zeroshot_top1", "mean zero-shot top-1"),
                    ("mean/linear_probe_top1_full", "mean linear probe top-1"),
                    ("validation/retrieval_text_to_image_R_at_1", "text->image R@1"))


def headline(report: dict) -> str:
    suite = (report.get("suite") or {}).get("name") or "-"
    metrics = report.get("metrics") or {}
    figures = ", ".join(f"{label} {metrics[key]:.3f}" for key, label in HEADLINE_METRICS if key in metrics)
    return f"suite {suite}, {len(report.get('datasets') or {})} datasets" + (f": {figures}" if figures else "")


def figures(report: dict) -> list[Figure]:
    """The suite-level plots the stage drew (`components.evaluate.report.write_figures`), already in its run."""
    plots = storage.join(report["report_uri"].rsplit("/", 1)[0], "plots") if report.get("report_uri") else ""
    names = [("Few-shot linear probe against zero-shot", "few_shot.png"),
             *((f"Robustness under shift: {ref}", f"robustness_{ref}.png") for ref in report.get("robustness") or {}),
             ("Retrieval recall@K", "retrieval_recall.png")]
    found = [(title, name, storage.join(plots, name)) for title, name in names] if plots else []
    return [Figure(title, f"plots/{name}", storage.read_bytes(uri), logged=True) for title, name, uri in found
            if storage.exists(uri)]


def show(artifact: Any, report: dict, tracking: Any = None) -> dict:
    """Publish the finished evaluate stage (means over the suite's datasets); returns `report` unchanged."""
    publish("evaluate", artifact, markdown_report(report), headline(report), tracking, report.get("mlflow_run_id"),
            figures(report))
    return report

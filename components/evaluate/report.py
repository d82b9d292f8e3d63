"""The evaluate stage's outputs: the KFP metrics artifacts, the Markdown report, the MLflow tables and the PNGs."""

from __future__ import annotations

import io
import posixpath
from typing import Any

from components.common import storage
from components.common import tracking as mltrack
from components.evaluate import plots as eval_plots
from components.evaluate import tables
from components.evaluate.metrics import dataset_metrics, mean_metrics

PER_DATASET_FIGURES_MAX = 12  # datasets beyond this many get no confusion-matrix / per-class PNGs


def _first_confusion(report: dict) -> dict | None:
    for entry in (report.get("datasets") or {}).values():
        cm = (entry.get("zeroshot") or {}).get("confusion_matrix")
        if cm:
            return cm
    return None


def to_kfp_artifacts(report: dict, metrics_artifact: Any = None, classification_artifact: Any = None) -> None:
    """Fill KFP ``dsl.Metrics`` (every metric) and ``dsl.ClassificationMetrics`` (the zero-shot confusion matrix
    of the suite's first dataset that has one; KFP holds one) from a report (either artifact may be None; a flat
    metrics dict fills Metrics only)."""
    metrics = report["metrics"] if isinstance(report.get("metrics"), dict) else \
        {k: v for k, v in report.items() if isinstance(v, (int, float))}
    if metrics_artifact is not None:
        for name, value in sorted(metrics.items()):
            metrics_artifact.log_metric(name, float(value))
    cm = _first_confusion(report)
    if classification_artifact is not None and cm:
        classification_artifact.log_confusion_matrix(list(cm["categories"]),
                                                     [[int(v) for v in row] for row in cm["matrix"]])


def markdown_report(report: dict) -> str:
    """The KFP Markdown visualisation: the suite, what was skipped, the results table with the mean over
    datasets, the few-shot table, each robustness table, every metric."""
    suite = report.get("suite") or {}
    lines = ["# CLIP evaluation", "", f"- suite: {suite.get('name') or '-'} ({suite.get('source', '')})"]
    for name, entry in (report.get("datasets") or {}).items():
        bad = f"; {entry['bad_records']} records skipped (see report.json)" if entry.get("bad_records") else ""
        lines.append(f"- {name}: {entry['source']}; tasks {', '.join(entry['tasks'])}{bad}")
    lines += [f"- {what} skipped: {why}" for what, why in (report.get("skipped") or {}).items()]
    lines += ["", "## Results", ""] + tables.to_markdown(tables.results_table(report))
    few = tables.few_shot_table(report)
    if few[1]:
        lines += ["", "## Few-shot linear probe against zero-shot", ""] + tables.to_markdown(few)
    for entry in (report.get("robustness") or {}).values():
        lines += ["", f"## Robustness: {entry['reference']}", "", tables.robustness_caption(entry), ""]
        lines += tables.to_markdown(tables.robustness_table(entry))
    lines += ["", "## All metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value:.4f} |" for key, value in sorted(report.get("metrics", {}).items())]
    return "\n".join(lines) + "\n"


def results_frame(report: dict) -> dict[str, list]:
    """The results as columns (an MLflow table): one row per dataset, then the mean over datasets."""
    datasets = report.get("datasets") or {}
    rows = [{"dataset": name, "shift_of": e.get("shift_of") or "", "n": e.get("n"), "num_classes": e.get("num_classes"),
             **dataset_metrics(e)} for name, e in datasets.items()]
    rows.append({"dataset": "mean", "shift_of": "", "n": None, "num_classes": None, **mean_metrics(datasets)})
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return {k: [r.get(k) for r in rows] for k in keys}


def robustness_frame(entry: dict) -> dict[str, list]:
    keys = list(entry["rows"][0])
    return {k: [r[k] for r in entry["rows"]] for k in keys}


def _save_figure(fig, output_uri: str, name: str) -> None:
    """Render `fig` once: to `<output_uri>/plots/<name>`, then that file into the MLflow run."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    eval_plots.close(fig)
    uri = storage.join(output_uri, "plots", name)
    storage.write_bytes(uri, buf.getvalue())
    mltrack.log_file(uri, posixpath.dirname(f"plots/{name}"))


def write_figures(report: dict, examples: dict | None, output_uri: str) -> None:
    """The PNGs under `<output_uri>/plots/` (also logged to the active MLflow run): per dataset
    `<name>/confusion_matrix.png` and `<name>/per_class_accuracy.png`; `few_shot.png`,
    `robustness_<reference>.png`, `retrieval_recall.png` (R@K of every dataset with retrieval) and
    `retrieval_examples.png` (the validation split)."""
    datasets = report.get("datasets") or {}
    for name, entry in list(datasets.items())[:PER_DATASET_FIGURES_MAX]:
        zs = entry.get("zeroshot")
        if not zs:
            continue
        if zs.get("confusion_matrix"):
            cm = zs["confusion_matrix"]
            _save_figure(eval_plots.confusion_matrix_figure(cm["matrix"], cm["categories"],
                                                            f"{name}: zero-shot confusion matrix (top-1 {zs['top1']:.3f})"),
                         output_uri, f"{name}/confusion_matrix.png")
        acc = [a if a is not None else 0.0 for a in zs["per_class_accuracy"]]
        _save_figure(eval_plots.per_class_accuracy_figure(acc, zs["classnames"], zs["chance"],
                                                          f"{name}: zero-shot accuracy per class"),
                     output_uri, f"{name}/per_class_accuracy.png")
    probed = {n: e for n, e in datasets.items() if (e.get("linear_probe") or {}).get("settings")}
    if probed:
        _save_figure(eval_plots.few_shot_figure(probed), output_uri, "few_shot.png")
    for reference, entry in (report.get("robustness") or {}).items():
        _save_figure(eval_plots.robustness_figure(entry), output_uri, f"robustness_{reference}.png")
    retrieved = {n: e for n, e in datasets.items() if e.get("retrieval")}
    if retrieved:
        _save_figure(eval_plots.retrieval_recall_figure(retrieved), output_uri, "retrieval_recall.png")
    if examples and examples["captions"]:
        _save_figure(eval_plots.retrieval_examples_figure(examples["captions"], examples["ranked"],
                                                          examples["thumbnails"], examples["targets"]),
                     output_uri, "retrieval_examples.png")


def log_outputs(report: dict, examples: dict | None, output_uri: str) -> None:
    """Into the active MLflow run: the metrics, the results and robustness tables (MLflow tables), the
    Markdown report and the figures; the Markdown also to `<output_uri>/report.md`."""
    import mlflow

    mlflow.log_metrics(report["metrics"])
    mlflow.set_tags({"eval_suite": (report.get("suite") or {}).get("name") or "",
                     "eval_datasets": ",".join(report.get("datasets") or {})})
    if report.get("datasets"):
        mlflow.log_table(results_frame(report), "tables/results.json")
    for reference, entry in (report.get("robustness") or {}).items():
        mlflow.log_table(robustness_frame(entry), f"tables/robustness_{reference}.json")
    markdown = markdown_report(report)
    storage.write_text(storage.join(output_uri, "report.md"), markdown)
    mlflow.log_text(markdown, "report.md")
    write_figures(report, examples, output_uri)

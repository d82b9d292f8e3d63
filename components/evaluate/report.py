"""The evaluate stage's outputs: flat metric names, the KFP metrics artifacts, the PNGs, the Markdown."""

from __future__ import annotations

import io
from typing import Any

from components.common import storage
from components.common import tracking as mltrack
from components.evaluate import plots as eval_plots


def flat_metrics(report: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    zs = report.get("zeroshot")
    if zs:
        out.update(zeroshot_top1=zs["top1"], zeroshot_top5=zs["top5"], zeroshot_mean_per_class=zs["mean_per_class"])
    for k, v in (report.get("retrieval") or {}).items():
        if k != "n":
            out["retrieval_" + k.replace("@", "_at_")] = float(v)
    for name, s in ((report.get("linear_probe") or {}).get("settings") or {}).items():
        out[f"linear_probe_top1_{name}"] = s["top1"]
    return {k: float(v) for k, v in out.items()}


# --------------------------------------------------------------------------- outputs

def to_kfp_artifacts(report: dict, metrics_artifact: Any = None, classification_artifact: Any = None) -> None:
    """Fill KFP ``dsl.Metrics`` (every metric) and ``dsl.ClassificationMetrics`` (the zero-shot
    confusion matrix) from a report (either artifact may be None; a flat metrics dict fills Metrics only)."""
    metrics = report["metrics"] if isinstance(report.get("metrics"), dict) else \
        {k: v for k, v in report.items() if isinstance(v, (int, float))}
    if metrics_artifact is not None:
        for name, value in sorted(metrics.items()):
            metrics_artifact.log_metric(name, float(value))
    cm = (report.get("zeroshot") or {}).get("confusion_matrix")
    if classification_artifact is not None and cm:
        classification_artifact.log_confusion_matrix(list(cm["categories"]),
                                                     [[int(v) for v in row] for row in cm["matrix"]])


def _save_figure(fig, output_uri: str, name: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    storage.write_bytes(storage.join(output_uri, "plots", name), buf.getvalue())
    mltrack.log_figure(fig, f"plots/{name}")


def write_figures(report: dict, examples: dict | None, output_uri: str) -> None:
    """The evaluation PNGs under `<output_uri>/plots/`, also logged to the active MLflow run."""
    zs = report.get("zeroshot")
    if zs:
        cm = zs["confusion_matrix"]
        _save_figure(eval_plots.confusion_matrix_figure(cm["matrix"], cm["categories"],
                                                        f"zero-shot confusion matrix (top-1 {zs['top1']:.3f})"),
                     output_uri, "confusion_matrix.png")
        acc = [a if a is not None else 0.0 for a in zs["per_class_accuracy"]]
        _save_figure(eval_plots.per_class_accuracy_figure(acc, zs["classnames"], zs["chance"]),
                     output_uri, "per_class_accuracy.png")
    lp = report.get("linear_probe")
    if lp and lp.get("settings"):
        _save_figure(eval_plots.linear_probe_figure(lp["settings"], zs["top1"] if zs else None,
                                                    lp["chance"]), output_uri, "linear_probe.png")
    if examples and examples["captions"]:
        _save_figure(eval_plots.retrieval_examples_figure(examples["captions"], examples["ranked"],
                                                          examples["thumbnails"], examples["targets"]),
                     output_uri, "retrieval_examples.png")


def markdown_report(report: dict) -> str:
    """The KFP Markdown visualisation: what was evaluated, what was skipped, every metric."""
    lines = ["# CLIP evaluation", "", f"- dataset: {report.get('dataset')}", f"- labelled set: {report.get('eval_data')}"]
    lines += [f"- {what} skipped: {why}" for what, why in (report.get("skipped") or {}).items()]
    lines += ["", "| metric | value |", "|---|---|"]
    for key, value in sorted(report.get("metrics", {}).items()):
        lines.append(f"| {key} | {value:.4f} |")
    return "\n".join(lines) + "\n"

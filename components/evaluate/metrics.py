"""Flat metric names of an evaluation report (MLflow forbids '@' in names, so R@1 is R_at_1).

Per dataset: ``<dataset>/zeroshot_top1``, ``<dataset>/zeroshot_top5``, ``<dataset>/zeroshot_mean_per_class``,
``<dataset>/linear_probe_top1_{k}shot``, ``<dataset>/linear_probe_top1_full``, ``<dataset>/zeroshot_matches_shots``
(where zero-shot meets the few-shot curve), ``<dataset>/retrieval_{image_to_text,text_to_image}_R_at_{1,5,10}``
and ``..._{mean,median}_rank``; the manifest's validation split is the dataset ``validation``.
Over the datasets: ``mean/<metric>`` (the mean over the datasets that have it) of the accuracies and
recalls (ranks and shots depend on a dataset's size, so they have no mean).
Robustness: ``robustness/<reference>/...`` (`components.evaluate.robustness.robustness_metrics`).
"""

from __future__ import annotations

import numpy as np

from components.evaluate.robustness import robustness_metrics


def dataset_metrics(entry: dict) -> dict[str, float]:
    """The flat metrics of one dataset's report entry (unprefixed)."""
    out: dict[str, float] = {}
    zs = entry.get("zeroshot")
    if zs:
        out.update(zeroshot_top1=zs["top1"], zeroshot_top5=zs["top5"], zeroshot_mean_per_class=zs["mean_per_class"])
    for name, s in ((entry.get("linear_probe") or {}).get("settings") or {}).items():
        out[f"linear_probe_top1_{name}"] = s["top1"]
    few = entry.get("few_shot") or {}
    if few.get("shots") is not None:
        out["zeroshot_matches_shots"] = few["shots"]
    for k, v in (entry.get("retrieval") or {}).items():
        if k not in ("n", "captions"):
            out["retrieval_" + k.replace("@", "_at_")] = float(v)
    return {k: float(v) for k, v in out.items()}


def mean_metrics(datasets: dict[str, dict]) -> dict[str, float]:
    """{accuracy or recall metric: mean over the datasets that have it}."""
    values: dict[str, list[float]] = {}
    for entry in datasets.values():
        for k, v in dataset_metrics(entry).items():
            if not k.endswith(("_rank", "_shots")):
                values.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in values.items()}


def flat_metrics(report: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, entry in (report.get("datasets") or {}).items():
        out.update({f"{name}/{k}": v for k, v in dataset_metrics(entry).items()})
    out.update({f"mean/{k}": v for k, v in mean_metrics(report.get("datasets") or {}).items()})
    for entry in (report.get("robustness") or {}).values():
        out.update(robustness_metrics(entry))
    return out

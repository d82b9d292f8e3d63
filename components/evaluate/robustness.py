"""Robustness under distribution shift: zero-shot against a linear probe fitted on the reference.

The CLIP paper's "adapt to ImageNet" comparison (its Figures 13 and 14): a linear probe fitted on a reference
dataset gains accuracy there but keeps less of it on shifted versions of the same classes than zero-shot
classification does. For a reference and its shifted sets:

- on the reference, both methods are scored on the probe's held-out test split (the same images; the
  whole reference set for zero-shot when no probe was fitted);
- on a shifted set, zero-shot is the set's own zero-shot accuracy (its class names, its prompts) and the
  probe predicts among the set's classes (a set may hold a subset of the reference's classes, as
  ImageNet-R and -A do);
- drop = accuracy on the reference - accuracy on the shifted set (positive = lost under shift).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from components.evaluate.evalset import norm_classname
from components.evaluate.probe import FittedProbe

METHODS = ("zeroshot", "linear_probe")
METHOD_NAMES = {"zeroshot": "zero-shot", "linear_probe": "linear probe"}


@dataclass
class Scored:
    """One dataset as the robustness report needs it: labels in its own class order, image features and
    the zero-shot prediction of each image."""

    name: str
    classnames: list[str]
    labels: np.ndarray
    features: np.ndarray
    zeroshot_pred: np.ndarray


def _accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(pred == truth)) if len(truth) else float("nan")


def robustness(reference: Scored, shifted: list[Scored], probe: FittedProbe | None) -> dict:
    """{"reference", "probe_fitted_on", "reference_split", "rows": [reference row, one per shifted set],
    "mean": {accuracy and drop of each method over the shifted sets}}; a row has dataset, n, and per method
    ``<method>_top1`` and ``<method>_drop`` (None where there is no probe)."""
    idx = probe.test_idx if probe is not None else np.arange(len(reference.labels))
    truth = reference.labels[idx]
    ref_acc = {"zeroshot": _accuracy(reference.zeroshot_pred[idx], truth),
               "linear_probe": _accuracy(probe.predict(reference.features[idx]), truth) if probe else None}
    rows = [{"dataset": reference.name, "n": int(len(idx)), "role": "reference",
             **{f"{m}_top1": ref_acc[m] for m in METHODS}, **{f"{m}_drop": None for m in METHODS}}]
    index = {norm_classname(n): i for i, n in enumerate(reference.classnames)}
    for s in shifted:
        to_ref = np.array([index[norm_classname(n)] for n in s.classnames], dtype=int)
        acc = {"zeroshot": _accuracy(s.zeroshot_pred, s.labels),
               "linear_probe": _accuracy(probe.predict(s.features, allowed=to_ref), to_ref[s.labels])
               if probe else None}
        rows.append({"dataset": s.name, "n": int(len(s.labels)), "role": "shifted",
                     **{f"{m}_top1": acc[m] for m in METHODS},
                     **{f"{m}_drop": (ref_acc[m] - acc[m]) if acc[m] is not None else None for m in METHODS}})
    shifts = rows[1:]
    mean = {}
    for m in METHODS:
        for what in ("top1", "drop"):
            values = [r[f"{m}_{what}"] for r in shifts if r[f"{m}_{what}"] is not None]
            mean[f"{m}_{what}"] = float(np.mean(values)) if values else None
    return {"reference": reference.name, "probe_fitted_on": reference.name if probe else None,
            "reference_split": "the linear probe's held-out test split" if probe else "all of it",
            "rows": rows, "mean": mean}


def robustness_metrics(entry: dict) -> dict[str, float]:
    """Flat metrics of one reference's report: ``robustness/<reference>/<dataset>/<method>_{top1,drop}`` and
    ``robustness/<reference>/mean_<method>_{top1,drop}`` (over the shifted sets)."""
    out: dict[str, float] = {}
    prefix = f"robustness/{entry['reference']}"
    for row in entry["rows"]:
        for key in (f"{m}_{w}" for m in METHODS for w in ("top1", "drop")):
            if row.get(key) is not None:
                out[f"{prefix}/{row['dataset']}/{key}"] = float(row[key])
    for key, value in entry["mean"].items():
        if value is not None:
            out[f"{prefix}/mean_{key}"] = float(value)
    return out

"""The report's tables as rows of strings, rendered as Markdown (the KFP report) or plain text (`clipflow run`'s
closing summary): the suite's results with the mean over datasets, the few-shot curve, and the robustness
table the way the CLIP paper's Figure 13 reads. Torch-free."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from components.evaluate.metrics import dataset_metrics, mean_metrics
from components.evaluate.robustness import METHOD_NAMES, METHODS

Table = tuple[list[str], list[list[str]]]

RESULT_COLUMNS = [("zero-shot top-1", "zeroshot_top1"), ("zero-shot top-5", "zeroshot_top5"),
                  ("probe full top-1", "linear_probe_top1_full"), ("zero-shot = k-shot", "zeroshot_matches_shots"),
                  ("image->text R@1", "retrieval_image_to_text_R_at_1"),
                  ("text->image R@1", "retrieval_text_to_image_R_at_1")]


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _shots(entry: dict) -> str:
    few = entry.get("few_shot") or {}
    if few.get("relation") == "matches":
        return f"{few['shots']:.1f}"
    if few.get("relation") == "below":
        return f"<= {few['shots']:g}"
    if few.get("relation") == "above":
        return "> full"
    return "-"


def results_table(report: dict) -> Table:
    """One row per dataset (n, classes, the headline metrics) and the mean over datasets."""
    header = ["dataset", "shift of", "n", "classes"] + [h for h, _k in RESULT_COLUMNS]
    rows = []
    for name, entry in (report.get("datasets") or {}).items():
        m = dataset_metrics(entry)
        cells = [_shots(entry) if key == "zeroshot_matches_shots" else _num(m.get(key)) for _h, key in RESULT_COLUMNS]
        rows.append([name, entry.get("shift_of") or "", str(entry.get("n", "")), str(entry.get("num_classes") or "-")]
                    + cells)
    if len(rows) > 1:
        mean = mean_metrics(report["datasets"])
        rows.append([f"mean over {len(rows)} datasets", "", "", ""]
                    + ["" if key == "zeroshot_matches_shots" else _num(mean.get(key)) for _h, key in RESULT_COLUMNS])
    return header, rows


def few_shot_table(report: dict) -> Table:
    """Linear-probe accuracy by shots per class next to zero-shot accuracy, per dataset."""
    datasets = {n: e for n, e in (report.get("datasets") or {}).items() if (e.get("linear_probe") or {}).get("settings")}
    shots = sorted({s["shots"] for e in datasets.values() for s in e["linear_probe"]["settings"].values() if s["shots"]})
    header = ["dataset", "zero-shot"] + [f"{k}-shot" for k in shots] + ["full", "zero-shot = k-shot"]
    rows = []
    for name, entry in datasets.items():
        by_shots = {s["shots"]: s["top1"] for s in entry["linear_probe"]["settings"].values()}
        zs = (entry.get("zeroshot") or {}).get("top1")
        rows.append([name, _num(zs)] + [_num(by_shots.get(k)) for k in shots] + [_num(by_shots.get(None)), _shots(entry)])
    return header, rows


def robustness_table(entry: dict) -> Table:
    """The reference, each shifted set and the mean over them: accuracy and drop of each method."""
    header = ["dataset", "n"] + [METHOD_NAMES[m] for m in METHODS] + [f"{METHOD_NAMES[m]} drop" for m in METHODS]
    rows = []
    for row in entry["rows"]:
        name = row["dataset"] + (" (reference)" if row["role"] == "reference" else "")
        rows.append([name, str(row["n"])] + [_num(row[f"{m}_top1"]) for m in METHODS]
                    + [_num(row[f"{m}_drop"]) for m in METHODS])
    if len(entry["rows"]) > 1:
        mean = entry["mean"]
        rows.append([f"mean over {len(entry['rows']) - 1} shifted sets", ""] + [_num(mean[f"{m}_top1"]) for m in METHODS]
                    + [_num(mean[f"{m}_drop"]) for m in METHODS])
    return header, rows


def robustness_caption(entry: dict) -> str:
    fitted = f"the linear probe is fitted on {entry['probe_fitted_on']}" if entry["probe_fitted_on"] \
        else "no linear probe on the reference"
    return (f"Robustness under distribution shift: reference {entry['reference']} (scored on "
            f"{entry['reference_split']}); {fitted}; drop = accuracy on the reference - accuracy under shift")


def to_markdown(table: Table) -> list[str]:
    header, rows = table
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def to_text(table: Table, indent: str = "  ") -> list[str]:
    header, rows = table
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return indent + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header)] + [line(r) for r in rows]


def robustness_text(report: dict) -> list[str]:
    """Every robustness table of a report as plain text lines (the end of `clipflow run`)."""
    lines: list[str] = []
    for entry in (report.get("robustness") or {}).values():
        lines += [""] + textwrap.wrap(robustness_caption(entry), 100, initial_indent="  ", subsequent_indent="  ")
        lines += to_text(robustness_table(entry), indent="    ")
    return lines

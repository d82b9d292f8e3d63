"""What a stage shows people when it ends, in the three places they look.

`publish(...)`, called once by each stage's step through its view (`components/<stage>/view.py`):
- the KFP UI: the stage's `Markdown` artifact (the body, figures embedded as PNG data URIs);
- MLflow: the stage run's description (`mlflow.note.content`: the body, figures as artifacts beside it)
  and its `headline` tag; the figures as PNG artifacts of the run;
- the terminal: the stage's end line, the headline (`components.common.console.finished`).

`pipeline_note(...)` writes the parent run's description from the stage runs' headlines and the lineage
tags the steps left on it (`components.common.context.finish_run` calls it).
"""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.common import console

NOTE_TAG = "mlflow.note.content"  # the MLflow UI shows it as the run's description (Markdown)
HEADLINE_TAG = "headline"
NOTE_MAX_CHARS = 7900  # MLflow truncates tag values at 8000 characters


@dataclass
class Figure:
    title: str
    artifact_path: str  # where it is in the stage's MLflow run, e.g. "plots/training_curves.png"
    png: bytes
    logged: bool = False  # already an artifact of the run (the stage logged it): not logged again


def png_bytes(fig: Any, dpi: int = 90) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return buf.getvalue()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")

    return ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def _cells(row: str) -> list[str]:
    parts = re.split(r"(?<!\\)\|", row.strip())[1:-1]  # split at | but not at \|
    return [p.strip().replace("\\|", "|").replace("**", "").replace("`", "") for p in parts]


def text_tables(markdown: str) -> str:
    """Markdown tables as aligned text in code blocks (the MLflow UI draws tables without cell padding)."""
    out: list[str] = []
    block: list[str] = []
    for line in [*markdown.split("\n"), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            rows = [_cells(r) for r in block if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", r.strip())]
            widths = [max(len(r[i]) if i < len(r) else 0 for r in rows) for i in range(max(map(len, rows)))]
            out += ["```"] + ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows] + ["```"]
            block = []
        out.append(line)
    return "\n".join(out[:-1])


def _kfp_markdown(body: str, figures: list[Figure]) -> str:
    parts = [body.rstrip()]
    for f in figures:
        parts.append(f"### {f.title}\n\n![{f.title}](data:image/png;base64,{base64.b64encode(f.png).decode()})")
    return "\n\n".join(parts) + "\n"


def _mlflow_note(body: str, headline: str, figures: list[Figure], run_id: str) -> str:
    """The headline first (the MLflow UI previews a description's first lines), the body without its title
    (the run's name says it), the figures shown from the run's artifacts (the UI's `get-artifact` route,
    relative to the page)."""
    from urllib.parse import quote

    lines = body.strip().split("\n")
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    body = f"**{headline}**\n\n" + text_tables("\n".join(lines).strip())
    tail = "".join(f"\n\n{f.title} (artifact `{f.artifact_path}`):\n\n"
                   f"![{f.title}](get-artifact?path={quote(f.artifact_path)}&run_uuid={run_id})" for f in figures)
    if len(body) + len(tail) > NOTE_MAX_CHARS:
        body = body[:NOTE_MAX_CHARS - len(tail) - 90].rsplit("\n", 1)[0]
        body += "\n```" * (body.count("```") % 2)  # cut inside a table: close its block
        body += "\n\n… (cut to fit the description; the whole report is in the KFP UI and the artifacts)"
    return body.rstrip() + tail


def publish(stage: str, artifact: Any, body: str, headline: str, tracking: Any = None, run_id: str | None = None,
            figures: list[Figure] | tuple[Figure, ...] = ()) -> str:
    """Show a finished stage: KFP Markdown `artifact` (None: none), the MLflow run `run_id`'s description,
    headline and figures (no `run_id` or `tracking`: none), the console's end line. Returns the KFP Markdown."""
    figures = list(figures)
    markdown = _kfp_markdown(body, figures)
    if artifact is not None:
        Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
        Path(artifact.path).write_text(markdown)
    if run_id and tracking is not None:
        _annotate_run(tracking, run_id, _mlflow_note(body, headline, figures, run_id), headline, figures)
    console.finished(stage, headline)
    return markdown


def _annotate_run(tracking: Any, run_id: str, note: str, headline: str, figures: list[Figure]) -> None:
    """The description, headline and figures of MLflow run `run_id`; a run id this store does not know is
    said in the log and skipped."""
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    from components.common.tracking import tag_run

    try:
        tag_run(tracking, run_id, {NOTE_TAG: note, HEADLINE_TAG: headline})
    except MlflowException as exc:
        print(f"no description for MLflow run {run_id}: {exc}", flush=True)
        return
    client = mlflow.MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        for f in (f for f in figures if not f.logged):
            local = Path(tmp) / Path(f.artifact_path).name
            local.write_bytes(f.png)
            parent = str(Path(f.artifact_path).parent)
            client.log_artifact(run_id, str(local), None if parent == "." else parent)


# --------------------------------------------------------------------------- the parent run

STAGE_ORDER = ("filter", "shard", "train", "evaluate", "export")


def _run_link(experiment_id: str, run_id: str, text: str) -> str:
    return f"[{text}](#/experiments/{experiment_id}/runs/{run_id})"


HEADLINE_METRICS = (("evaluate", "mean/zeroshot_top1", "mean zero-shot top-1"),
                    ("evaluate", "mean/linear_probe_top1_full", "mean linear probe top-1"),
                    ("train", "final_loss", "final loss"))


def _pipeline_headline(state: str, kfp_run_id: str, by_stage: dict[str, Any]) -> str:
    figures = [f"{label} **{by_stage[stage].data.metrics[key]:.3f}**" for stage, key, label in HEADLINE_METRICS
               if stage in by_stage and key in by_stage[stage].data.metrics]
    failed = [s for s in STAGE_ORDER if s in by_stage and by_stage[s].info.status == "FAILED"]
    return (f"Pipeline **{state.lower()}**" + (f" in stage {', '.join(failed)}" if failed else "")
            + f" (KFP run `{kfp_run_id}`)" + (": " + ", ".join(figures) if figures else "") + ".")


def stage_attempts(children: list[Any]) -> dict[str, list[Any]]:
    """A pipeline run's child runs by stage, each stage's attempts oldest first (KFP retries a failed task:
    its latest attempt is the last), whatever order they were listed in."""
    attempts: dict[str, list[Any]] = {}
    for run in sorted(children, key=lambda r: r.info.start_time):
        attempts.setdefault(run.data.tags.get("stage", run.info.run_name), []).append(run)
    return attempts


def pipeline_note(parent: Any, children: list[Any], state: str) -> str:
    """The parent run's description: what ran with its figures and links (each stage's latest attempt),
    and the lineage chain."""
    tags = parent.data.tags
    exp = parent.info.experiment_id
    by_stage = {stage: runs[-1] for stage, runs in stage_attempts(children).items()}
    lines = [_pipeline_headline(state, tags.get("kfp.run_id", ""), by_stage), "",
             "| stage (its MLflow run) | status | key figures |", "|---|---|---|"]
    for stage in STAGE_ORDER:
        run = by_stage.get(stage)
        if run is None:
            lines.append(f"| {stage} | not run | |")
            continue
        figures = run.data.tags.get(HEADLINE_TAG, "").replace("|", "\\|")
        lines.append(f"| {_run_link(exp, run.info.run_id, stage)} | {run.info.status.lower()} | {figures} |")
    lines += ["", "**Lineage**", ""]
    chain = [("source data", tags.get("lineage.source_uri")), ("filtered pairs", tags.get("lineage.filtered_uri")),
             ("dataset manifest", tags.get("lineage.manifest_uri")),
             ("dataset content hash", tags.get("lineage.dataset_content_hash")),
             ("tokenizer", tags.get("lineage.tokenizer")), ("initial weights", tags.get("lineage.init_checkpoint")),
             ("model", tags.get("lineage.model_uri")), ("ONNX bundle", tags.get("lineage.export_uri"))]
    lines += [f"- {what}: `{value}`" for what, value in chain if value]
    if tags.get("lineage.training_run_id"):
        lines.append(f"- training run: {_run_link(exp, tags['lineage.training_run_id'], tags['lineage.training_run_id'])}")
    registered = tags.get("lineage.registered_model", "")
    name, _, version = registered.partition("/")
    if name and version and version != "None":
        alias = tags.get("lineage.registered_model_alias")
        lines.append(f"- registered model: [{name} version {version}](#/models/{name}/versions/{version})"
                     + (f", alias `{alias}`" if alias else ""))
    return "\n".join(lines)[:NOTE_MAX_CHARS]

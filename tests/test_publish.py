"""A finished stage's views: the KFP Markdown, the MLflow run's description, headline and figures, the
console's end line; and the parent run's description."""

import json
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from components.common import console
from components.common.publish import Figure, markdown_table, pipeline_note, publish, text_tables
from components.common.tracking import TrackingConfig

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64  # stands in for a figure's bytes


@pytest.fixture
def tracking(tmp_path):
    cfg = TrackingConfig(f"sqlite:///{tmp_path / 'mlflow.db'}", "views")
    cfg.apply()
    return cfg


def test_publish_writes_the_three_views(tmp_path, tracking, monkeypatch):
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv(console.CHANNEL_ENV, str(events))
    with mlflow.start_run(run_name="train") as run:
        pass
    artifact = SimpleNamespace(path=str(tmp_path / "kfp" / "report"))
    body = "\n".join(["# Train", "", "- model: `m.pt`", ""] + markdown_table(["quantity", "value"], [["steps", 300]]))
    markdown = publish("train", artifact, body, "300 steps, loss 0.2", tracking, run.info.run_id,
                       [Figure("Training curves", "plots/curves.png", PNG)])
    assert Path(artifact.path).read_text() == markdown
    assert markdown.startswith("# Train") and "| steps | 300 |" in markdown
    assert "![Training curves](data:image/png;base64," in markdown, "the KFP UI gets the figure inline"
    got = mlflow.get_run(run.info.run_id)
    note = got.data.tags["mlflow.note.content"]
    assert note.startswith("**300 steps, loss 0.2**\n\n- model:"), "headline first, no title"
    assert "```\nquantity  value\nsteps     300\n```" in note, "tables as aligned text"
    assert f"(get-artifact?path=plots/curves.png&run_uuid={run.info.run_id})" in note
    assert got.data.tags["headline"] == "300 steps, loss 0.2"
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "plots")] == ["plots/curves.png"]
    (event,) = [json.loads(line) for line in events.read_text().splitlines()]
    assert (event["kind"], event["stage"], event["state"], event["text"]) == ("stage", "train", "finished",
                                                                              "300 steps, loss 0.2")


def test_a_long_description_is_cut_with_its_tables_closed(tmp_path, tracking):
    with mlflow.start_run(run_name="evaluate") as run:
        pass
    rows = [[f"dataset/metric_{i}", i / 7] for i in range(600)]
    body = "\n".join(["# Evaluation", ""] + markdown_table(["metric", "value"], rows))
    publish("evaluate", None, body, "top-1 0.6", tracking, run.info.run_id,
            [Figure("Few-shot", "plots/few_shot.png", PNG, logged=True)])
    note = mlflow.get_run(run.info.run_id).data.tags["mlflow.note.content"]
    assert len(note) <= 8000 and note.count("```") % 2 == 0
    assert "cut to fit" in note and note.endswith(f"run_uuid={run.info.run_id})"), "the figures survive the cut"
    assert not mlflow.MlflowClient().list_artifacts(run.info.run_id), "a figure the stage logged is not logged again"


def test_text_tables_align_cells_and_keep_escaped_bars():
    text = text_tables("\n".join(markdown_table(["a", "b"], [["x|y", 1.5], ["**kept**", 22]])))
    assert text.splitlines() == ["```", "a     b", "x|y   1.5", "kept  22", "```"]


def test_pipeline_note_links_stages_and_lineage(tracking):
    with mlflow.start_run(run_name="clip-pretraining 2026-01-01 10:00") as parent:
        mlflow.set_tags({"kfp.run_id": "42", "lineage.manifest_uri": "s3://b/m.json",
                         "lineage.training_run_id": "T", "lineage.registered_model": "clip/3",
                         "lineage.registered_model_alias": "champion"})
        with mlflow.start_run(run_name="train", nested=True, tags={"stage": "train", "headline": "a | b"}) as child:
            mlflow.log_metric("final_loss", 0.25)
    parent, child = mlflow.get_run(parent.info.run_id), mlflow.get_run(child.info.run_id)
    note = pipeline_note(parent, [child], "FINISHED")
    exp = parent.info.experiment_id
    assert note.startswith("Pipeline **finished** (KFP run `42`): final loss **0.250**.")
    assert f"| [train](#/experiments/{exp}/runs/{child.info.run_id}) | finished | a \\| b |" in note
    assert "| filter | not run | |" in note
    assert "- dataset manifest: `s3://b/m.json`" in note
    assert f"- training run: [T](#/experiments/{exp}/runs/T)" in note
    assert "- registered model: [clip version 3](#/models/clip/versions/3), alias `champion`" in note


def test_pipeline_note_shows_each_stages_latest_attempt(tracking):
    """A stage KFP retried has two runs; MLflow lists them newest first: the note shows the retry."""
    import time

    with mlflow.start_run(run_name="clip-pretraining") as parent:
        mlflow.set_tag("kfp.run_id", "43")
        with mlflow.start_run(run_name="filter", nested=True, tags={"stage": "filter"}) as first:
            pass
        time.sleep(0.01)
        with mlflow.start_run(run_name="filter", nested=True, tags={"stage": "filter", "headline": "kept 9"}) as retry:
            pass
    mlflow.MlflowClient().set_terminated(first.info.run_id, status="FAILED")
    runs = [mlflow.get_run(r.info.run_id) for r in (retry, first)]  # newest first, as search_runs lists them
    note = pipeline_note(mlflow.get_run(parent.info.run_id), runs, "FINISHED")
    assert note.startswith("Pipeline **finished** (KFP run `43`)"), note.splitlines()[0]
    assert f"runs/{retry.info.run_id}) | finished | kept 9 |" in note and first.info.run_id not in note

"""End to end: the committed package (the file users upload) through kfp.local on the tiny config, as
`make demo` runs it (smaller)."""

import io
import json
from pathlib import Path

import mlflow
import pytest

from components.common import storage
from pipelines.compile import PACKAGE
from pipelines.run_console import RunConsole
from pipelines.local import commands, run_local
from tests.printed_commands import check_printed_commands

STAGE_ORDER = ["filter", "shard", "train", "evaluate", "export"]
STAGES = set(STAGE_ORDER)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    from kfp import components

    workdir = tmp_path_factory.mktemp("demo")
    loaded = []
    real = components.load_component_from_file
    shown = io.StringIO()  # what `clipflow run` shows on its console
    with pytest.MonkeyPatch.context() as mp, RunConsole(workdir, out=shown) as run_console:
        mp.setattr(components, "load_component_from_file", lambda path: loaded.append(path) or real(path))
        summary = run_local(workdir, synthetic_samples=240, steps=20, batch_size=16, num_workers=2,
                            samples_per_shard=32, synthetic_per_class=6, registered_model_name="clip-e2e")
    assert loaded == [str(PACKAGE)], "the e2e run executes the committed YAML, not the Python DAG"
    summary["console"], summary["log_path"] = shown.getvalue(), run_console.log_path
    return workdir, summary


def test_quiet_console_shows_one_line_per_stage_start_and_end(local_run):
    _, summary = local_run
    lines = summary["console"].splitlines()
    assert [line.split()[:2] for line in lines] == [[mark, stage] for stage in STAGE_ORDER for mark in "-+"]
    figures = {line.split()[1]: line for line in lines if line.startswith("+")}
    assert "kept" in figures["filter"] and "shards" in figures["shard"] and "final loss" in figures["train"]
    assert "zero-shot top-1" in figures["evaluate"] and "parity" in figures["export"]
    log = summary["log_path"].read_text()
    for noise in ("Executing task", "executor_input", "[KFP Executor", "[train] world_size="):
        assert noise in log, noise


def test_pipeline_run_tree_in_mlflow(local_run):
    _, summary = local_run
    assert summary["status"] == "FINISHED"
    assert set(summary["stages"]) == STAGES, "one nested MLflow run per stage"
    for stage, run in summary["stages"].items():
        assert run.info.status == "FINISHED", stage
        assert run.data.tags["mlflow.parentRunId"] == summary["parent_run_id"]
        assert run.data.tags["code_version"]
    parent = mlflow.MlflowClient().get_run(summary["parent_run_id"])
    stage_runs = summary["stages"].values()
    assert parent.info.start_time <= min(r.info.start_time for r in stage_runs)
    assert parent.info.end_time >= max(r.info.end_time for r in stage_runs), "the parent run spans the pipeline"
    tags = summary["tags"]
    assert tags["kfp.run_id"], "the parent run is tagged with the KFP run id"
    # lineage: source data -> manifest hash -> training run -> registered model version
    assert tags["lineage.source_uri"].endswith("filtered/source")  # the generated corpus
    assert len(tags["lineage.dataset_content_hash"]) == 64
    assert tags["lineage.training_run_id"] == summary["stages"]["train"].info.run_id
    name, version = tags["lineage.registered_model"].split("/")
    mv = mlflow.MlflowClient().get_model_version(name, version)
    assert name == "clip-e2e"
    assert tags["lineage.dataset_content_hash"] in mv.tags.values()
    assert tags["lineage.training_run_id"] in mv.tags.values()


def test_every_stage_left_its_outputs(local_run):
    workdir, summary = local_run
    tags = summary["tags"]
    filter_metrics = summary["stages"]["filter"].data.metrics
    rejected = sum(v for k, v in filter_metrics.items() if k.startswith("rejected."))
    assert filter_metrics["kept"] + rejected == filter_metrics["total"] > 0
    manifest = storage.read_json(tags["lineage.manifest_uri"])
    assert manifest["content_hash"] == tags["lineage.dataset_content_hash"]
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            assert storage.size(shard["uri"]) == shard["bytes"]
    assert storage.exists(tags["lineage.model_uri"])
    bundle = Path(tags["lineage.export_uri"])
    for name in ("image_encoder.onnx", "text_encoder.onnx", "tokenizer.json", "preprocess.json"):
        assert (bundle / name).is_file(), name
    train_metrics = summary["stages"]["train"].data.metrics
    assert {"train/loss", "train/lr", "train/logit_scale", "train/samples_per_s"} <= set(train_metrics)
    evaluate_metrics = summary["stages"]["evaluate"].data.metrics
    assert {"mean/zeroshot_top1", "synthetic/linear_probe_top1_full", "validation/retrieval_text_to_image_R_at_1",
            "robustness/synthetic/mean_zeroshot_drop"} <= set(evaluate_metrics)
    assert summary["stages"]["evaluate"].data.tags["eval_suite"] == "synthetic"


def _artifacts(run, path=""):
    client = mlflow.MlflowClient()
    out = []
    for item in client.list_artifacts(run.info.run_id, path):
        out += _artifacts(run, item.path) if item.is_dir else [item.path]
    return set(out)


def test_stage_runs_hold_the_artifacts_people_look_at(local_run):
    _, summary = local_run
    stages = summary["stages"]
    filtered = _artifacts(stages["filter"])
    assert {"plots/stats.png", "stats.json", "config/filter.json"} <= filtered
    assert any(p.startswith("rejects/") and p.endswith(".jsonl") for p in filtered)
    assert "manifest.json" in _artifacts(stages["shard"])
    trained = _artifacts(stages["train"])
    assert {"plots/loss_curve.png", "config/model.json"} <= trained
    assert any(p.startswith("model/") for p in trained)
    assert {"plots/synthetic/confusion_matrix.png", "plots/synthetic/per_class_accuracy.png", "plots/few_shot.png",
            "plots/robustness_synthetic.png", "tables/results.json", "report.json"} <= _artifacts(stages["evaluate"])
    assert "parity.json" in _artifacts(stages["export"])


def test_kfp_artifacts_written_by_the_local_runner(local_run):
    workdir, summary = local_run
    (run_dir,) = (workdir / "kfp").glob("clip-pretraining-*")
    out = json.loads((run_dir / "evaluate" / "executor_output.json").read_text())["artifacts"]
    metrics = out["metrics"]["artifacts"][0]["metadata"]
    assert metrics["synthetic/zeroshot_top5"] >= metrics["synthetic/zeroshot_top1"] > 0
    assert metrics == pytest.approx({k: v for k, v in summary["stages"]["evaluate"].data.metrics.items()
                                     if k in metrics}), "KFP Metrics and the MLflow run agree"
    matrix = out["classification"]["artifacts"][0]["metadata"]["confusionMatrix"]
    assert len(matrix["rows"]) == len(matrix["annotationSpecs"]) == 6
    assert (run_dir / "evaluate" / "report").read_text().startswith("# CLIP evaluation")
    pointer = json.loads((run_dir / "shard" / "dataset").read_text())
    assert pointer["content_hash"] == summary["tags"]["lineage.dataset_content_hash"]


def test_demo_ends_with_the_robustness_table(local_run, capsys):
    from pipelines.local import print_summary

    _, summary = local_run
    print_summary(summary, 60.0)
    out = capsys.readouterr().out
    table = out[out.index("Robustness under distribution shift: reference synthetic"):]
    assert "linear probe is fitted on synthetic" in table
    for row in ("synthetic (reference)", "synthetic-sketch", "synthetic-texture", "synthetic-palette",
                "synthetic-noise", "synthetic-size", "mean over 5 shifted sets"):
        assert row in table, row
    assert "zero-shot drop" in table and "linear probe drop" in table


def test_every_printed_command_works(local_run, tmp_path):
    import numpy as np

    from components.synthetic.scenes import random_scene, render

    _, summary = local_run
    image = tmp_path / "scene.png"
    render(random_scene(np.random.default_rng(7))).save(image)
    check_printed_commands(commands(summary), image, tmp_path)


def test_mlflow_pages_have_names_descriptions_and_plots(local_run):
    _, summary = local_run
    client = mlflow.MlflowClient()
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.run_name.startswith("clip-pretraining 20"), "pipeline + date"
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("Pipeline **finished**") and "zero-shot top-1" in note
    tags = summary["tags"]
    for stage, run in summary["stages"].items():
        assert run.info.run_name == stage
        assert f"runs/{run.info.run_id})" in note, f"the parent's description links the {stage} run"
        assert run.data.tags["headline"].replace("|", "\\|") in note  # escaped in the table
        assert run.data.tags["mlflow.note.content"].startswith(f"**{run.data.tags['headline']}**")
    name, version = tags["lineage.registered_model"].split("/")
    assert f"(#/models/{name}/versions/{version})" in note and tags["lineage.manifest_uri"] in note
    assert "plots/training_curves.png" in _artifacts(summary["stages"]["train"])
    assert "plots/retrieval_recall.png" in _artifacts(summary["stages"]["evaluate"])


def test_every_stage_leaves_a_markdown_visualisation_for_the_kfp_ui(local_run):
    workdir, _ = local_run
    (run_dir,) = (workdir / "kfp").glob("clip-pretraining-*")
    titles = {"filter": "# Filter", "shard": "# Shard", "train": "# Train", "evaluate": "# CLIP evaluation",
              "export": "# Export"}
    for stage, title in titles.items():
        markdown = (run_dir / stage / "report").read_text()
        assert markdown.startswith(title), stage
    assert "| reason | records |" in (run_dir / "filter" / "report").read_text()
    assert "](data:image/png;base64," in (run_dir / "train" / "report").read_text(), "the training curves"
    assert "| image encoder, batch |" in (run_dir / "export" / "report").read_text()


def test_runs_compare_datasets_are_inputs_and_the_version_is_champion(local_run):
    """The parent run carries the headline metrics and the data/model params; each stage run lists what it
    read as MLflow dataset inputs; the first registered version takes the alias champion."""
    _, summary = local_run
    parent = mlflow.get_run(summary["parent_run_id"])
    assert {"kept_fraction", "final_loss", "samples_per_s", "mean/zeroshot_top1", "mean/linear_probe_top1_full",
            "validation/retrieval_image_to_text_R_at_1", "onnx_parity_max_abs"} <= set(parent.data.metrics)
    assert parent.data.metrics["final_loss"] == summary["stages"]["train"].data.metrics["final_loss"]
    assert parent.data.params["steps"] == "20" and parent.data.params["dataset_content_hash"] == \
        summary["tags"]["lineage.dataset_content_hash"]
    read = {stage: {(i.dataset.name, i.dataset.digest) for i in mlflow.get_run(run.info.run_id).inputs.dataset_inputs}
            for stage, run in summary["stages"].items()}
    content_hash = summary["tags"]["lineage.dataset_content_hash"]
    assert {n for n, _ in read["filter"]} == {"source-pairs"} and {n for n, _ in read["shard"]} == {"filtered-pairs"}
    assert read["train"] == {("shards", content_hash[:12])}
    assert ("validation", content_hash[:12]) in read["evaluate"] and len(read["evaluate"]) >= 2
    name, version = summary["tags"]["lineage.registered_model"].split("/")
    assert summary["tags"]["lineage.registered_model_alias"] == "champion"
    assert str(mlflow.MlflowClient().get_model_version_by_alias(name, "champion").version) == version

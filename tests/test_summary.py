"""The closing summary of `clipflow run`: every stage attempt is kept (a retried stage shows as a retry), and
the commands it prints fit the tracking store (a local store: `mlflow ui`; a server: its URL) and the
data root (an s3:// bundle gets its endpoint). The e2e tests run the printed commands."""

from __future__ import annotations

import mlflow
import pytest

from pipelines.local import commands, print_summary, summarize


@pytest.fixture
def pipeline_with_a_retry(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    exp = mlflow.create_experiment("summary", artifact_location=(tmp_path / "artifacts").as_uri())
    client = mlflow.MlflowClient()
    parent = client.create_run(exp, tags={"stage": "pipeline", "lineage.export_uri": "s3://clip-data/runs/r1/export",
                                          "lineage.registered_model": "clip/3"})
    client.log_param(parent.info.run_id, "s3_endpoint", "http://127.0.0.1:9000")
    for stage, status in (("filter", "FAILED"), ("filter", "FINISHED"), ("shard", "FINISHED")):
        run = client.create_run(exp, run_name=stage, tags={"stage": stage, "mlflow.parentRunId": parent.info.run_id})
        client.set_terminated(run.info.run_id, status)
    client.set_terminated(parent.info.run_id, "FINISHED")
    return uri


def test_a_retried_stage_shows_as_a_retry(pipeline_with_a_retry, capsys):
    summary = summarize(pipeline_with_a_retry, "summary", since=0)
    assert [r.info.status for r in summary["attempts"]["filter"]] == ["FAILED", "FINISHED"]
    assert summary["stages"]["filter"].info.status == "FINISHED", "the stage's latest attempt"
    print_summary(summary, 60)
    out = capsys.readouterr().out
    assert "stages          : filter (2 attempts: retried after 1 failed), shard" in out


def test_printed_commands_fit_the_store_and_the_data_root(pipeline_with_a_retry):
    summary = summarize(pipeline_with_a_retry, "summary", since=0)
    shown = commands(summary)
    assert shown["ui"].endswith(f"-m mlflow ui --backend-store-uri {pipeline_with_a_retry} --workers 1 --port 5000")
    assert shown["zeroshot"].startswith("AWS_ENDPOINT_URL=http://127.0.0.1:9000 ")
    assert "--bundle s3://clip-data/runs/r1/export " in shown["zeroshot"]
    assert "models serve -m models:/clip/3 " in shown["serve"]
    served = commands({**summary, "tracking_uri": "http://127.0.0.1:5000"})
    assert served["ui"] == f"http://127.0.0.1:5000/#/experiments/{summary['experiment_id']}/runs/{summary['parent_run_id']}"
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000 " in served["serve"]


def test_the_summary_names_the_model_by_the_alias_it_holds(pipeline_with_a_retry, capsys):
    summary = summarize(pipeline_with_a_retry, "summary", since=0)
    for alias in ("champion", "candidate"):
        tagged = {**summary, "tags": {**summary["tags"], "lineage.registered_model_alias": alias}}
        assert f"models serve -m models:/clip@{alias} " in commands(tagged)["serve"]
        print_summary(tagged, 60)
        assert f"registered clip/3 @{alias}" in capsys.readouterr().out

"""The pipeline against real services, as a team runs it: PostgreSQL 15 as MLflow's backend store, `mlflow server`
(postgresql+psycopg2, artifacts proxied to S3), an S3-protocol server (moto), data under s3://, all started on
127.0.0.1 by this module and stopped after it. Checked through the clients: the MLflow run tree and registry,
the bucket (boto3, via storage), the database (psycopg2), and every command the closing summary prints.

Skipped only where PostgreSQL is not installed (`make test` installs it as root with apt-get, so CI never skips this)."""

from __future__ import annotations

import re
import uuid

import pytest

from components.common import storage
from tests.services import MlflowServer, Postgres, postgres_bin

pytestmark = pytest.mark.skipif(postgres_bin() is None,
                                reason="PostgreSQL (initdb, pg_ctl) is not installed; `make test` installs it as root with apt-get")

STAGES = {"filter", "shard", "train", "evaluate", "export"}


@pytest.fixture(scope="module")
def stack(s3_server, tmp_path_factory):
    """PostgreSQL + mlflow server (artifacts in s3://<bucket>/mlflow) on loopback; yields (server, bucket, pg)."""
    import psycopg2  # noqa: F401  (the `server` extra: fail here, clearly, when it is missing)

    bucket = f"it-{uuid.uuid4().hex[:10]}"
    storage.ensure_bucket(bucket)
    pg = Postgres()
    try:
        server = MlflowServer(pg.uri, f"s3://{bucket}/mlflow", log_dir=tmp_path_factory.mktemp("mlflow-logs"))
        with server:
            yield server, bucket, pg
    finally:
        pg.stop()


@pytest.fixture(scope="module")
def pipeline_run(stack, s3_server, tmp_path_factory):
    from pipelines.local import run_local

    server, bucket, _ = stack
    workdir = tmp_path_factory.mktemp("it-run")
    summary = run_local(workdir, data_root=f"s3://{bucket}/runs", s3_endpoint=s3_server,
                        mlflow_tracking_uri=server.url, mlflow_experiment="integration", synthetic_samples=160,
                        steps=10, batch_size=8, num_workers=1, samples_per_shard=32, synthetic_per_class=6,
                        registered_model_name="clip-it")
    return summary


def test_run_tree_and_registry_through_the_server(stack, pipeline_run):
    import mlflow

    server, bucket, _ = stack
    summary = pipeline_run
    assert summary["status"] == "FINISHED" and set(summary["stages"]) == STAGES
    assert all(len(runs) == 1 and runs[0].info.status == "FINISHED" for runs in summary["attempts"].values())
    client = mlflow.MlflowClient(server.url)
    tags = client.get_run(summary["parent_run_id"]).data.tags
    assert tags["work_uri"].startswith(f"s3://{bucket}/runs/")
    name, version = tags["lineage.registered_model"].split("/")
    mv = client.get_model_version(name, version)
    assert name == "clip-it" and mv.tags["dataset_content_hash"] == tags["lineage.dataset_content_hash"]
    assert mv.tags["training_run_id"] == tags["lineage.training_run_id"] == summary["stages"]["train"].info.run_id
    assert re.search(r"Zero-shot top-1 0\.\d{3} on \w+", mv.description), mv.description
    assert "final loss" in mv.description and "Validation retrieval R@1" in mv.description


def test_data_and_artifacts_are_in_the_bucket(stack, pipeline_run):
    _, bucket, _ = stack
    tags = pipeline_run["tags"]
    manifest = storage.read_json(tags["lineage.manifest_uri"])
    assert tags["lineage.manifest_uri"].startswith(f"s3://{bucket}/runs/")
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            assert storage.size(shard["uri"]) == shard["bytes"]
    assert all(storage.exists(f"{tags['lineage.export_uri']}/{f}") for f in ("image_encoder.onnx", "text_encoder.onnx"))
    artifacts = storage.list_files(f"s3://{bucket}/mlflow")
    for png in (r"plots/loss_curve\.png", r"plots/\w+/confusion_matrix\.png", r"plots/stats\.png"):
        assert any(re.search(png + "$", a) for a in artifacts), png
    assert any(a.endswith("/MLmodel") for a in artifacts), "the registered model's files went to S3 through MLflow"


def test_backend_store_is_postgresql(stack, pipeline_run):
    import psycopg2

    _, _, pg = stack
    with psycopg2.connect(host="127.0.0.1", port=pg.port, user="mlflow", dbname="postgres") as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM runs WHERE run_uuid = %s", (pipeline_run["parent_run_id"],))
            assert cur.fetchone()[0] == 1
            cur.execute("SELECT count(*) FROM model_versions WHERE name = 'clip-it'")
            assert cur.fetchone()[0] >= 1


def test_every_printed_command_works_with_s3_and_a_server(pipeline_run, tmp_path):
    import numpy as np

    from components.synthetic.scenes import random_scene, render
    from pipelines.local import commands
    from tests.printed_commands import check_printed_commands

    shown = commands(pipeline_run)
    assert "--bundle s3://" in shown["zeroshot"] and shown["ui"].startswith("http://127.0.0.1:")
    image = tmp_path / "scene.png"
    render(random_scene(np.random.default_rng(3))).save(image)
    check_printed_commands(shown, image, tmp_path)

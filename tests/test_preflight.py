"""The start-run task's preflight: each dead service fails within 30 s with one message naming its
endpoint, before any MLflow run is opened (tests/net_helpers.py endpoints on 127.0.0.1)."""

from __future__ import annotations

import time

import pytest

from components.common.context import PreflightError, RunConfig, preflight, start_run
from tests.net_helpers import SilentServer, refused_endpoint


def check_fails_fast(cfg: RunConfig, work_uri: str, names: str) -> str:
    t = time.monotonic()
    with pytest.raises(PreflightError) as info:
        preflight(cfg, work_uri)
    took = time.monotonic() - t
    message = str(info.value)
    assert names in message and took < 30, (took, message)
    assert "\n" not in message, "one message"
    return message


def test_tracking_server_refusing_connections(tmp_path):
    url = refused_endpoint()
    message = check_fails_fast(RunConfig(data_root=str(tmp_path / "data"), mlflow_tracking_uri=url),
                               str(tmp_path / "data" / "run"), f"MLflow tracking server {url} cannot be reached")
    assert "ConnectionError" in message


def test_tracking_server_that_never_answers(tmp_path):
    with SilentServer() as silent:
        check_fails_fast(RunConfig(data_root=str(tmp_path / "data"), mlflow_tracking_uri=silent.url),
                         str(tmp_path / "data" / "run"), f"MLflow tracking server {silent.url} does not answer")


def test_object_store_refusing_connections(s3_server, monkeypatch, tmp_path):
    url = refused_endpoint()
    cfg = RunConfig(data_root="s3://clip-data/runs", s3_endpoint=url,
                    mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)  # what RunContext.activate() does with s3_endpoint
    check_fails_fast(cfg, "s3://clip-data/runs/run-1", f"the data root is not usable: check "
                                                       f"s3://clip-data/runs/run-1: cannot connect to endpoint {url}")


def test_start_run_checks_first_then_opens_the_parent_run(bucket, tmp_path, capsys):
    import mlflow

    db = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(PreflightError, match="bucket 'missing-bucket' does not exist"):
        start_run(RunConfig(data_root="s3://missing-bucket/runs", mlflow_tracking_uri=db,
                            mlflow_experiment="preflight"), "kfp-run-0")
    mlflow.set_tracking_uri(db)
    assert mlflow.get_experiment_by_name("preflight") is None, "nothing was logged before the check passed"

    ctx = start_run(RunConfig(data_root=f"s3://{bucket}/runs", mlflow_tracking_uri=db, mlflow_experiment="preflight"),
                    "kfp-run-1")
    assert "[start-run] preflight ok" in capsys.readouterr().out
    assert mlflow.get_run(ctx.parent_run_id).data.tags["kfp.run_id"] == "kfp-run-1"


def test_tracking_server_whose_artifact_store_is_down(tmp_path):
    """The issue's slowest failure: MLflow up, its S3 artifact store not; it used to surface after minutes as
    'too many 500 error responses' while logging the first artifact."""
    from tests.services import MlflowServer

    dead_s3 = refused_endpoint()
    env = {"MLFLOW_S3_ENDPOINT_URL": dead_s3, "AWS_ENDPOINT_URL": dead_s3, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    with MlflowServer(f"sqlite:///{tmp_path}/mlflow.db", "s3://mlflow-artifacts/mlflow", env=env,
                      log_dir=tmp_path) as server:
        check_fails_fast(RunConfig(data_root=str(tmp_path / "data"), mlflow_tracking_uri=server.url),
                         str(tmp_path / "data" / "run"), f"MLflow tracking server {server.url} answers, but")


def test_clipflow_run_against_a_refused_object_store_names_it_on_the_console(tmp_path):
    """The whole `clipflow run`, as a user starts it, with the data root on an S3 endpoint nothing listens
    on: it fails fast and both the task's console line and the closing message name the endpoint."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    url = refused_endpoint()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "AWS_ENDPOINT_URL": url,
           "CLIPFLOW_DATA_ROOT": "s3://clip-data/runs", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    t = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "--workdir", str(tmp_path / "demo")],
                          capture_output=True, text=True, env=env, timeout=180)
    took = time.monotonic() - t
    assert done.returncode == 1, done.stdout + done.stderr
    endpoint = url.removeprefix("http://")
    (task_line,) = [line for line in done.stdout.splitlines() if line.startswith("x start-run")]
    assert "PreflightError: preflight: the data root is not usable" in task_line and endpoint in task_line
    failure = done.stderr.strip().splitlines()[0]
    assert failure.startswith("clipflow run failed in stage start-run: PreflightError: ") and endpoint in failure, \
        done.stderr
    assert took < 90, took

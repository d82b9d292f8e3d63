"""The run's record tells the truth: the parent MLflow run is RUNNING from start-run until finish-run, which
closes it with the pipeline's real outcome; a stage run whose process was killed is closed as FAILED with
the reason, by finish-run or by the next `clipflow run` on the store (`components.common.run_state`).
A real sqlite MLflow store; the killed processes are real subprocesses that SIGKILL themselves."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlflow
import pytest

from components.common import run_state
from components.common.context import RunConfig, RunContext, finish_run, start_run
from components.common.tracking import stage_run
from tests import mlflow_template

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.delenv(run_state.DRIVER_ENV, raising=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow_template.seed(f"sqlite:///{tmp_path}/mlflow.db")  # the killed subprocesses would migrate it each
    return RunConfig(data_root=str(tmp_path / "data"), mlflow_tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
                     mlflow_experiment="record")


def _killed_midway(cfg: RunConfig, kfp_run_id: str, driver: bool) -> str:
    """A process that opens the pipeline run (as its driver when `driver`) and a train stage run, then is
    SIGKILLed mid-train. Returns the parent run id."""
    code = textwrap.dedent(f"""
        import os, signal
        from components.common import run_state
        from components.common.context import RunConfig, start_run
        from components.common.tracking import stage_run
        if {driver!r}:
            os.environ[run_state.DRIVER_ENV] = run_state.driver_id()
        ctx = start_run(RunConfig(**{cfg.__dict__!r}), {kfp_run_id!r})
        print(ctx.parent_run_id, flush=True)
        with stage_run("train", ctx.tracking):
            os.kill(os.getpid(), signal.SIGKILL)  # as a lost node or an OOM kill would
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == -9, done.stderr
    return done.stdout.split()[-1]


def _runs(parent_id: str) -> tuple:
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'",
                                  order_by=["attributes.start_time ASC"])
    return parent, children


def test_the_parent_run_spans_the_pipeline_and_ends_with_its_outcome(cfg):
    ctx = start_run(cfg, "kfp-ok")
    parent = mlflow.MlflowClient().get_run(ctx.parent_run_id)
    assert parent.info.status == "RUNNING" and parent.info.end_time is None, "running while the stages run"
    for stage in ("filter", "shard"):
        with stage_run(stage, RunContext.from_json(ctx.to_json()).tracking):
            time.sleep(0.05)
    assert mlflow.MlflowClient().get_run(ctx.parent_run_id).info.status == "RUNNING"
    time.sleep(0.05)
    assert finish_run(cfg, "kfp-ok", "SUCCEEDED") == "FINISHED"
    parent, children = _runs(ctx.parent_run_id)
    assert parent.info.status == "FINISHED" and [c.info.status for c in children] == ["FINISHED", "FINISHED"]
    assert parent.info.start_time <= min(c.info.start_time for c in children)
    assert parent.info.end_time >= max(c.info.end_time for c in children), "the parent outlasts its stages"
    assert parent.data.params["data_root"] == cfg.data_root and parent.data.tags["kfp.run_id"] == "kfp-ok"


def test_a_failed_stage_fails_the_parent_run(cfg):
    ctx = start_run(cfg, "kfp-failed")
    with pytest.raises(OSError, match="bucket"):
        with stage_run("shard", ctx.tracking):
            raise OSError("bucket 'nobucket' does not exist")
    assert finish_run(cfg, "kfp-failed", "FAILED") == "FAILED"
    parent, (shard,) = _runs(ctx.parent_run_id)
    assert parent.info.status == "FAILED" and shard.info.status == "FAILED"
    assert parent.data.tags["mlflow.note.content"].startswith("Pipeline **failed**")
    cancelled = start_run(cfg, "kfp-cancelled")
    assert finish_run(cfg, "kfp-cancelled", "CANCELLED") == "KILLED"
    assert mlflow.MlflowClient().get_run(cancelled.parent_run_id).info.status == "KILLED"


def test_finish_run_closes_a_stage_run_whose_process_was_killed(cfg):
    parent_id = _killed_midway(cfg, "kfp-retried", driver=False)
    parent, (train,) = _runs(parent_id)
    assert parent.info.status == "RUNNING" and train.info.status == "RUNNING", "what a kill leaves behind"
    assert run_state.sweep(cfg.mlflow_tracking_uri, cfg.mlflow_experiment) == [], \
        "no driver tag (a cluster run): the next local run leaves it to finish-run"
    finish_run(cfg, "kfp-retried", "FAILED")
    parent, (train,) = _runs(parent_id)
    assert parent.info.status == "FAILED" and train.info.status == "FAILED"
    reason = train.data.tags[run_state.REASON_TAG]
    assert "ended without closing the run" in reason and "finish-run" in reason
    assert train.data.tags["mlflow.note.content"].startswith("**Marked FAILED:**")


def test_a_killed_driver_is_closed_by_the_next_run(cfg, monkeypatch):
    parent_id = _killed_midway(cfg, "kfp-killed", driver=True)
    monkeypatch.setenv(run_state.DRIVER_ENV, run_state.driver_id())
    alive = start_run(cfg, "kfp-alive")  # a pipeline whose driver (this process) still runs
    closed = run_state.sweep(cfg.mlflow_tracking_uri, cfg.mlflow_experiment)
    parent, (train,) = _runs(parent_id)
    assert set(closed) == {parent_id, train.info.run_id}
    assert parent.info.status == "FAILED" and train.info.status == "FAILED"
    assert "the pipeline's driver" in parent.data.tags[run_state.REASON_TAG]
    assert "the next clipflow run" in train.data.tags[run_state.REASON_TAG]
    assert mlflow.MlflowClient().get_run(alive.parent_run_id).info.status == "RUNNING", "a live driver's run"
    assert run_state.sweep(cfg.mlflow_tracking_uri, cfg.mlflow_experiment) == []
    assert run_state.close_driver_runs(cfg.mlflow_tracking_uri, cfg.mlflow_experiment, "KILLED", "interrupted") \
        == [alive.parent_run_id]
    assert mlflow.MlflowClient().get_run(alive.parent_run_id).info.status == "KILLED"

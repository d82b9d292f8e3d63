"""Runs whose process died: found and closed as FAILED, with the reason, so the record never shows a dead
pipeline as running (or a stage as running forever).

A stage's MLflow run is closed by its own process (`tracking.stage_run`: FINISHED, or FAILED on an error).
A process that is killed (SIGKILL, a lost node, an out-of-memory kill) leaves its run RUNNING. Two places
close such runs:
- `finish_run` (the pipeline's exit handler; every stage task has ended by then): each stage run of the
  pipeline still RUNNING (`close_abandoned_children`);
- the next `clipflow run` on the same store (`sweep`): a pipeline run whose driver (the `clipflow run`
  process named in its `clipflow.driver` tag, host:pid) is gone, with its running stage runs, and any stage
  run still RUNNING under a parent that has ended.
Each run closed so gets the tag `clipflow.failure` (the reason) and the reason on top of its description.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

DRIVER_ENV = "CLIPFLOW_DRIVER"  # host:pid of the `clipflow run` process driving the pipeline (set by run_local)
DRIVER_TAG = "clipflow.driver"  # on the parent run: the driver it belongs to
REASON_TAG = "clipflow.failure"  # on a run closed by someone else than its own process: why
NOTE_TAG = "mlflow.note.content"


def driver_id() -> str:
    """This process as a driver: `host:pid`."""
    return f"{socket.gethostname()}:{os.getpid()}"


def driver_alive(driver: str, since_ms: int) -> bool | None:
    """Whether the process `host:pid` that started a run at `since_ms` still runs: None when it ran on
    another host (nothing to tell from here); a pid now used by a younger process counts as gone."""
    import psutil

    host, _, pid = driver.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        return psutil.Process(int(pid)).create_time() <= since_ms / 1000 + 1
    except psutil.NoSuchProcess:
        return False


def mark_failed(client: Any, run: Any, reason: str) -> None:
    """Close `run` as FAILED (now) with `reason` as a tag and at the top of its description."""
    run_id = run.info.run_id
    client.set_tag(run_id, REASON_TAG, reason)
    note = run.data.tags.get(NOTE_TAG, "")
    client.set_tag(run_id, NOTE_TAG, f"**Marked FAILED:** {reason}" + (f"\n\n{note}" if note else ""))
    client.set_terminated(run_id, status="FAILED")
    print(f"[runs] {run.info.run_name or run_id} ({run_id}) marked FAILED: {reason}", flush=True)


def running_children(client: Any, parent: Any) -> list:
    return client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent.info.run_id}' and attributes.status = 'RUNNING'")


def close_abandoned_children(client: Any, parent: Any, by: str) -> list[str]:
    """Every stage run of `parent` still RUNNING is marked FAILED (its process ended without closing it);
    `by` says who noticed. Returns their run ids."""
    closed = []
    for run in running_children(client, parent):
        mark_failed(client, run, f"its process ended without closing the run (killed, or lost with its node); "
                                 f"noticed by {by} at {time.strftime('%Y-%m-%d %H:%M:%S')}")
        closed.append(run.info.run_id)
    return closed


def sweep(tracking_uri: str, experiment: str) -> list[str]:
    """Before a pipeline run: close what earlier runs on this store left RUNNING with no process behind it
    (see the module's docstring). Returns the run ids marked FAILED."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    closed: list[str] = []
    running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    by = f"the next clipflow run ({driver_id()})"
    for run in running:
        driver = run.data.tags.get(DRIVER_TAG)
        if run.data.tags.get("stage") != "pipeline" or not driver:
            continue
        if driver_alive(driver, run.info.start_time) is False:
            closed += close_abandoned_children(client, run, by)
            mark_failed(client, run, f"the pipeline's driver {driver} ended without closing the run (killed?); "
                                     f"noticed by {by} at {time.strftime('%Y-%m-%d %H:%M:%S')}")
            closed.append(run.info.run_id)
    for run in running:  # a stage run left RUNNING under a pipeline run that has ended
        parent_id = run.data.tags.get("mlflow.parentRunId")
        if run.info.run_id in closed or not parent_id:
            continue
        if client.get_run(parent_id).info.status != "RUNNING":
            mark_failed(client, run, f"its process ended without closing the run, and its pipeline run has "
                                     f"ended; noticed by {by} at {time.strftime('%Y-%m-%d %H:%M:%S')}")
            closed.append(run.info.run_id)
    return closed


def close_driver_runs(tracking_uri: str, experiment: str, status: str, reason: str) -> list[str]:
    """The pipeline runs this driver opened and left RUNNING (it was interrupted before the exit handler
    ran), with their running stage runs, closed as `status` (KILLED) with `reason`."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    closed = []
    for run in client.search_runs([exp.experiment_id], f"attributes.status = 'RUNNING' and "
                                                       f"tags.`{DRIVER_TAG}` = '{driver_id()}'"):
        for child in [*running_children(client, run), run]:
            client.set_tag(child.info.run_id, REASON_TAG, reason)
            client.set_terminated(child.info.run_id, status=status)
            closed.append(child.info.run_id)
    return closed

"""What the stages of one pipeline run share, and how KFP artifacts carry their results.

`RunConfig` holds the pipeline-level settings (where data and runs go). `start_run` opens the
pipeline's parent MLflow run and returns a `RunContext`, which travels between KFP tasks as a JSON
string (`ctx`). Every stage writes its bulky data under `RunContext.work_uri` (a local directory or
``s3://bucket/prefix/<KFP run id>``); the KFP artifact itself holds a small JSON pointer
(`write_pointer` / `read_pointer`). Artifacts are duck-typed (`.path`, `.metadata`), so tests pass
simple objects.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from components.common import storage
from components.common.platform import PIPELINE_NAME
SYNTHETIC = "synthetic"  # a source / eval URI meaning "generate the bundled synthetic data"


@dataclass
class RunConfig:
    """Where one pipeline run keeps its data and its MLflow runs."""

    data_root: str = ".demo/data"  # runs write under <data_root>/<KFP run id>/ (a local dir or s3://bucket/prefix)
    s3_endpoint: str = ""  # S3-compatible endpoint URL for s3:// URIs ("" = AWS, or AWS_ENDPOINT_URL)
    mlflow_tracking_uri: str = ""  # MLflow server or store URI ("" = MLFLOW_TRACKING_URI, else ./mlflow.db)
    mlflow_experiment: str = PIPELINE_NAME  # the MLflow experiment of the parent run and the stage runs


@dataclass
class RunContext:
    """What every step of one pipeline run shares; passed between KFP tasks as a JSON string."""

    work_uri: str
    tracking_uri: str
    experiment: str
    parent_run_id: str
    s3_endpoint: str = ""
    pipeline_run_id: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RunContext":
        ctx = cls(**json.loads(text))
        ctx.activate()
        return ctx

    def activate(self) -> None:
        """Point storage and MLflow at this run's endpoints (in this process)."""
        if self.s3_endpoint:
            os.environ["AWS_ENDPOINT_URL"] = self.s3_endpoint
            os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", self.s3_endpoint)

    @property
    def tracking(self):
        """The TrackingConfig of this run's stages (nested under the parent run)."""
        from components.common.tracking import TrackingConfig

        return TrackingConfig(self.tracking_uri or None, self.experiment, self.parent_run_id or None)

    def uri(self, *parts: str) -> str:
        return storage.join(self.work_uri, *parts)


def write_pointer(artifact: Any, payload: dict) -> dict:
    """Write a stage's result as the artifact's JSON file; a few keys also go into its metadata."""
    Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
    Path(artifact.path).write_text(json.dumps(payload, indent=2, default=str))
    for key in ("uri", "content_hash", "run_id", "samples"):
        if payload.get(key) is not None:
            artifact.metadata[key] = payload[key]
    return payload


def read_pointer(artifact: Any) -> dict:
    return json.loads(Path(artifact.path).read_text())


class PreflightError(RuntimeError):
    """A service the run needs is not usable; the message names the endpoint and the cause."""


def preflight(cfg: RunConfig, work_uri: str) -> None:
    """Before anything else: the data root (endpoint, bucket, credentials: a probe written under
    `work_uri`) and the tracking server (health, credentials, its artifact store) each answer, or this
    raises PreflightError naming the culprit, within about 15 s each."""
    import time

    from components.common.tracking import TrackingUnavailable, check_server

    t = time.monotonic()
    try:
        storage.check_writable(work_uri)
    except storage.StorageError as e:
        raise PreflightError(f"preflight: the data root is not usable: {e}") from e
    try:
        uri = check_server(cfg.mlflow_tracking_uri or None, cfg.mlflow_experiment)
    except TrackingUnavailable as e:
        raise PreflightError(f"preflight: {e}") from e
    where = f" at {storage.where()}" if storage.is_s3(work_uri) else ""
    print(f"[start-run] preflight ok in {time.monotonic() - t:.1f}s: data root {cfg.data_root}{where}, "
          f"MLflow {uri}", flush=True)


def start_run(cfg: RunConfig, pipeline_run_id: str) -> RunContext:
    """Check the services (`preflight`), then open the pipeline's parent MLflow run (tagged with the KFP run
    id and, under `clipflow run`, its driver process; named after the pipeline and the time, e.g.
    `clip-pretraining 2026-05-01 14:03`) and leave it RUNNING: the exit handler closes it with the
    pipeline's final state (`finish_run`). The run is created through the client, not `mlflow.start_run`,
    so neither this block nor MLflow's exit hook ends it when this task's process ends."""
    from datetime import datetime

    import mlflow

    from components.common import run_state
    from mlflow.entities import Param

    from components.common.tracking import MAX_PARAM_CHARS, TrackingConfig, code_version, flatten

    ctx = RunContext(work_uri=storage.join(cfg.data_root, pipeline_run_id), tracking_uri=cfg.mlflow_tracking_uri,
                     experiment=cfg.mlflow_experiment, parent_run_id="", s3_endpoint=cfg.s3_endpoint,
                     pipeline_run_id=pipeline_run_id)
    ctx.activate()
    preflight(cfg, ctx.work_uri)
    TrackingConfig(cfg.mlflow_tracking_uri or None, cfg.mlflow_experiment).apply()
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(cfg.mlflow_experiment)
    tags = {"stage": "pipeline", "code_version": code_version(), "kfp.run_id": pipeline_run_id,
            "work_uri": ctx.work_uri}
    if os.environ.get(run_state.DRIVER_ENV):
        tags[run_state.DRIVER_TAG] = os.environ[run_state.DRIVER_ENV]
    run = client.create_run(experiment.experiment_id, tags=tags,
                            run_name=f"{PIPELINE_NAME} {datetime.now():%Y-%m-%d %H:%M}")
    ctx.parent_run_id = run.info.run_id
    params = {"pipeline": PIPELINE_NAME, **asdict(cfg)}
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in flatten(params).items()])
    client.log_dict(run.info.run_id, params, "config/pipeline.json")
    # the MLflow UI opens a model-training experiment on its runs (not on GenAI traces)
    client.set_experiment_tag(experiment.experiment_id, "mlflow.experimentKind", "custom_model_development")
    return ctx


def start_task(data_root: str, s3_endpoint: str, mlflow_tracking_uri: str, mlflow_experiment: str,
               pipeline_run_id: str) -> str:
    """The start-run task: `start_run` with the pipeline's parameters; returns the run context as JSON."""
    from components.common import config

    cfg = config.from_dict(RunConfig, dict(data_root=data_root, s3_endpoint=s3_endpoint,
                                           mlflow_tracking_uri=mlflow_tracking_uri,
                                           mlflow_experiment=mlflow_experiment))
    return start_run(cfg, pipeline_run_id).to_json()


FINAL_STATUS = {"SUCCEEDED": "FINISHED", "FAILED": "FAILED", "CANCELLED": "KILLED"}  # KFP state -> MLflow's


def finish_run(cfg: RunConfig, pipeline_run_id: str, state: str) -> str:
    """Close the parent run of `pipeline_run_id` with the pipeline's final KFP state (SUCCEEDED, FAILED,
    CANCELLED -> FINISHED, FAILED, KILLED; any other -> FAILED): first every stage run its process left RUNNING is marked FAILED
    with the reason (`run_state.close_abandoned_children`), then the description (what ran, the key figures,
    the lineage; `components.common.publish.pipeline_note`) is written. Returns MLflow's status."""
    import mlflow

    from components.common.publish import NOTE_TAG, pipeline_note
    from components.common.run_state import close_abandoned_children
    from components.common.tracking import TrackingConfig

    TrackingConfig(cfg.mlflow_tracking_uri or None, cfg.mlflow_experiment).apply()
    runs = mlflow.search_runs(filter_string=f"tags.`kfp.run_id` = '{pipeline_run_id}' and tags.stage = 'pipeline'",
                              output_format="list")
    status = FINAL_STATUS.get(state.upper(), "FAILED")  # a state KFP did not document: not a success
    client = mlflow.MlflowClient()
    for run in runs:
        close_abandoned_children(client, run, "finish-run")
        children = mlflow.search_runs(experiment_ids=[run.info.experiment_id], output_format="list",
                                      filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        client.set_tag(run.info.run_id, NOTE_TAG, pipeline_note(run, children, status))
        client.set_terminated(run.info.run_id, status=status)
    return status


def finish_task(mlflow_tracking_uri: str, mlflow_experiment: str, pipeline_run_id: str, status: str) -> str:
    """The finish-run task (the exit handler): `finish_run` with the pipeline's final state."""
    from components.common import config

    from components.common.headline import record_headline

    cfg = config.from_dict(RunConfig, dict(mlflow_tracking_uri=mlflow_tracking_uri,
                                           mlflow_experiment=mlflow_experiment))
    record_headline(cfg.mlflow_tracking_uri, cfg.mlflow_experiment, pipeline_run_id)  # the parent's metrics, to compare runs
    return finish_run(cfg, pipeline_run_id, status)

"""MLflow helpers: the one place that decides how a stage talks to MLflow.

Every stage opens `stage_run(...)`; when a pipeline parent run id is given the stage run is nested
under it, so one pipeline run shows as one tree in the MLflow UI.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.exceptions import MlflowException

MAX_PARAM_CHARS = 6000


@dataclass
class TrackingConfig:
    """Where a stage logs. `tracking_uri=None` keeps MLflow's own resolution (MLFLOW_TRACKING_URI, or a
    local `sqlite:///mlflow.db`)."""

    tracking_uri: str | None = None
    experiment: str = "clip"
    parent_run_id: str | None = None

    def apply(self) -> None:
        if self.tracking_uri:
            mlflow.set_tracking_uri(self.tracking_uri)
        if mlflow.get_experiment_by_name(self.experiment) is None:
            try:
                mlflow.create_experiment(self.experiment, artifact_location=local_artifact_location())
            except MlflowException:
                pass  # created meanwhile by another stage
        mlflow.set_experiment(self.experiment)


def local_artifact_location() -> str | None:
    """For a local `sqlite:///PATH` store, artifacts go beside the database (`mlartifacts/`), not into
    the current directory (MLflow's default `./mlruns`). A server decides for itself: None."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def code_version() -> str:
    """The code version tagged on every run: CLIPFLOW_CODE_VERSION (set in the image), else git HEAD."""
    if os.environ.get("CLIPFLOW_CODE_VERSION"):
        return os.environ["CLIPFLOW_CODE_VERSION"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        sha = out.stdout.strip()
        if out.returncode == 0 and sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                   cwd=Path(__file__).resolve().parent, capture_output=True,
                                   text=True, timeout=5).stdout.strip()
            return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten dataclasses / nested dicts to `a.b.c` keys for mlflow.log_params."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def log_params(params: Any) -> None:
    """Log a config (dataclass or dict) as flat params; values too long for a param are truncated
    (the whole config also goes in as JSON through `log_json`)."""
    flat = {k: (str(v)[:MAX_PARAM_CHARS]) for k, v in flatten(params).items()}
    if flat:
        mlflow.log_params(flat)


def log_json(obj: Any, name: str) -> None:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    mlflow.log_dict(obj, name)


def log_figure(fig: Any, name: str) -> None:
    """Log a matplotlib figure as a PNG artifact and close it."""
    import matplotlib.pyplot as plt

    mlflow.log_figure(fig, name)
    plt.close(fig)


def log_file(uri: str | Path, artifact_path: str | None = None) -> None:
    """Log a file as an artifact of the active run; an s3:// object is downloaded first."""
    from components.common import storage

    with storage.local_copy(str(uri)) as path:  # keeps the object's name
        mlflow.log_artifact(path, artifact_path)


@contextmanager
def stage_run(stage: str, cfg: TrackingConfig, params: Any = None,
              tags: dict[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open the MLflow run of one pipeline stage (nested under cfg.parent_run_id when set).

    Params are logged flat and the whole config as `config/<stage>.json`.
    """
    cfg.apply()
    all_tags = {"stage": stage, "code_version": code_version(), **(tags or {})}
    with mlflow.start_run(run_name=stage, parent_run_id=cfg.parent_run_id or None,
                          nested=bool(cfg.parent_run_id), tags=all_tags) as run:
        if params is not None:
            log_params(params)
            log_json(params, f"config/{stage}.json")
        yield run


def tag_run(cfg: TrackingConfig, run_id: str | None, tags: dict[str, Any]) -> None:
    """Set tags on another run (the pipeline's parent run carries the lineage chain)."""
    if not run_id:
        return
    cfg.apply()
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))

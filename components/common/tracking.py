"""MLflow helpers: the one place that decides how a stage talks to MLflow.

Every stage opens `stage_run(...)`; when a pipeline parent run id is given the stage run is nested
under it, so one pipeline run shows as one tree in the MLflow UI.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
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


class TrackingUnavailable(RuntimeError):
    """The MLflow tracking server (or store) cannot be used; the message names it and says why."""


_CONNECT_S, _READ_S = 3, 5  # one probe attempt's timeouts


def _probe(url: str, what: str, deadline: float, auth: dict) -> Any:
    """GET `url` with short timeouts, retrying refused or silent connections; no attempt starts unless it
    can end before `deadline` (time.monotonic())."""
    import requests

    delay, last = 0.5, None
    while time.monotonic() + _CONNECT_S + _READ_S <= deadline:
        try:
            return requests.get(url, timeout=(_CONNECT_S, _READ_S), **auth)
        except requests.RequestException as e:
            last = e
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 4)
    if last is None:
        raise TrackingUnavailable(f"{what} answers too slowly (the checks took over the preflight's time)")
    kind = "does not answer" if isinstance(last, requests.Timeout) else "cannot be reached"
    raise TrackingUnavailable(f"{what} {kind} ({type(last).__name__}: {last})")


def _excerpt(response: Any, limit: int = 200) -> str:
    """One line of a response body: MLflow's error message, else the text without markup."""
    import re

    try:
        body = response.json()
        text = body.get("message") or str(body) if isinstance(body, dict) else str(body)
    except ValueError:
        text = re.sub(r"<[^>]+>", " ", response.text)
    return " ".join(text.split())[:limit]


def check_server(tracking_uri: str | None, experiment: str = "", deadline_s: float = 15.0) -> str:
    """Fail fast, naming the server, unless the tracking store can be used: an http(s) server answers
    `/health`, accepts this client (credentials from MLFLOW_TRACKING_USERNAME/PASSWORD or _TOKEN, and the
    Host header: `--allowed-hosts`) and, when it proxies artifacts, reaches its artifact store; a local
    sqlite/file store's directory is writable. Returns the resolved URI; raises TrackingUnavailable."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("sqlite:///", "file:")) or "://" not in uri:
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else uri.removeprefix("file://")
        folder = Path(path).resolve().parent if uri.startswith("sqlite:") else Path(path).resolve()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not os.access(folder, os.W_OK):
                raise PermissionError(f"{folder} is not writable")
        except OSError as e:
            raise TrackingUnavailable(f"MLflow store {uri}: cannot write there ({e})") from e
        return uri
    if not uri.startswith(("http://", "https://")):
        return uri  # databricks, ...: MLflow's own client checks
    base = uri.rstrip("/")
    deadline = time.monotonic() + deadline_s
    auth: dict = {}
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        auth["headers"] = {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    elif os.environ.get("MLFLOW_TRACKING_USERNAME"):
        auth["auth"] = (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
    server = f"MLflow tracking server {base}"
    health = _probe(f"{base}/health", server, deadline, auth)
    if health.status_code != 200:
        raise TrackingUnavailable(f"MLflow tracking server {base}: /health answered HTTP {health.status_code} "
                                  f"({_excerpt(health)})")
    api = _probe(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment or 'Default'}",
                 server, deadline, auth)
    if api.status_code in (401, 403):
        hint = ("its --allowed-hosts does not list this Host header" if "host" in api.text.lower() else
                "check MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")
        raise TrackingUnavailable(f"MLflow tracking server {base} refused this client (HTTP {api.status_code}): "
                                  f"{hint}")
    if api.status_code not in (200, 404):
        raise TrackingUnavailable(f"MLflow tracking server {base}: API answered HTTP {api.status_code} "
                                  f"({_excerpt(api)})")
    store = _probe(f"{base}/api/2.0/mlflow-artifacts/artifacts?path=",
                   f"{server} answers, but a listing of its artifact store", deadline, auth)
    if store.status_code >= 500 and "no-serve-artifacts" not in store.text:
        raise TrackingUnavailable(f"MLflow tracking server {base} answers, but its artifact store does not "
                                  f"(HTTP {store.status_code}: {_excerpt(store)}); check the object "
                                  "store behind its --artifacts-destination")
    return uri


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


class MetricsQueue:
    """Metrics sent to MLflow from a background thread, so a training loop never waits on the tracking
    server: `add` only appends to a bounded queue; the thread sends batches (`log_batch`, at most 1000
    metrics each) and, while the server is down, keeps them and retries with backoff (logging the outage
    once and the recovery). `flush(timeout_s)` (at checkpoints) waits at most `timeout_s` and not at all
    while the server is failing; `close(timeout_s)` (at the end) gives the queue that long to drain (the drain
    budget: CLIPFLOW_METRICS_DRAIN_S, default 120 s) and counts what is left as dropped, saying so on the
    console (`stage`'s note). `dropped` counts what the server never confirmed: it is never below what is
    missing in MLflow, but a request a hung server received and answered only after the budget (one batch,
    or a retry's `PROBE` metrics) may still land. Metrics added to a full queue are dropped and counted too.
    `stats()` -> {"sent", "dropped", "pending"}."""

    BATCH = 1000  # MLflow caps a batch at 1000 metrics
    PROBE = 10  # while the server fails, retries send this many at a time
    DRAIN_ENV = "CLIPFLOW_METRICS_DRAIN_S"  # how long `close()` waits for the server by default (seconds)

    def __init__(self, tracking_uri: str | None, run_id: str, capacity: int = 100_000,
                 max_backoff_s: float = 10.0, stage: str = "train") -> None:
        import collections
        import threading

        from mlflow.tracking import MlflowClient

        self.run_id, self.capacity, self.max_backoff_s, self.stage = run_id, capacity, max_backoff_s, stage
        self._reported = 0  # dropped metrics already said on the console
        self.client = MlflowClient(tracking_uri)
        self.where = tracking_uri or mlflow.get_tracking_uri()
        self._pending: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self._sent = self._dropped = 0
        self._failing = False
        self._closing = self._abandoned = False
        self._thread = threading.Thread(target=self._run, name="mlflow-metrics", daemon=True)
        self._thread.start()

    def add(self, step: int, **metrics: float) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        with self._cond:
            for key, value in metrics.items():
                if len(self._pending) >= self.capacity:
                    self._dropped += 1
                else:
                    self._pending.append(Metric(key=key, value=float(value), timestamp=ts, step=step))
            self._cond.notify_all()

    def _run(self) -> None:
        import logging

        log = logging.getLogger("clipflow.tracking")
        backoff = 1.0
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                size = self.PROBE if self._failing else self.BATCH
                batch = [self._pending[i] for i in range(min(size, len(self._pending)))]
            try:
                self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
            except Exception as e:  # any failure: keep the batch, training goes on
                with self._cond:
                    if not self._failing:
                        log.warning("MLflow %s: logging metrics failed (%s: %s); %d metrics wait in the queue, "
                                    "training goes on", self.where, type(e).__name__, str(e)[:300],
                                    len(self._pending))
                    self._failing = True
                    self._cond.notify_all()
                    self._cond.wait(1.0 if self._closing else backoff)  # closing: every second till the end
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            with self._cond:
                if self._abandoned:  # close() gave up meanwhile and counted this batch as dropped
                    return
                for _ in batch:
                    self._pending.popleft()
                self._sent += len(batch)
                if self._failing:
                    log.warning("MLflow %s: reachable again; sending the %d queued metrics", self.where,
                                len(self._pending) + len(batch))
                self._failing = False
                backoff = 1.0
                self._cond.notify_all()

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until everything queued is sent, at most `timeout_s`, and not while the server is failing.
        Returns whether the queue is empty."""
        end = time.monotonic() + timeout_s
        with self._cond:
            while self._pending and not self._failing and time.monotonic() < end:
                self._cond.wait(end - time.monotonic())
            return not self._pending

    def close(self, timeout_s: float | None = None) -> dict[str, int]:
        """Send what is queued (waiting at most `timeout_s`, default the drain budget, retrying while the
        server is down), stop the thread and count what could not be sent as dropped; a drop is said on the
        console. Idempotent."""
        if timeout_s is None:
            timeout_s = float(os.environ.get(self.DRAIN_ENV) or 120.0)
        end = time.monotonic() + timeout_s
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            while self._pending and time.monotonic() < end:
                self._cond.wait(min(1.0, end - time.monotonic()))
            if self._pending:  # a batch still in flight now counts as dropped even if it lands later
                self._abandoned = True
                self._dropped += len(self._pending)
                self._pending.clear()
            self._cond.notify_all()
        self._thread.join(timeout=max(0.0, end - time.monotonic()))
        stats = self.stats()
        if stats["dropped"] > self._reported:
            from components.common.console import note

            note(self.stage, f"{stats['dropped'] - self._reported} metrics could not reach MLflow {self.where} "
                             f"(no answer within the {timeout_s:.0f} s drain budget): counted as dropped; "
                             f"{stats['sent']} were sent")
            self._reported = stats["dropped"]
        return stats

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"sent": self._sent, "dropped": self._dropped, "pending": len(self._pending)}

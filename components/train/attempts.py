"""Restarts of training show: on the console, in MLflow, and in the curves.

Training restarts from its latest checkpoint when a worker fails (Ray Train's `FailureConfig`) or when the
train task is retried (KFP), and each start of the loop is an *attempt*. Two small hooks record them in
`<output>/attempts/`:
- `FailureRecorder` (a Ray Train `UserCallback`, run by the controller): each worker failure's root cause
  (`components.common.console.error_line`, e.g. `ActorDiedError: ...` for a killed worker) as
  `failure-<time>.json`;
- `begin(config, rank, start_step)` (rank 0, where the loop has restored its checkpoint): writes
  `attempt-<k>.json` (its first step and start time) and, from the second attempt on, says on the console
  "train restarted from step N (attempt k) after: <cause>" (the newest failure recorded).

In MLflow each attempt logs `train/attempt` = k at its first step (the metric's history is the list of
attempts and where each began; in the UI's charts it marks the steps where the loss curve restarts) and the
tags `restarts` (k - 1) and `attempt_first_steps` (e.g. `0,500`). Points a failed attempt logged past the
checkpoint it restarted from stay in MLflow (they were sent, and MLflow cannot delete metric points): the
attempts are marked rather than the points dropped, and the stage's own plots keep, per step, the latest
point (`components.train.view.metric_by_step`), i.e. the surviving attempt's.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from components.common import storage

ATTEMPTS_DIR = "attempts"
UNKNOWN_CAUSE = "no recorded failure (a resubmission, or a process killed before Ray Train saw it fail)"

try:  # the callback runs under Ray Train; the loop also runs without Ray (components.train.worker.LocalWorker)
    from ray.train import UserCallback as _Callback
except ImportError:  # pragma: no cover - no Ray installed
    _Callback = object  # type: ignore[assignment,misc]


def _folder(output_uri: str) -> str:
    return storage.join(output_uri, ATTEMPTS_DIR)


class FailureRecorder(_Callback):
    """Ray Train callback: records each worker failure's root cause under `<output_uri>/attempts/`."""

    def __init__(self, output_uri: str) -> None:
        self.output_uri = output_uri

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        from components.common.console import error_line

        rank = min(worker_exceptions)
        cause = f"worker rank {rank}: {error_line(worker_exceptions[rank])}"
        try:
            record_failure(self.output_uri, cause)
        except Exception as exc:  # noqa: BLE001 - never let the record stop Ray Train's own recovery
            print(f"[train] could not record the failure ({cause}): {type(exc).__name__}: {exc}", flush=True)


def record_failure(output_uri: str, cause: str) -> None:
    stamp = time.time()
    storage.write_json(storage.join(_folder(output_uri), f"failure-{stamp:.6f}.json"), {"time": stamp, "cause": cause})


def history(output_uri: str) -> tuple[list[dict], list[dict]]:
    """(attempts, failures) recorded under `<output_uri>/attempts/`, oldest first."""
    attempts, failures = [], []
    for uri in storage.list_files(_folder(output_uri)):
        name = uri.rsplit("/", 1)[-1]
        if name.startswith("attempt-"):
            attempts.append(storage.read_json(uri))
        elif name.startswith("failure-"):
            failures.append(storage.read_json(uri))
    return sorted(attempts, key=lambda a: a["attempt"]), sorted(failures, key=lambda f: f["time"])


def begin(config: dict[str, Any], rank: int, start_step: int) -> dict | None:
    """Rank 0, once the loop has restored its state: record this attempt, say a restart on the console and
    log the attempt to the training run (without waiting on MLflow). Returns the attempt's record."""
    if rank != 0:
        return None
    from components.common.console import note

    output_uri = config["output_uri"]
    try:
        attempts, failures = history(output_uri)
        k = len(attempts) + 1
        record = {"attempt": k, "first_step": start_step, "started": time.time()}
        storage.write_json(storage.join(_folder(output_uri), f"attempt-{k:04d}.json"), record)
    except OSError as exc:  # StorageError included: the record is not worth a failed attempt; say why
        note("train", f"could not record this training attempt (from step {start_step}): {exc}")
        return None
    if k > 1:
        since = attempts[-1]["started"]
        newer = [f for f in failures if f["time"] >= since]
        record["cause"] = newer[-1]["cause"] if newer else UNKNOWN_CAUSE
        note("train", f"train restarted from step {start_step} (attempt {k}) after: {record['cause']}")
    if config.get("run_id"):
        first_steps = ",".join(str(a["first_step"]) for a in [*attempts, record])
        threading.Thread(target=_log, args=(config.get("tracking_uri"), config["run_id"], record, first_steps),
                         name="mlflow-attempt", daemon=True).start()
    return record


def _log(tracking_uri: str | None, run_id: str, record: dict, first_steps: str) -> None:
    """The attempt in the training run (a failure to log is printed, never raised: training goes on)."""
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    ts = int(record["started"] * 1000)
    try:
        MlflowClient(tracking_uri).log_batch(
            run_id, metrics=[Metric("train/attempt", record["attempt"], ts, record["first_step"])],
            tags=[RunTag("restarts", str(record["attempt"] - 1)), RunTag("attempt_first_steps", first_steps),
                  *([RunTag("restart_causes", json.dumps(record["cause"])[:5000])] if "cause" in record else [])])
    except Exception as exc:  # noqa: BLE001 - the record is on storage and on the console already
        print(f"[train] could not log attempt {record['attempt']} to MLflow: {type(exc).__name__}: {exc}",
              flush=True)

"""Restarts of training show (components/train/attempts.py): the console says "train restarted from step N
(attempt k) after: <cause>", MLflow records the restart count and each attempt's first step. Once without
Ray (the loop in this process, resumed, with a recorded failure) here, and under Ray Train with a worker
that fails (the controller's callback records the cause: tests/test_train.py's restart test, which
already pays for a Ray Train run with a failure)."""

from __future__ import annotations

import json

import mlflow
import pytest

from components.common import config, console
from components.train import attempts
from components.train.config import TrainConfig
from tests.fixtures_data import shape_shards  # noqa: F401  (a pytest fixture)


def _cfg(**kw) -> TrainConfig:
    base = dict(model_config="tiny", steps=4, batch_size=8, num_workers=1, loader_workers=0, checkpoint_every=2,
                log_every=1, progress_every_s=60.0, lr=1e-3, warmup_steps=1, system_metrics=False, cpus_per_process=1)
    return config.from_dict(TrainConfig, {**base, **kw})


def _notes(events) -> list[str]:
    return [e["text"] for e in map(json.loads, events.read_text().splitlines()) if e["kind"] == "note"]


def _attempt_history(client, run_id: str) -> list[tuple[int, int]]:
    return sorted((m.step, int(m.value)) for m in client.get_metric_history(run_id, "train/attempt"))


def _wait_for_tags(client, run_id: str, **expected) -> dict:
    import time

    for _ in range(100):  # the attempt is logged from a thread: training never waits for it
        tags = client.get_run(run_id).data.tags
        if all(tags.get(k) == v for k, v in expected.items()):
            return tags
        time.sleep(0.1)
    return client.get_run(run_id).data.tags


def test_a_resumed_loop_says_it_restarted_and_why(shape_shards, tmp_path, monkeypatch):  # noqa: F811
    from components.train.loop import run_worker_loop
    from components.train.worker import LocalWorker

    events = tmp_path / "events.jsonl"
    monkeypatch.setenv(console.CHANNEL_ENV, str(events))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("attempts")).info.run_id
    loop = {"manifest_uri": shape_shards, "output_uri": str(tmp_path / "out"), "run_id": run_id, "tracking_uri": uri}

    run_worker_loop({**loop, "cfg": config.to_dict(_cfg(steps=2))}, LocalWorker(tmp_path / "ckpt"))
    assert _notes(events) == [], "a first attempt is no restart"
    attempts.record_failure(loop["output_uri"], "worker rank 1: BucketNotFound: bucket 'clipdata' does not exist")
    run_worker_loop({**loop, "cfg": config.to_dict(_cfg(steps=4))}, LocalWorker(tmp_path / "ckpt"))

    assert _notes(events) == ["train restarted from step 2 (attempt 2) after: worker rank 1: BucketNotFound: "
                              "bucket 'clipdata' does not exist"]
    tags = _wait_for_tags(client, run_id, restarts="1")
    assert tags["restarts"] == "1" and tags["attempt_first_steps"] == "0,2"
    assert _attempt_history(client, run_id) == [(0, 1), (2, 2)], "each attempt at its first step"
    done, failures = attempts.history(loop["output_uri"])
    assert [(a["attempt"], a["first_step"]) for a in done] == [(1, 0), (2, 2)] and len(failures) == 1

    run_worker_loop({**loop, "cfg": config.to_dict(_cfg(steps=6))}, LocalWorker(tmp_path / "ckpt"))
    assert _notes(events)[-1] == f"train restarted from step 4 (attempt 3) after: {attempts.UNKNOWN_CAUSE}", \
        "no failure recorded since the last attempt: the cause is not invented"

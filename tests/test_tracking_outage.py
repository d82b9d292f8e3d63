"""Training never waits on MLflow: rank 0's metrics go through `MetricsQueue`, a bounded background queue.

A real `mlflow server` on 127.0.0.1 (tests/services.py) is stopped mid-training (SIGSTOP: it accepts
connections and answers nothing, the harder case) for longer than the MLflow client's retry budget (shrunk
here to one 5 s attempt, MLFLOW_HTTP_REQUEST_MAX_RETRIES=0, so the test stays short), then continued:
training goes on, and the metrics logged meanwhile arrive once the server is back or are counted as dropped
in the training summary.
"""

from __future__ import annotations

import threading
import time

import pytest

from components.common import config
from components.common.tracking import MetricsQueue, TrackingConfig
from components.train.config import TrainConfig
from tests.fixtures_data import shape_shards  # noqa: F401  (a pytest fixture)
from tests.net_helpers import refused_endpoint
from tests.services import MlflowServer
from tests.test_train import HEALTH_CHECK_S

OUTAGE_S = 12  # longer than the 5 s retry budget


@pytest.fixture(autouse=True)
def quick_health_checks(monkeypatch):
    """Ray Train's controller (started by the tests' own Ray, which inherits this) sees a run's end sooner."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_S)


@pytest.fixture
def short_mlflow_retries(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def test_queue_never_blocks_and_counts_what_it_cannot_send(short_mlflow_retries):
    queue = MetricsQueue(refused_endpoint(), "run-that-cannot-be-reached", capacity=5)
    t = time.monotonic()
    for step in range(4):
        queue.add(step, loss=1.0 / (step + 1), lr=0.1)  # 8 metrics into 5 places
    assert time.monotonic() - t < 0.5
    assert queue.stats()["dropped"] == 3
    time.sleep(1.5)  # the sender has failed by now
    t = time.monotonic()
    assert queue.flush(timeout_s=30) is False and time.monotonic() - t < 1, "no waiting while the server fails"
    assert queue.close(timeout_s=1) == {"sent": 0, "dropped": 8, "pending": 0}


def test_training_goes_on_while_the_tracking_server_is_down(shape_shards, short_mlflow_retries,  # noqa: F811
                                                            tmp_path):
    import mlflow

    from components.common.ray_runtime import ray_session
    from components.train.stage import train

    server = MlflowServer(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"), log_dir=tmp_path).start()
    try:
        cfg = config.from_dict(TrainConfig, dict(model_config="tiny", steps=40, batch_size=32, num_workers=2,
                                                 loader_workers=0, checkpoint_every=10, log_every=1,
                                                 progress_every_s=2.0, lr=1e-3, warmup_steps=3,
                                                 system_metrics=False))
        result: dict = {}
        with ray_session(num_cpus=3) as started:  # started here, after the retry settings: its workers inherit them
            assert started, "a Ray already running would not have the settings above"
            worker = threading.Thread(target=lambda: result.update(
                train(shape_shards, str(tmp_path / "out"), cfg, TrackingConfig(server.url, "outage"))))
            worker.start()
            client = mlflow.MlflowClient(server.url)
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and worker.is_alive():  # wait for the first metrics to land
                runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                          "tags.stage = 'train'") if client.search_experiments() else []
                if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
                    break
                time.sleep(0.5)
            else:
                pytest.fail("training logged no metric within 180 s")
            down = time.time()
            server.pause()
            time.sleep(OUTAGE_S)
            server.resume()
            up = time.time()
            worker.join(timeout=300)
        assert not worker.is_alive() and result, "training finished"
        assert result["steps"] == cfg.steps and result["resumed_from_step"] == 0, "no restart from a checkpoint"
        history = client.get_metric_history(result["run_id"], "train/loss")
        during = [m for m in history if down * 1000 < m.timestamp < up * 1000]
        assert during, "training went on while the server was down, and those metrics arrived afterwards"
        assert len({m.step for m in history}) + result["metrics_dropped"] == cfg.steps, "every step accounted for"
        assert client.get_run(result["run_id"]).data.metrics["metrics_dropped"] == result["metrics_dropped"]
    finally:
        server.stop()


def test_an_outage_across_the_end_of_training_is_counted_said_and_closed_truly(shape_shards, tmp_path,  # noqa: F811
                                                                               monkeypatch):
    """The server stopped from early in training until after the loop ended, longer than the drain budget
    (shrunk to 3 s): training finishes, what could not be sent is counted (`metrics_dropped`, in the result
    and on the run) and said on the console, and once the server is back the run ends FINISHED."""
    import json

    import mlflow

    from components.common import console, storage
    from components.common.ray_runtime import ray_session
    from components.train.stage import train

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # the driver's calls outlast a short wait
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    monkeypatch.setenv(MetricsQueue.DRAIN_ENV, "3")
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv(console.CHANNEL_ENV, str(events))
    server = MlflowServer(f"sqlite:///{tmp_path}/mlflow.db", str(tmp_path / "artifacts"), log_dir=tmp_path).start()
    try:
        cfg = config.from_dict(TrainConfig, dict(model_config="tiny", steps=20, batch_size=16, num_workers=2,
                                                 loader_workers=0, checkpoint_every=10, log_every=1,
                                                 progress_every_s=5.0, lr=1e-3, warmup_steps=3,
                                                 system_metrics=False, run_name="outage-end"))
        final = storage.join(str(tmp_path / "out"), "ray", "outage-end", "checkpoint_00000020")
        result: dict = {}
        with ray_session(num_cpus=3) as started:  # started after the settings above: its workers inherit them
            assert started, "a Ray already running would not have the settings above"
            worker = threading.Thread(target=lambda: result.update(
                train(shape_shards, str(tmp_path / "out"), cfg, TrackingConfig(server.url, "outage-end"))))
            worker.start()
            client = mlflow.MlflowClient(server.url)
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and worker.is_alive():  # the loop logs: stop the server
                runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                          "tags.stage = 'train'") if client.search_experiments() else []
                if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
                    break
                time.sleep(0.2)
            server.pause()
            while time.monotonic() < deadline + 120 and worker.is_alive() and not storage.exists(final):
                time.sleep(0.2)  # the loop has closed its queue before it writes the final checkpoint
            server.resume()
            worker.join(timeout=300)
        assert not worker.is_alive() and result, "training finished"
        assert result["steps"] == cfg.steps and result["metrics_dropped"] > 0
        run = client.get_run(result["run_id"])
        assert run.info.status == "FINISHED" and run.data.metrics["metrics_dropped"] == result["metrics_dropped"]
        logged = {m.step for m in client.get_metric_history(result["run_id"], "train/loss")}
        per_step = 7  # loss, lr, logit_scale, samples_per_s, data_wait_s, samples_seen, epoch
        missing = per_step * (cfg.steps - len(logged))
        # at most every metric logged: the per-step ones, and the checkpoints' and attempts' (fewer than one a step)
        assert 0 < missing <= result["metrics_dropped"] <= (per_step + 1) * cfg.steps, \
            "every metric missing from MLflow is counted (a request the paused server answered later may land)"
        notes = [e["text"] for e in map(json.loads, events.read_text().splitlines()) if e["kind"] == "note"]
        assert any(f"{result['metrics_dropped']} metrics could not reach MLflow {server.url}" in n for n in notes), \
            notes
    finally:
        server.stop()

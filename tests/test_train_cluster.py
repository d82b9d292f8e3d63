"""Training across Ray nodes: a `ray.cluster_utils.Cluster` of 1-CPU nodes on this machine, checkpoints on the
loopback S3 server. Two workers on two nodes train the same loss curve as two workers on one node, and a run
that loses a node mid-way restarts from its latest checkpoint and finishes."""

from __future__ import annotations

import threading
import time

import pytest

from components.common import config, storage
from components.common.tracking import TrackingConfig
from components.train.config import TrainConfig
from components.train.stage import train
from tests.test_epochs import small  # noqa: F401  (the session's small shards: 16-sample shards of 72 px)
from tests.test_train import HEALTH_CHECK_S
from tests.test_train import tracking  # noqa: F401  (a module-scoped pytest fixture: an MLflow store per module)

OBJECT_STORE = 100 * 1024 ** 2
CURVE_RTOL = 1e-4  # same seed, same batches, gloo sums of two values: the curves agree to float rounding


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A head node without CPUs (the driver and Ray Train's controller, which needs none) and two 1-CPU nodes
    for the workers (the module adds and removes nodes)."""
    import ray
    from ray.cluster_utils import Cluster

    from components.common.ray_runtime import worker_env

    with pytest.MonkeyPatch.context() as mp:  # the nodes, and so the controller, inherit it; a lost node is seen sooner
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_S)
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE})
        for _ in range(2):
            c.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
        ray.init(address=c.address, runtime_env={"env_vars": worker_env()}, log_to_driver=True)
        c.wait_for_nodes()
        try:
            yield c
        finally:
            ray.shutdown()
            c.shutdown()


def _config(**kw) -> TrainConfig:
    base = dict(model_config="tiny", steps=8, batch_size=16, num_workers=2, loader_workers=0, checkpoint_every=4,
                keep_checkpoints=2, log_every=1, max_failures=1, lr=1e-3, warmup_steps=2, system_metrics=False,
                progress_every_s=30.0)
    return config.from_dict(TrainConfig, {**base, **kw})


def _losses(tracking: TrackingConfig, run_id: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking.tracking_uri).get_metric_history(run_id, "train/loss")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def test_two_nodes_train_the_curve_of_one(cluster, tracking, small, bucket):  # noqa: F811
    """2 workers on 2 one-CPU nodes, then (those replaced by one 2-CPU node) 2 workers on one node: the same
    seed gives the same loss curve within CURVE_RTOL."""
    spread = train(small, f"s3://{bucket}/spread", _config(run_name="spread"), tracking)
    assert spread["nodes"] == 2 and spread["steps"] == 8
    assert spread["checkpoint_uri"] == f"s3://{bucket}/spread/ray/spread/checkpoint_00000008"
    old_nodes = list(cluster.worker_nodes)
    cluster.add_node(num_cpus=2, object_store_memory=OBJECT_STORE)
    for node in old_nodes:
        cluster.remove_node(node)
    cluster.wait_for_nodes()
    packed = train(small, f"s3://{bucket}/packed", _config(run_name="packed"), tracking)
    assert packed["nodes"] == 1 and packed["steps"] == 8
    a, b = _losses(tracking, spread["run_id"]), _losses(tracking, packed["run_id"])
    assert len(a) == len(b) == 8
    assert a == pytest.approx(b, rel=CURVE_RTOL)


def test_a_lost_node_restarts_from_the_latest_checkpoint(cluster, tracking, small, bucket):  # noqa: F811
    """Two 1-CPU nodes join; when the second checkpoint is on S3 a node running a worker is removed: Ray Train
    restarts the group on the nodes left (at least 2 CPUs whichever goes) from the latest checkpoint complete on
    S3 when the node went (or a later one), never from step 0, and the run finishes with only the checkpoints
    it keeps."""
    from ray._private.state import actors  # the GCS's actor table (node of each actor)

    from components.train.worker import checkpoint_step, latest_checkpoint

    for _ in range(2):
        cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
    cluster.wait_for_nodes()
    # long enough that the node is gone before the run could end on its own (on an idle machine the last of
    # 20 steps came before Ray Train saw the node go, and the run finished unrestarted)
    cfg = _config(run_name="lost", steps=60, checkpoint_every=4)
    out = f"s3://{bucket}/lost"
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(train(small, out, cfg, tracking)), daemon=True)
    runner.start()
    # the second checkpoint complete on S3: Ray Train may not have registered even the first one yet (its
    # controller collects every rank's report in polls 2 s apart), which the restart must not depend on
    checkpoints = f"{out}/ray/lost"
    def on_s3() -> int:  # the step of the newest checkpoint complete on S3 (0: none)
        found = latest_checkpoint(checkpoints)
        return checkpoint_step(found) if found else 0

    deadline = time.monotonic() + 180  # a bound for a hang, not a speed check: a loaded machine took over 90 s
    while on_s3() < 8 and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert on_s3() >= 8, "no second checkpoint within 180 s"
    alive = actors(actor_state_name="ALIVE").values()
    busy = {a["Address"]["NodeID"] for a in alive if a["ActorClassName"].endswith("RayTrainWorker")}
    victims = [n for n in cluster.worker_nodes if n.node_id in busy]  # nodes running a worker (not the head)
    assert victims, (busy, sorted({a["ActorClassName"] for a in alive}), [n.node_id for n in cluster.worker_nodes])
    before = on_s3()  # again: a later one may have landed meanwhile
    cluster.remove_node(victims[0])
    runner.join(timeout=150)
    assert not runner.is_alive() and result, "training did not finish after the node was lost"
    assert result["steps"] == 60 and result["nodes"] >= 1
    assert 8 <= before <= result["resumed_from_step"] < 60, (before, result["resumed_from_step"])
    assert result["resumed_from_step"] % 4 == 0
    folders = {f.rsplit("/", 2)[-2] for f in storage.list_files(checkpoints)} - {"lost"}  # "lost": Ray's own files
    assert folders == {"checkpoint_00000056", "checkpoint_00000060"}  # keep_checkpoints=2, no leftovers

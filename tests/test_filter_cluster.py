"""The filter on a 3-node Ray cluster (`ray.cluster_utils.Cluster`, 1 CPU a node, all on this machine):
the same bytes as one process, work on several nodes, the language model in one actor per node, and a
node lost mid-run (with its tasks and its model actor) changes nothing."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from components.common import config, storage
from components.filter.config import FilterConfig
from components.filter.stage import filter_pairs
from components.synthetic.corpus import generate_corpus
from tests.filter_helpers import content_hash

N = 200
SETTINGS = {"files_per_unit": 10, "shuffle_partitions": 3}


def _filter(src, out, **settings) -> dict:
    return filter_pairs(str(out), config.from_dict(FilterConfig, {"source_uri": str(src), **SETTINGS, **settings}))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw")
    generate_corpus(out, n=N, seed=3)
    return out


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    return out, _filter(corpus, out, runner="local")


@pytest.fixture()
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    store = 100 * 2**20
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": store})
    workers = [c.add_node(num_cpus=1, object_store_memory=store) for _ in range(2)]
    c.wait_for_nodes()
    ray.init(address=c.address, logging_level=logging.WARNING, log_to_driver=False)
    yield c, workers
    ray.shutdown()
    c.shutdown()


def test_three_nodes_give_the_single_node_bytes(corpus, single, cluster, tmp_path):
    out_single, stats_single = single
    stats = _filter(corpus, tmp_path / "cluster", runner="ray", model_actors_per_node=1)
    assert stats["total"] == N and stats["rejected"] == stats_single["rejected"]
    assert stats["execution"]["nodes"] >= 2  # the tasks ran on more than one node
    assert stats["execution"]["model_actors"] == 3  # language ID in one actor per node
    assert content_hash(tmp_path / "cluster") == content_hash(out_single)


def test_a_node_lost_mid_filter(corpus, single, cluster, tmp_path):
    c, workers = cluster
    out = tmp_path / "lost"
    result: dict = {}
    run = threading.Thread(target=lambda: result.update(stats=_filter(corpus, out, runner="ray",
                                                                      model_actors_per_node=1)))
    run.start()
    deadline = time.time() + 60
    while time.time() < deadline and len(storage.list_files(str(out / "_work" / "analysed"))) < 3:
        time.sleep(0.2)
    assert run.is_alive(), "the filter ended before a node could be removed: make the corpus larger"
    c.remove_node(workers[1], allow_graceful=False)  # mid-run: the tasks it held are retried elsewhere
    run.join(timeout=240)
    assert not run.is_alive() and result["stats"]["total"] == N
    assert content_hash(out) == content_hash(single[0])

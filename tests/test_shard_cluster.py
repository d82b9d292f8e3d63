"""The shard stage on a 3-node Ray cluster (`ray.cluster_utils.Cluster`, 1 CPU per node) writes the same bytes
as on one node, with its writers spread over the nodes."""

from __future__ import annotations

import logging
import os

import pytest

from components.common import storage
from components.common.ray_runtime import ray_session, worker_env
from components.filter.config import FilterConfig
from components.filter.stage import filter_pairs
from components.shard.config import ShardConfig
from components.shard.stage import shard

CFG = ShardConfig(samples_per_shard=8, image_max_side=64, val_fraction=0.1, seed=7, vocab_size=300, num_cpus=1)
OBJECT_STORE = 100 * 2**20  # bytes per node


def _files(root: str) -> dict[str, bytes]:
    """Every file of a shard output but the manifest, by name."""
    return {os.path.relpath(p, root): storage.read_bytes(p) for p in storage.list_files(root)
            if not p.endswith("manifest.json")}


@pytest.fixture(scope="module")
def filtered(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("filtered"))
    stats = filter_pairs(out, FilterConfig(source_uri="synthetic", synthetic_samples=160, runner="local"))
    assert stats["kept"] > 6 * CFG.samples_per_shard
    return out


def test_three_nodes_write_what_one_node_writes(filtered, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    with ray_session(num_cpus=1, log_to_driver=False):
        single = shard(filtered, str(tmp_path / "one"), CFG)
    assert len(single["run"]["nodes"]) == 1

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE})
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env={"env_vars": worker_env()})
        cluster.wait_for_nodes()
        multi = shard(filtered, str(tmp_path / "three"), CFG)
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert len(multi["run"]["nodes"]) >= 2, "the writers ran on one node only"
    assert multi["content_hash"] == single["content_hash"]
    assert _files(str(tmp_path / "three")) == _files(str(tmp_path / "one"))  # every tar and the tokenizer
    drop = ("run", "created_at", "splits", "tokenizer")  # these name the output folder
    assert {k: v for k, v in multi.items() if k not in drop} == {k: v for k, v in single.items() if k not in drop}

    def records(manifest: dict) -> list:
        return [(sp, s["uri"].rsplit("/", 1)[1], s["samples"], s["bytes"], s["sha256"])
                for sp in ("train", "validation") for s in manifest["splits"][sp]["shards"]]

    assert records(multi) == records(single)

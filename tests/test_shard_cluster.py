"""The shard stage's two paths write the same bytes: in this process (no Ray) and on a 3-node Ray cluster
(`ray.cluster_utils.Cluster`, 1 CPU per node) with its writers spread over the nodes, also when a node is lost
while the writers run."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time

import pytest

from components.common import storage
from components.common.ray_runtime import worker_env
from components.filter.config import FilterConfig
from components.filter.stage import filter_pairs
from components.shard.config import ShardConfig
from components.shard.in_process import NODE
from components.shard.stage import runs_in_process, shard
from tests.fixtures_data import write_kept_parts
from tests.test_shard_reader import crash_and_resume

CFG = ShardConfig(samples_per_shard=8, image_max_side=64, val_fraction=0.1, seed=7, vocab_size=300, num_cpus=1)
OBJECT_STORE = 100 * 2**20  # bytes per node


def _files(root: str) -> dict[str, bytes]:
    """Every file of a shard output, by name (the manifest without the fields that name the output folder or
    the time, which are compared apart)."""
    return {os.path.relpath(p, root): storage.read_bytes(p) for p in storage.list_files(root)
            if not p.endswith("manifest.json")}


def _manifest(result: dict) -> dict:
    drop = ("run", "created_at", "splits", "tokenizer")  # these name the output folder or the time
    return {k: v for k, v in result.items() if k not in drop}


def _records(manifest: dict) -> list:
    return [(sp, s["uri"].rsplit("/", 1)[1], s["samples"], s["bytes"], s["sha256"])
            for sp in ("train", "validation") for s in manifest["splits"][sp]["shards"]]


def _assert_same(got: dict, got_dir, ref: dict, ref_dir) -> None:
    assert got["content_hash"] == ref["content_hash"]
    assert _files(str(got_dir)) == _files(str(ref_dir))  # every tar and the tokenizer
    assert _manifest(got) == _manifest(ref)
    assert _records(got) == _records(ref)


@pytest.fixture(scope="module")
def filtered(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("filtered"))
    stats = filter_pairs(out, FilterConfig(source_uri="synthetic", synthetic_samples=160, runner="local"))
    assert stats["kept"] > 6 * CFG.samples_per_shard
    return out


@pytest.fixture(scope="module")
def in_process(filtered, tmp_path_factory):
    """The reference: the in-process path (no Ray)."""
    out = tmp_path_factory.mktemp("in-process")
    result = shard(filtered, str(out), dataclasses.replace(CFG, runner="local"))
    assert result["run"]["nodes"] == [NODE]
    return out, result


@pytest.fixture(scope="module")
def cluster():
    """A 3-node Ray cluster on this machine (the head and two workers, 1 CPU each) for the module."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE})
    workers = [c.add_node(num_cpus=1, object_store_memory=OBJECT_STORE) for _ in range(2)]
    try:
        ray.init(address=c.address, logging_level=logging.WARNING, log_to_driver=False,
                 runtime_env={"env_vars": worker_env()})
        c.wait_for_nodes()
        _start_a_worker_on_every_node()
        yield c, workers
    finally:
        ray.shutdown()
        c.shutdown()


def _start_a_worker_on_every_node() -> None:
    """One task on each node, so that the tests see tasks spread over the nodes, not over the nodes whose worker
    processes happened to start first (a slot is written in tens of ms: one warm worker could take them all)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    def node_id() -> str:
        return ray.get_runtime_context().get_node_id()

    ids = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    task = ray.remote(num_cpus=1)(node_id)
    assert sorted(ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(i, soft=False)).remote()
                           for i in ids])) == sorted(ids)


def test_auto_runs_small_inputs_in_process_and_local_refuses_large_ones(filtered, tmp_path):
    assert runs_in_process(CFG, CFG.in_process_max_bytes)
    assert not runs_in_process(CFG, CFG.in_process_max_bytes + 1)
    assert not runs_in_process(dataclasses.replace(CFG, runner="ray"), 0)
    with pytest.raises(ValueError, match="runner='local': the kept parts hold .* over in_process_max_bytes=10"):
        shard(filtered, str(tmp_path / "o"), dataclasses.replace(CFG, runner="local", in_process_max_bytes=10))
    with pytest.raises(ValueError, match="runner='sometimes'"):
        dataclasses.replace(CFG, runner="sometimes")


def test_a_writer_reads_only_the_row_groups_of_its_rows(tmp_path):
    """The Ray path's writers read their rows from the sorted files by row range: any range, across row groups,
    gives the rows of that range, and only the groups that hold them are read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from components.common.shuffle import write_table
    from components.shard.on_ray import read_rows

    table = pa.table({"rank": list(range(50)), "caption": [f"c{i}" for i in range(50)]})
    uri = str(tmp_path / "part-00000.parquet")
    write_table(uri, table, row_group_size=7)
    assert pq.ParquetFile(uri).metadata.num_row_groups == 8
    for start, end in ((0, 50), (0, 7), (3, 4), (6, 8), (13, 36), (49, 50), (21, 21)):
        assert read_rows(uri, start, end).equals(table.slice(start, end - start)), (start, end)
    assert read_rows(uri, 10, 20, ["caption"]).column_names == ["caption"]
    read = []
    real = pq.ParquetFile.read_row_groups
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pq.ParquetFile, "read_row_groups", lambda self, groups, **kw: read.append(groups) or real(
            self, groups, **kw))
        read_rows(uri, 13, 22)
    assert read == [[1, 2, 3]]  # rows 7-13, 14-20, 21-27


def test_three_nodes_write_what_the_in_process_path_writes(filtered, in_process, cluster, tmp_path):
    multi = shard(filtered, str(tmp_path / "three"), dataclasses.replace(CFG, runner="ray"))
    assert len(multi["run"]["nodes"]) >= 2 and NODE not in multi["run"]["nodes"], "the writers ran on one node only"
    _assert_same(multi, tmp_path / "three", in_process[1], in_process[0])


def test_on_ray_a_crashed_run_resumes_and_bad_rows_are_named(filtered, in_process, cluster, tmp_path):
    """On Ray too: a run stopped after some slots leaves no manifest, and its rerun skips the finished slots and
    ends with the in-process path's bytes; a bad row's error names the part file and the key."""
    crash_and_resume(str(tmp_path / "crash"), filtered, in_process[1], dataclasses.replace(CFG, runner="ray"),
                     relayout=False)
    assert _files(str(tmp_path / "crash")) == _files(str(in_process[0]))
    bad = str(tmp_path / "bad")
    write_kept_parts(bad, [{"key": "a b", "source_uri": "x", "sha256": "0", "phash": 0, "caption": "a cat",
                               "width": 8, "height": 8, "language": "en", "image": b"x"}])
    with pytest.raises(ValueError, match=r"part-00000\.parquet: key 'a b' must not contain"):
        shard(bad, str(tmp_path / "o"), dataclasses.replace(CFG, runner="ray"))


def test_a_node_lost_mid_shard(filtered, in_process, cluster, tmp_path):
    """A worker node killed once 2 slots are written: the writer tasks running there, and those Ray sends there
    before it learns the node is gone, run again on the other nodes, reading their rows from storage, and the
    run finishes with the same shards, tokenizer and manifest as the uninterrupted run. (On this tiny input a
    slot takes tens of ms, so with warm workers the node often holds no task when it dies; on a cold cluster it
    loses running writers, which Ray retries.)"""
    c, workers = cluster
    out = tmp_path / "lost"
    result: dict = {}

    def target() -> None:
        try:
            result["m"] = shard(filtered, str(out), dataclasses.replace(CFG, runner="ray"))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    run = threading.Thread(target=target)
    run.start()
    deadline = time.time() + 60
    while time.time() < deadline and len(storage.list_files(str(out / "_done"))) < 2 and run.is_alive():
        time.sleep(0.05)
    assert run.is_alive(), "the shard stage ended before a node could be removed: make the input larger"
    c.remove_node(workers[1], allow_graceful=False)  # its tasks are retried elsewhere
    run.join(timeout=120)
    assert not run.is_alive() and "error" not in result, result.get("error")
    _assert_same(result["m"], out, in_process[1], in_process[0])

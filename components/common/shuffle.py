"""Partitioned shuffles of parquet parts through storage: the filter's whole-dataset rules (groupbys on a
key hash, components/filter/decide.py) and the shard stage's sort (ranges of rank, components/shard/on_ray.py).

A shuffle round is a *map* (each input part is split by `partition_of(column)` into
`<dir>/p-<partition>/<source>.parquet`) and a *reduce* (one task per partition gathers its files, in name
order, and applies a rule to whole groups, since equal keys always land in the same partition, or sorts its
range). Both run as Ray tasks spread over the cluster, or in this process with `runner="local"`, the
same code. Every file name is fixed by (round, partition, source), so a result does not depend on which
task finished first or on which node it ran, and nothing per record passes through the driver: it hands
out file names and gets counts back.

Why not Ray Data's `groupby().map_groups()`: the filter must also run without Ray (`runner="local"`),
its output must be byte-identical however it was scheduled (Ray Data names written files by task and
UUID), and the rounds need to read back their inputs by name when a run resumes. The shuffle is the
same map/reduce shape, written on pyarrow and the storage layer (so `_work/` can be on S3).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from components.common import storage

_MIX = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 of int64/uint64 values: a stable, well-spread 64-bit hash (the same on every machine)."""
    z = np.asarray(values).astype(np.int64).view(np.uint64) + _MIX[0]
    z = (z ^ (z >> np.uint64(30))) * _MIX[1]
    z = (z ^ (z >> np.uint64(27))) * _MIX[2]
    return z ^ (z >> np.uint64(31))


def partition_of(values: np.ndarray, parts: int) -> np.ndarray:
    """The partition (0..parts-1) of each value."""
    return (mix64(values) % np.uint64(max(parts, 1))).astype(np.int64)


def part_dir(root: str, partition: int) -> str:
    return storage.join(root, f"p-{partition:05d}")


def write_table(uri: str, table: pa.Table, **options) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **({"compression": "zstd"} | options))
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(pa.BufferReader(storage.read_bytes(uri)), columns=columns)


def scatter(table: pa.Table, partitions: np.ndarray, root: str, source: str) -> int:
    """Write the rows of `table` to `<root>/p-<partition>/<source>.parquet` by `partitions` (one per row);
    returns the number of files written."""
    if not table.num_rows:
        return 0
    order = np.argsort(partitions, kind="stable")
    sorted_parts = partitions[order]
    bounds = np.flatnonzero(np.diff(sorted_parts)) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [len(order)]))
    for s, e in zip(starts, ends):
        rows = table.take(pa.array(order[s:e]))
        write_table(storage.join(part_dir(root, int(sorted_parts[s])), f"{source}.parquet"), rows)
    return len(starts)


def gather(root: str, partition: int, schema: pa.Schema) -> pa.Table:
    """Every file of one partition, concatenated in file-name order (an empty table when there is none)."""
    files = [f for f in storage.list_files(part_dir(root, partition)) if f.endswith(".parquet")]
    tables = [read_table(f).select(schema.names).cast(schema) for f in files]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def clear(*prefixes: str) -> None:
    for prefix in prefixes:
        for old in storage.list_files(prefix):
            storage.delete(old)

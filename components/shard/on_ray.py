"""The shard stage on Ray, for any input size: nothing whose size grows with the number of records lives in the
driver, and nothing a task needs lives only in the object store.

1. Sort, through storage (`<output>/_work/`), as a range-partitioned shuffle of Ray tasks:
   - scatter: one task per kept part file reads it, checks every row and gives it its split and rank
     (`rows.read_part`), and writes its rows of each rank range to `_work/sort/p-<range>/<part>.parquet`;
   - sort: one task per rank range gathers its files (in name order), sorts them by (rank, key) and writes
     `_work/sorted/part-<range>.parquet`, returning only its row counts.
   The ranges are fixed by the input size alone (`sort_boundaries`; ranks are uniform hashes), so the order is
   the same for any number of nodes or tasks.
2. The sorted rows are cut into slots of `samples_per_shard` rows by rank; each slot goes to a Ray task
   (`writer.write_slot`) with the names and row ranges of the sorted files that hold it: it reads them, encodes
   /resizes the images, writes the tar(s), uploads them and returns its shard records. The driver keeps one
   record per shard and a running sum of the sample digests.
3. A trained tokenizer is trained in a Ray task that reads the first `tokenizer_sample` training captions of
   that order from the sorted files.

Why Ray tasks and not Ray Data's `sort` here: Ray Data keeps the sorted blocks only in the object store. When a
node is lost, a block that lived there must be rebuilt by lineage reconstruction of Ray Data's own tasks (read
-> SortShuffleMap -> SortShuffleReduce, whose reduce fetches its inputs with a `ray.get` inside the task), and
on a 3-node test cluster that chain sometimes never finished: the stage hung (issue 19). Here every task's
inputs and outputs are files with fixed names, so a task lost with its node is simply run again by Ray (its
retry rewrites the same files) and a writer never needs an object that lived on another node.
"""

from __future__ import annotations

import bisect
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from typing import Any

import numpy as np

from components.common import storage
from components.common.progress import Progress
from components.common.ray_runtime import ray_session, spread_tasks, storage_env
from components.common.shuffle import clear, gather, scatter, write_table
from components.shard.config import ShardConfig
from components.shard.rows import SORT_KEY, SPLIT_SPAN, read_part, slots, split_counts
from components.shard.writer import SlotLog, write_slot

PARTITION_BYTES = 256 * 2**20  # input bytes per rank range of the sort (one sort task holds about this much)
ROW_GROUP_BYTES = 32 * 2**20  # bytes per row group of a sorted file: a writer reads its rows' groups only
WORK_DIR = "_work"  # the sort's files under the output (removed once every slot is written)


def sort_boundaries(input_bytes: int, val_fraction: float) -> list[int]:
    """Range boundaries of the sort's partitions, about PARTITION_BYTES of input each: the ranks are uniform
    hashes, so evenly spaced boundaries balance the partitions without a sampling pass; no partition mixes
    the splits."""
    partitions = max(1, -(-input_bytes // PARTITION_BYTES))
    n_train = max(1, round(partitions * (1 - val_fraction)))
    n_val = max(1, round(partitions * val_fraction)) if val_fraction > 0 else 1
    return ([i * SPLIT_SPAN // n_train for i in range(1, n_train)] + [SPLIT_SPAN]
            + [SPLIT_SPAN + i * SPLIT_SPAN // n_val for i in range(1, n_val)])


def _user_error(exc: BaseException) -> BaseException:
    """The ValueError a task raised, from under Ray's wrappers (so callers see the record and the rule)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, ValueError) and type(seen).__module__ == "builtins":
            return seen
        cause = getattr(seen, "cause", None) if hasattr(seen, "as_instanceof_cause") else None
        seen = cause or seen.__cause__ or seen.__context__
    return exc


def _remove(work: str) -> None:
    """Delete the sort's files (and, on a local disk, their folders)."""
    clear(work)
    if not storage.is_s3(work):
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- the tasks (run on any node)

def _scatter(index: int, uri: str, boundaries: list[int], val_fraction: float, seed: int, sort_dir: str,
             env: dict[str, str]) -> Any:
    """Kept part `index` -> its checked rows, by rank range, in `<sort_dir>/p-<range>/<index>.parquet`; its
    schema."""
    os.environ.update(env)
    table = read_part(uri, val_fraction, seed)
    ranges = np.searchsorted(np.asarray(boundaries, np.int64), table.column("rank").to_numpy(), side="right")
    scatter(table, ranges, sort_dir, f"{index:06d}")
    return table.schema


def _sort_range(p: int, sort_dir: str, sorted_uri: str, schema: Any, env: dict[str, str]) -> dict:
    """Rank range `p`: its scattered rows, sorted by (rank, key), -> `sorted_uri`; {"uri", "rows", "train"}."""
    import pyarrow.compute as pc

    os.environ.update(env)
    table = gather(sort_dir, p, schema)
    if not table.num_rows:
        return {"uri": sorted_uri, "rows": 0, "train": 0}
    table = table.sort_by([(k, "ascending") for k in SORT_KEY])
    rows_per_group = max(1, int(table.num_rows * ROW_GROUP_BYTES / max(table.nbytes, 1)))
    write_table(sorted_uri, table, row_group_size=rows_per_group)
    train = pc.sum(pc.equal(table.column("split"), "train")).as_py() or 0
    return {"uri": sorted_uri, "rows": table.num_rows, "train": train}


def read_rows(uri: str, start: int, end: int, columns: list[str] | None = None) -> Any:
    """Rows [start, end) of a sorted file, reading only the row groups that hold them."""
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_filesystem(uri)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        groups, first, at = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if at < end and at + n > start:
                groups.append(g)
                first = at if first is None else first
            at += n
        table = pf.read_row_groups(groups, columns=columns)
    return table.slice(0 if first is None else start - first, end - start)  # first: None for an empty range


def _write(job: dict, env: dict[str, str]) -> dict:
    import ray

    os.environ.update(env)
    tables = [read_rows(uri, s, e) for uri, s, e in job["parts"]]
    result = write_slot(job["split"], job["slot"], tables, job["cfg"], job["output_uri"], job["filtered_dir"])
    return {**result, "node": ray.get_runtime_context().get_node_id()}


def _train_tokenizer(vocab_size: int, parts: list[tuple[str, int, int]], env: dict[str, str]) -> str:
    from clip_model.tokenizer import ClipTokenizer

    os.environ.update(env)
    captions = (c for uri, s, e in parts for c in read_rows(uri, s, e, ["caption"]).column("caption").to_pylist())
    return ClipTokenizer.train(captions, vocab_size=vocab_size).to_str()


# --------------------------------------------------------------------------- the driver

class _Sorted:
    """Global row ranks -> the sorted files and row ranges that hold them (per file, not per row)."""

    def __init__(self, files: list[tuple[str, int]], train: int):
        self.files = [(uri, n) for uri, n in files if n]
        self.train = train  # rows of the training split (they come first)
        self.starts = [0]
        for _, n in self.files:
            self.starts.append(self.starts[-1] + n)

    @property
    def rows(self) -> int:
        return self.starts[-1]

    def between(self, lo: int, hi: int) -> list[tuple[str, int, int]]:
        out = []
        f = bisect.bisect_right(self.starts, lo) - 1
        while lo < hi:
            uri, n = self.files[f]
            take_from = lo - self.starts[f]
            take_to = min(n, take_from + hi - lo)
            out.append((uri, take_from, take_to))
            lo += take_to - take_from
            f += 1
        return out


def _run_tasks(fn: Callable, calls: Iterable[tuple], on_result: Callable[[Any], None]) -> None:
    """`fn(*args)` for every args of `calls` as Ray tasks (`spread_tasks`), each result handed to `on_result` as
    it comes; a failure stops the other tasks (a completed slot's record stays valid) and raises the task's own
    error, which names the record."""
    try:
        with closing(spread_tasks(fn, calls)) as results:
            for result in results:
                on_result(result)
    except Exception as exc:  # noqa: BLE001 - unwrapped from Ray's task error when it is one
        user = _user_error(exc)
        if user is exc:
            raise
        raise user from exc


def _sort(files: list[str], input_bytes: int, cfg: ShardConfig, work: str, env: dict[str, str]) -> _Sorted:
    """Scatter every kept part by rank range, then sort every range into `<work>/sorted/`."""
    import pyarrow as pa

    sort_dir, sorted_dir = storage.join(work, "sort"), storage.join(work, "sorted")
    _remove(work)  # an earlier, interrupted run's files: its ranges may differ
    boundaries = sort_boundaries(input_bytes, cfg.val_fraction)
    schemas: list = []
    progress = Progress(len(files), "parts", label="shard sort")

    def scattered(schema: Any) -> None:
        if schema not in schemas:  # one per distinct schema (parts usually share theirs)
            schemas.append(schema)
        progress.update(1)

    _run_tasks(_scatter, ((i, uri, boundaries, cfg.val_fraction, cfg.seed, sort_dir, env)
                          for i, uri in enumerate(files)), scattered)
    progress.close()
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    ranges = [storage.join(sorted_dir, f"part-{p:05d}.parquet") for p in range(len(boundaries) + 1)]
    counts: dict[str, dict] = {}
    _run_tasks(_sort_range, ((p, sort_dir, uri, schema, env) for p, uri in enumerate(ranges)),
               lambda r: counts.__setitem__(r["uri"], r))
    clear(sort_dir)
    return _Sorted([(uri, counts[uri]["rows"]) for uri in ranges], sum(r["train"] for r in counts.values()))


def _jobs(rows: _Sorted, counts: dict[str, int], cfg: ShardConfig, output_uri: str, filtered_dir: str,
          env: dict[str, str]) -> Iterator[tuple]:
    for split, slot, lo, hi in slots(counts, cfg.samples_per_shard):
        yield ({"split": split, "slot": slot, "parts": rows.between(lo, hi), "cfg": cfg, "output_uri": output_uri,
                "filtered_dir": filtered_dir}, env)


def write_on_ray(files: list[str], input_bytes: int, cfg: ShardConfig, output_uri: str, filtered_dir: str,
                 tokenizer: str | None) -> tuple[list[dict], str]:
    """Sort the kept rows and write every slot on Ray (joins RAY_ADDRESS / a running Ray, else starts one of
    `cfg.num_cpus` CPUs) -> (the writers' records in slot order, the tokenizer.json text: `tokenizer` when
    given, else one trained on the first `tokenizer_sample` training rows)."""
    import ray

    env = storage_env()
    work = storage.join(output_uri, WORK_DIR)
    with ray_session(num_cpus=cfg.num_cpus, log_to_driver=False):
        rows = _sort(files, input_bytes, cfg, work, env)
        counts = split_counts(rows.rows, rows.train, filtered_dir, cfg.val_fraction)
        if tokenizer is None:
            sample = rows.between(0, min(counts["train"], cfg.tokenizer_sample))
            tokenizer = ray.get(ray.remote(num_cpus=1, max_retries=3)(_train_tokenizer).remote(cfg.vocab_size,
                                                                                                 sample, env))
        log = SlotLog(rows.rows, cfg)
        _run_tasks(_write, _jobs(rows, counts, cfg, output_uri, filtered_dir, env), log.add)
        results = log.close()
    _remove(work)
    return results, tokenizer

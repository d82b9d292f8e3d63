"""The shard stage on Ray, for any input size: nothing whose size grows with the number of records lives in the
driver.

1. Ray Data reads the kept parts, checks every row and gives it its split and rank (`rows.prepare`), and sorts
   by (rank, key): a distributed sort, so the order is the same for any number of nodes and blocks.
2. The sorted blocks are cut into slots of `samples_per_shard` rows by rank. Ray Data has no operator for
   "rows N..M of a sorted dataset", so each slot goes to a Ray task (`writer.write_slot`) with the block
   slices that hold it: it encodes/resizes the images, writes the tar(s), uploads them and returns its
   shard records. The driver keeps one record per shard and a running sum of the sample digests.
3. A trained tokenizer is trained in a Ray task on the first `tokenizer_sample` training rows of that order.
"""

from __future__ import annotations

import bisect
import logging
import os
from typing import Any

from components.common import storage
from components.common.ray_runtime import ray_session, storage_env
from components.shard.config import ShardConfig
from components.shard.rows import SORT_KEY, SPLIT_SPAN, prepare, slots, split_counts
from components.shard.writer import SlotLog, write_slot

PARTITION_BYTES = 256 * 2**20  # input bytes per partition of the sort


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
    """The ValueError a UDF raised, from under Ray's wrappers (so callers see the record and the rule)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, ValueError) and type(seen).__module__ == "builtins":
            return seen
        cause = getattr(seen, "cause", None) if hasattr(seen, "as_instanceof_cause") else None
        seen = cause or seen.__cause__ or seen.__context__
    return exc


def _sorted_blocks(files: list[str], input_bytes: int, cfg: ShardConfig) -> tuple[Any, list[tuple[Any, int, int]]]:
    """The kept rows sorted by (rank, key), materialized in the object store -> (dataset, [(block ref,
    start, end)]); the dataset must stay referenced while the blocks are used."""
    import ray

    fs, _ = storage.pyarrow_filesystem(files[0])
    paths = [storage.pyarrow_filesystem(f)[1] for f in files]
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our Progress reports the shards
    ctx.raise_original_map_exception = True  # a bad row's ValueError, not Ray Data's wrapper of it
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True)
        ds = ds.map_batches(prepare, batch_format="pyarrow", fn_kwargs={"val_fraction": cfg.val_fraction,
                                                                         "seed": cfg.seed})
        ds = ds.sort(SORT_KEY, boundaries=sort_boundaries(input_bytes, cfg.val_fraction)).materialize()
    except Exception as exc:  # noqa: BLE001 - Ray Data wraps the UDF's error: raise the record's own
        raise _user_error(exc) from exc
    blocks = []
    for bundle in ds.iter_internal_ref_bundles():
        for entry, piece in zip(bundle.blocks, bundle.slices):
            start, end = (piece.start_offset, piece.end_offset) if piece else (0, entry.metadata.num_rows)
            if end > start:
                blocks.append((entry.ref, start, end))
    return ds, blocks


def _arrow(block: Any, start: int, end: int) -> Any:
    from ray.data.block import BlockAccessor

    return BlockAccessor.for_block(block).to_arrow().slice(start, end - start)


def _count_train(block: Any, start: int, end: int) -> int:
    split = _arrow(block, start, end).column("split").to_pylist()
    return bisect.bisect_right(split, "train")  # sorted: train rows first


def _captions(block: Any, start: int, end: int) -> list[str]:
    return _arrow(block, start, end).column("caption").to_pylist()


def _train_tokenizer(vocab_size: int, *caption_lists: list[str]) -> str:
    from clip_model.tokenizer import ClipTokenizer

    return ClipTokenizer.train((c for captions in caption_lists for c in captions), vocab_size=vocab_size).to_str()


def _write(job: dict, env: dict[str, str], *blocks: Any) -> dict:
    import ray

    os.environ.update(env)
    tables = [_arrow(b, s, e) for b, (s, e) in zip(blocks, job["ranges"])]
    result = write_slot(job["split"], job["slot"], tables, job["cfg"], job["output_uri"], job["filtered_dir"])
    return {**result, "node": ray.get_runtime_context().get_node_id()}


class _Slices:
    """Global row ranks -> the block slices that hold them (per block, not per row)."""

    def __init__(self, blocks: list[tuple[Any, int, int]]):
        self.blocks = blocks
        self.starts = [0]
        for _, s, e in blocks:
            self.starts.append(self.starts[-1] + e - s)

    @property
    def rows(self) -> int:
        return self.starts[-1]

    def between(self, lo: int, hi: int) -> list[tuple[Any, int, int]]:
        out = []
        b = bisect.bisect_right(self.starts, lo) - 1
        while lo < hi:
            ref, s, e = self.blocks[b]
            take_from = s + lo - self.starts[b]
            take_to = min(e, take_from + hi - lo)
            out.append((ref, take_from, take_to))
            lo += take_to - take_from
            b += 1
        return out


def _jobs(slices: _Slices, counts: dict[str, int], cfg: ShardConfig, output_uri: str, filtered_dir: str):
    for split, slot, lo, hi in slots(counts, cfg.samples_per_shard):
        parts = slices.between(lo, hi)
        yield ({"split": split, "slot": slot, "ranges": [(s, e) for _, s, e in parts], "cfg": cfg,
                "output_uri": output_uri, "filtered_dir": filtered_dir}, [ref for ref, _, _ in parts])


def _run_writers(jobs, log: SlotLog) -> list[dict]:
    """Run the writer tasks, a bounded number in flight, spread over the nodes; one result per slot."""
    import ray

    remote = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_write)
    env = storage_env()
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: list = []

    def collect(n: int) -> None:
        nonlocal pending
        done, pending = ray.wait(pending, num_returns=n)
        for ref in done:
            try:
                result = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a writer's own error names the record
                raise _user_error(exc) from exc
            log.add(result)

    try:
        for job, refs in jobs:
            pending.append(remote.remote(job, env, *refs))
            if len(pending) >= window:
                collect(1)
        while pending:
            collect(1)
    except BaseException:  # the run fails: stop its other writers (a completed slot's record stays valid)
        for ref in pending:
            ray.cancel(ref, force=True)
        ray.wait(pending, num_returns=len(pending), timeout=60)
        raise
    return log.close()


def write_on_ray(files: list[str], input_bytes: int, cfg: ShardConfig, output_uri: str, filtered_dir: str,
                 tokenizer: str | None) -> tuple[list[dict], str]:
    """Sort the kept rows and write every slot on Ray (joins RAY_ADDRESS / a running Ray, else starts one of
    `cfg.num_cpus` CPUs) -> (the writers' records in slot order, the tokenizer.json text: `tokenizer` when
    given, else one trained on the first `tokenizer_sample` training rows)."""
    import ray

    with ray_session(num_cpus=cfg.num_cpus, log_to_driver=False):
        ds, blocks = _sorted_blocks(files, input_bytes, cfg)
        slices = _Slices(blocks)
        counts = split_counts(slices.rows, sum(ray.get([ray.remote(_count_train).remote(*b) for b in blocks])),
                              filtered_dir, cfg.val_fraction)
        if tokenizer is None:
            parts = [ray.remote(_captions).remote(ref, s, e)
                     for ref, s, e in slices.between(0, min(counts["train"], cfg.tokenizer_sample))]
            tokenizer = ray.get(ray.remote(num_cpus=1)(_train_tokenizer).remote(cfg.vocab_size, *parts))
        results = _run_writers(_jobs(slices, counts, cfg, output_uri, filtered_dir), SlotLog(slices.rows, cfg))
        del ds, blocks, slices
    return results, tokenizer

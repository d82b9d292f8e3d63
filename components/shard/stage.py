"""Shard stage: the filter stage's kept pairs -> webdataset tars + tokenizer + manifest, on Ray.

Input (local or s3://): ``<filtered_dir>/kept/*.parquet`` with columns key, source_uri, sha256,
phash, caption, width, height, language, image (encoded bytes), and ``<filtered_dir>/stats.json``.

Output (local or s3://): ``train-000000.tar`` ..., ``validation-000000.tar`` ..., ``tokenizer.json``
and, written LAST, ``manifest.json`` (format in docs/interfaces.md). Each sample is ``KEY.jpg``
(JPEG; training images with their shorter side brought down to ``train_shorter_side``, about 1.15x the
training resolution; every image's longer side <= ``image_max_side`` when set), ``KEY.txt`` (caption),
``KEY.json`` (metadata).

How it runs (nothing whose size grows with the number of records lives in the driver):
1. Ray Data reads the kept parts, checks every row and gives it its split (a hash of the key) and its
   rank in the sample order (split, then a seeded hash of the key), and sorts by (rank, key): a distributed
   sort, so the order is the same for any number of nodes and blocks.
2. The sorted blocks are cut into slots of `samples_per_shard` rows by rank. Ray Data has no operator for
   "rows N..M of a sorted dataset", so each slot goes to a Ray task (`writer.write_slot`) with the block
   slices that hold it: it encodes/resizes the images, writes the tar(s), uploads them and returns its
   shard records. The driver keeps one record per shard and a running sum of the sample digests.
3. The tokenizer (unless given) is trained in a Ray task on the first `tokenizer_sample` training rows of
   that order: a bounded sample, the same for every run on the same input.
4. The manifest is assembled from the writers' records and written last.

Guarantees:
- deterministic: same input + config -> byte-identical shards (fixed tar mtime/owner, an order by seeded
  key hash, split by a hash of the key) and the same manifest, for any number of nodes or writers;
- content hash = the dataset's identity, from the samples alone (split, image bytes, caption): the same for
  the same data sharded anywhere, any time, in any shard size (`content_hash`);
- resumable and idempotent: a slot whose tars a previous run completed and recorded (and that are present
  with that size and sha256) is not written again; a tar already present with the same size and sha256 is
  not uploaded again; a rerun after a crash gives the same bytes as a run without one;
- crash-safe: an existing manifest is removed before anything is written and the new one is written
  only after every shard and the tokenizer are in place, so no manifest ever points at partial data.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import re
import tempfile
import time
from datetime import datetime, timezone
from typing import Any

from components.common import config, storage
from components.common.dataset import FORMAT, read_tokenizer_json
from components.common.progress import Progress
from components.common.ray_runtime import ray_session, storage_env
from components.shard.config import ShardConfig
from components.shard.writer import (DIGEST_MODULUS, DONE_DIR, digest_sum, portable_source, put, sample_digest,
                                     write_slot)

__all__ = ["shard", "content_hash", "is_validation", "sample_digest", "portable_source", "SPLITS"]

SPLITS = ("train", "validation")  # sorted: the sort puts every training row before every validation row
REQUIRED_COLUMNS = ("key", "source_uri", "sha256", "phash", "caption", "width", "height", "language", "image")
SHARD_RE = re.compile(r"^(train|validation)-\d{6}(-\d{2})?\.tar$")
SORT_KEY = ["rank", "key"]  # rank: split, then the seeded order (`rank_of`); the key breaks (unlikely) ties
SPLIT_SPAN = 2**62  # ranks of the training split are in [0, SPLIT_SPAN), of the validation split above
PARTITION_BYTES = 256 * 2**20  # input bytes per partition of the sort


def is_validation(key: str, val_fraction: float) -> bool:
    """The split of a key: a hash of the key alone, so it never depends on order, seed or shard size."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h / 2.0**64 < val_fraction


def rank_of(key: str, split: str, seed: int) -> int:
    """A row's place in the sample order, a non-negative int64: the split in the top bits (training rows
    first), then a seeded hash of the key (a shuffle computed per row, uniform over [0, SPLIT_SPAN))."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{split}:{key}".encode("utf-8")).digest()[:8], "big") >> 2
    return SPLITS.index(split) * SPLIT_SPAN + h


def sort_boundaries(input_bytes: int, val_fraction: float) -> list[int]:
    """Range boundaries of the sort's partitions, about PARTITION_BYTES of input each: the ranks are uniform
    hashes, so evenly spaced boundaries balance the partitions without a sampling pass; no partition mixes
    the splits."""
    partitions = max(1, -(-input_bytes // PARTITION_BYTES))
    n_train = max(1, round(partitions * (1 - val_fraction)))
    n_val = max(1, round(partitions * val_fraction)) if val_fraction > 0 else 1
    return ([i * SPLIT_SPAN // n_train for i in range(1, n_train)] + [SPLIT_SPAN]
            + [SPLIT_SPAN + i * SPLIT_SPAN // n_val for i in range(1, n_val)])


def content_hash(sample_digests: list[str]) -> str:
    """The dataset's identity from its samples' digests (`sample_digest`): order-free, so it depends only on
    the samples (image bytes, captions, split), not on keys, shuffle, shard sizes, paths or time."""
    return combined_hash(digest_sum(sample_digests), len(sample_digests))


def combined_hash(total: int, count: int) -> str:
    """The content hash from the sum of the sample digests modulo 2^256 and the number of samples."""
    return hashlib.sha256(f"clip-wds-content/2\0{count}\0{total % DIGEST_MODULUS:064x}".encode()).hexdigest()


# --------------------------------------------------------------------------- 1. read, check, sort

def _check_key(key: Any, path: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{path}: key {key!r} must be a non-empty string")
    if "." in key or "/" in key or any(c.isspace() for c in key):
        raise ValueError(f"{path}: key {key!r} must not contain '.', '/' or whitespace "
                         "(webdataset splits member names at the first dot)")


def _prepare(batch: Any, val_fraction: float, seed: int) -> Any:
    """Ray Data UDF on a pyarrow batch of kept rows: every row checked, its split and order added."""
    import pyarrow as pa

    paths = batch.column("path").to_pylist() if "path" in batch.column_names else ["?"] * batch.num_rows
    missing = [c for c in REQUIRED_COLUMNS if c not in batch.column_names]
    if missing:
        raise ValueError(f"{paths[0] if paths else '?'}: missing columns {missing} "
                         f"(a kept part file needs {list(REQUIRED_COLUMNS)})")
    splits, ranks = [], []
    for key, caption, path in zip(batch.column("key").to_pylist(), batch.column("caption").to_pylist(), paths):
        _check_key(key, path)
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"{path}: key {key!r} has an empty caption")
        split = "validation" if is_validation(key, val_fraction) else "train"
        splits.append(split)
        ranks.append(rank_of(key, split, seed))
    out = batch.select(list(REQUIRED_COLUMNS)).append_column("path", pa.array(paths, pa.string()))
    return out.append_column("split", pa.array(splits, pa.string())).append_column("rank", pa.array(ranks, pa.int64()))


def _user_error(exc: BaseException) -> BaseException:
    """The ValueError a UDF raised, from under Ray's wrappers (so callers see the record and the rule)."""
    seen = exc
    while seen is not None:
        if isinstance(seen, ValueError) and type(seen).__module__ == "builtins":
            return seen
        cause = getattr(seen, "cause", None) if hasattr(seen, "as_instanceof_cause") else None
        seen = cause or seen.__cause__ or seen.__context__
    return exc


def _sorted_blocks(filtered_dir: str, cfg: ShardConfig) -> tuple[Any, list[tuple[Any, int, int]]]:
    """The kept rows sorted by (rank, key), materialized in the object store -> (dataset, [(block ref,
    start, end)]); the dataset must stay referenced while the blocks are used."""
    import ray

    kept = storage.join(filtered_dir, "kept")
    files = sorted(p for p in storage.list_files(kept) if p.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no kept/*.parquet part files in the filter output {filtered_dir}")
    fs, _ = storage.pyarrow_filesystem(files[0])
    paths = [storage.pyarrow_filesystem(f)[1] for f in files]
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our Progress reports the shards
    ctx.raise_original_map_exception = True  # a bad row's ValueError, not Ray Data's wrapper of it
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    boundaries = sort_boundaries(sum(storage.size(f) for f in files), cfg.val_fraction)
    try:
        ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True)
        ds = ds.map_batches(_prepare, batch_format="pyarrow", fn_kwargs={"val_fraction": cfg.val_fraction,
                                                                          "seed": cfg.seed})
        ds = ds.sort(SORT_KEY, boundaries=boundaries).materialize()
    except Exception as exc:  # noqa: BLE001 - Ray Data wraps the UDF's error: raise the record's own
        raise _user_error(exc) from exc
    blocks = []
    for bundle in ds.iter_internal_ref_bundles():
        for entry, piece in zip(bundle.blocks, bundle.slices):
            start, end = (piece.start_offset, piece.end_offset) if piece else (0, entry.metadata.num_rows)
            if end > start:
                blocks.append((entry.ref, start, end))
    return ds, blocks


# --------------------------------------------------------------------------- 2. writers, tokenizer

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
    base = 0
    for split in SPLITS:
        for slot, lo in enumerate(range(base, base + counts[split], cfg.samples_per_shard)):
            hi = min(lo + cfg.samples_per_shard, base + counts[split])
            parts = slices.between(lo, hi)
            yield ({"split": split, "slot": slot, "ranges": [(s, e) for _, s, e in parts], "cfg": cfg,
                    "output_uri": output_uri, "filtered_dir": filtered_dir}, [ref for ref, _, _ in parts])
        base += counts[split]


def _run_writers(jobs, total: int, cfg: ShardConfig) -> list[dict]:
    """Run the writer tasks, a bounded number in flight, spread over the nodes; one result per slot."""
    import ray

    remote = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_write)
    env = storage_env()
    window = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    progress = Progress(total, "samples", label="shard")
    results: list[dict] = []
    pending: list = []

    def collect(n: int) -> None:
        nonlocal pending
        done, pending = ray.wait(pending, num_returns=n)
        for ref in done:
            try:
                results.append(ray.get(ref))
            except Exception as exc:  # noqa: BLE001 - a writer's own error names the record
                raise _user_error(exc) from exc
            progress.update(results[-1]["samples"])
            if cfg.fail_after_slots is not None and len(results) >= cfg.fail_after_slots:
                raise RuntimeError(f"fail_after_slots={cfg.fail_after_slots}: the run stops after "
                                   f"{len(results)} written shard slots (a simulated crash)")

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
    progress.close()
    return sorted(results, key=lambda r: (SPLITS.index(r["split"]), r["slot"]))


def _tokenizer(slices: _Slices, n_train: int, cfg: ShardConfig, tmp: str) -> str:
    """The dataset's tokenizer.json as a local file: the one cfg names, else a BPE trained in a Ray task on
    the first `tokenizer_sample` training rows of the sample order."""
    import ray

    local = os.path.join(tmp, "tokenizer.json")
    if cfg.tokenizer_spec:
        text = read_tokenizer_json(cfg.tokenizer_spec)
    else:
        captions = ray.remote(_captions)
        parts = [captions.remote(ref, s, e) for ref, s, e in slices.between(0, min(n_train, cfg.tokenizer_sample))]
        text = ray.get(ray.remote(num_cpus=1)(_train_tokenizer).remote(cfg.vocab_size, *parts))
    with open(local, "w", encoding="utf-8") as f:
        f.write(text)
    return local


# --------------------------------------------------------------------------- 3. the manifest

def _splits(results: list[dict]) -> dict[str, dict]:
    out = {s: {"samples": 0, "shards": []} for s in SPLITS}
    last: dict | None = None
    for r in results:
        if last is not None and last["split"] == r["split"] and last["last_key"] == r["first_key"]:
            raise ValueError(f"duplicate key {r['first_key']!r} (in shard slots {last['slot']} and {r['slot']} "
                             f"of the {r['split']} split)")
        out[r["split"]]["samples"] += r["samples"]
        out[r["split"]]["shards"] += r["pieces"]
        last = r
    return out


def _remove_stale(output_uri: str, keep: set[str]) -> list[str]:
    """Delete direct children named like shards that this run did not write (an earlier, larger run's), and
    the writers' completion records."""
    removed = []
    for uri in storage.list_files(output_uri):
        rel = uri[len(output_uri.rstrip("/")) + 1:] if storage.is_s3(uri) else os.path.relpath(uri, output_uri)
        if SHARD_RE.match(rel) and rel not in keep:
            storage.delete(uri)
            removed.append(rel)
        elif rel.startswith(DONE_DIR + "/"):
            storage.delete(uri)
    return removed


def shard(filtered_dir: str, output_uri: str, cfg: ShardConfig | None = None) -> dict:
    """Turn the filter stage's kept pairs into webdataset shards, a tokenizer and a manifest.

    Returns the manifest as written to ``<output_uri>/manifest.json`` plus a ``run`` entry (not in the
    file) listing the files ``uploaded``, ``skipped`` (already present, same size and sha256) and
    ``removed`` (stale shards of an earlier, larger run), the writers' ``nodes`` and the elapsed ``seconds``.
    """
    cfg = cfg or ShardConfig()
    t0 = time.perf_counter()
    manifest_uri = storage.join(output_uri, "manifest.json")
    previous = None
    if storage.exists(manifest_uri):  # about to change the shards: never leave it pointing at them
        try:
            previous = storage.read_json(manifest_uri)
        except ValueError:
            previous = None
        storage.delete(manifest_uri)
    stats_uri = storage.join(filtered_dir, "stats.json")
    filter_stats = storage.read_json(stats_uri) if storage.exists(stats_uri) else {}

    import ray

    with ray_session(num_cpus=cfg.num_cpus, log_to_driver=False), tempfile.TemporaryDirectory(prefix="shard-") as tmp:
        ds, blocks = _sorted_blocks(filtered_dir, cfg)
        slices = _Slices(blocks)
        n_train = sum(ray.get([ray.remote(_count_train).remote(*b) for b in blocks]))
        counts = {"train": n_train, "validation": slices.rows - n_train}
        if not n_train:
            raise ValueError(f"{filtered_dir}: no training samples ({slices.rows} kept rows, "
                             f"val_fraction={cfg.val_fraction})")
        tok_local = _tokenizer(slices, n_train, cfg, tmp)
        results = _run_writers(_jobs(slices, counts, cfg, output_uri, filtered_dir), slices.rows, cfg)
        del ds, blocks, slices
        tok, tok_uploaded = put(tok_local, storage.join(output_uri, "tokenizer.json"), cfg.multipart_threshold)

    splits = _splits(results)
    uploaded = [n for r in results for n in r["uploaded"]] + (["tokenizer.json"] if tok_uploaded else [])
    skipped = [n for r in results for n in r["skipped"]] + ([] if tok_uploaded else ["tokenizer.json"])
    removed = _remove_stale(output_uri, {d["uri"].rsplit("/", 1)[1] for s in SPLITS for d in splits[s]["shards"]})
    chash = combined_hash(sum(int(r["digest_sum"], 16) for r in results), sum(r["samples"] for r in results))
    created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if previous and previous.get("content_hash") == chash and previous.get("splits") == splits \
            and previous.get("created_at"):
        created_at = previous["created_at"]  # same shards: keep the manifest byte-identical
    manifest = {
        "format": FORMAT,
        "splits": splits,
        "tokenizer": tok["uri"],
        "tokenizer_sha256": tok["sha256"],
        "image_max_side": cfg.image_max_side,
        "train_shorter_side": cfg.train_shorter_side,
        "filter_stats": filter_stats,
        "source": filtered_dir,
        "config": config.to_dict(cfg),
        "content_hash": chash,
        "created_at": created_at,
    }
    storage.write_json(manifest_uri, manifest)  # LAST
    seconds = time.perf_counter() - t0
    total = sum(splits[s]["samples"] for s in SPLITS)
    nodes = sorted({r["node"] for r in results})
    print(f"[shard] {total} samples -> {sum(len(splits[s]['shards']) for s in SPLITS)} shards at {output_uri} "
          f"in {seconds:.1f}s ({total / max(seconds, 1e-9):.1f} samples/s) by writers on {len(nodes)} node(s); "
          f"uploaded {len(uploaded)}, skipped {len(skipped)} unchanged, removed {len(removed)} stale", flush=True)
    return dict(manifest, run={"uploaded": sorted(uploaded), "skipped": sorted(skipped), "removed": sorted(removed),
                               "nodes": nodes, "seconds": seconds})

"""Shard stage: the filter stage's kept pairs -> webdataset tars + tokenizer + manifest, on Ray or, for small
inputs, in this process.

Input (local or s3://): ``<filtered_dir>/kept/*.parquet`` with columns key, source_uri, sha256,
phash, caption, width, height, language, image (encoded bytes), and ``<filtered_dir>/stats.json``.

Output (local or s3://): ``train-000000.tar`` ..., ``validation-000000.tar`` ..., ``tokenizer.json``
and, written LAST, ``manifest.json`` (format in docs/interfaces.md). Each sample is ``KEY.jpg``
(JPEG; training images with their shorter side brought down to ``train_shorter_side``, about 1.15x the
training resolution; every image's longer side <= ``image_max_side`` when set), ``KEY.txt`` (caption),
``KEY.json`` (metadata).

How it runs, by `cfg.runner` (the two ways write the same bytes):
- on Ray (`on_ray.py`), for any size: Ray tasks read, check and sort the rows through parquet files under
  `<output>/_work/`, Ray writer tasks write one slot of `samples_per_shard` rows each, and nothing whose size
  grows with the number of records lives in the driver;
- in this process (`in_process.py`), for small inputs only (kept parts of at most `in_process_max_bytes`): the
  same row rules, sort order and slot writer, run serially, without Ray's fixed cost of 20-30 s a call.
Either way every row gets its split (a hash of the key) and its rank in the sample order (split, then a seeded
hash of the key) (`rows.py`), a trained tokenizer learns from the first `tokenizer_sample` training rows of that
order (a bounded sample, the same for every run on the same input), and the manifest is assembled from the
writers' records and written last.

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

import hashlib
import os
import re
import tempfile
import time
from datetime import datetime, timezone

from components.common import config, storage
from components.common.dataset import FORMAT, read_tokenizer_json
from components.shard.config import EXECUTION_FIELDS, ShardConfig
from components.shard.in_process import NODE, write_in_process
from components.shard.rows import SPLITS, is_validation, rank_of
from components.shard.writer import DIGEST_MODULUS, DONE_DIR, digest_sum, portable_source, put, sample_digest

__all__ = ["shard", "content_hash", "is_validation", "rank_of", "sample_digest", "portable_source", "SPLITS"]

SHARD_RE = re.compile(r"^(train|validation)-\d{6}(-\d{2})?\.tar$")


def content_hash(sample_digests: list[str]) -> str:
    """The dataset's identity from its samples' digests (`sample_digest`): order-free, so it depends only on
    the samples (image bytes, captions, split), not on keys, shuffle, shard sizes, paths or time."""
    return combined_hash(digest_sum(sample_digests), len(sample_digests))


def combined_hash(total: int, count: int) -> str:
    """The content hash from the sum of the sample digests modulo 2^256 and the number of samples."""
    return hashlib.sha256(f"clip-wds-content/2\0{count}\0{total % DIGEST_MODULUS:064x}".encode()).hexdigest()


def kept_parts(filtered_dir: str) -> list[str]:
    """The filter output's kept/*.parquet part files, sorted."""
    files = sorted(p for p in storage.list_files(storage.join(filtered_dir, "kept")) if p.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no kept/*.parquet part files in the filter output {filtered_dir}")
    return files


def runs_in_process(cfg: ShardConfig, input_bytes: int) -> bool:
    """Whether the stage runs in this process (else on Ray): runner local, or auto with kept parts of at most
    `in_process_max_bytes`; runner local on a larger input is refused (it would hold every row here)."""
    if cfg.runner == "ray":
        return False
    small = input_bytes <= cfg.in_process_max_bytes
    if cfg.runner == "local" and not small:
        raise ValueError(f"runner='local': the kept parts hold {input_bytes} bytes, over in_process_max_bytes="
                         f"{cfg.in_process_max_bytes}, and the in-process path holds every row in memory; "
                         "use runner 'ray' or 'auto'")
    return small


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
    ``removed`` (stale shards of an earlier, larger run), the writers' ``nodes`` (Ray node ids, or ["in-process"])
    and the elapsed ``seconds``.
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

    files = kept_parts(filtered_dir)
    input_bytes = sum(storage.size(f) for f in files)
    given = read_tokenizer_json(cfg.tokenizer_spec) if cfg.tokenizer_spec else None
    if runs_in_process(cfg, input_bytes):
        results, tokenizer = write_in_process(files, cfg, output_uri, filtered_dir, given)
    else:
        from components.shard.on_ray import write_on_ray

        results, tokenizer = write_on_ray(files, input_bytes, cfg, output_uri, filtered_dir, given)
    with tempfile.TemporaryDirectory(prefix="shard-") as tmp:
        tok_local = os.path.join(tmp, "tokenizer.json")
        with open(tok_local, "w", encoding="utf-8") as f:
            f.write(tokenizer)
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
        "config": {k: v for k, v in config.to_dict(cfg).items() if k not in EXECUTION_FIELDS},
        "content_hash": chash,
        "created_at": created_at,
    }
    storage.write_json(manifest_uri, manifest)  # LAST
    seconds = time.perf_counter() - t0
    total = sum(splits[s]["samples"] for s in SPLITS)
    nodes = sorted({r["node"] for r in results})
    where = "in this process" if nodes == [NODE] else f"by writers on {len(nodes)} Ray node(s)"
    print(f"[shard] {total} samples -> {sum(len(splits[s]['shards']) for s in SPLITS)} shards at {output_uri} "
          f"in {seconds:.1f}s ({total / max(seconds, 1e-9):.1f} samples/s) {where}; "
          f"uploaded {len(uploaded)}, skipped {len(skipped)} unchanged, removed {len(removed)} stale", flush=True)
    return dict(manifest, run={"uploaded": sorted(uploaded), "skipped": sorted(skipped), "removed": sorted(removed),
                               "nodes": nodes, "seconds": seconds})

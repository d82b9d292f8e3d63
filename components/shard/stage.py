"""Shard stage: the filter stage's kept pairs -> webdataset tars + tokenizer + manifest.

Input (local or s3://): ``<filtered_dir>/kept/*.parquet`` with columns key, source_uri, sha256,
phash, caption, width, height, language, image (encoded bytes), and ``<filtered_dir>/stats.json``.

Output (local or s3://): ``train-000000.tar`` ..., ``validation-000000.tar`` ..., ``tokenizer.json``
and, written LAST, ``manifest.json`` (format in docs/interfaces.md). Each sample is ``KEY.jpg``
(JPEG; training images with their shorter side brought down to ``train_shorter_side``, about 1.15x the
training resolution; every image's longer side <= ``image_max_side`` when set), ``KEY.txt`` (caption),
``KEY.json`` (metadata).

Guarantees:
- deterministic: same input + config -> byte-identical shards (fixed tar mtime/owner, sorted keys,
  seeded shuffle, split by a hash of the key) and the same manifest;
- content hash = the dataset's identity: a hash of the samples alone (split, image bytes, caption), the
  same for the same data sharded anywhere, any time, in any shard size (`content_hash`);
- idempotent: a shard already at the destination with the same size and sha256 is not uploaded again;
- crash-safe: an existing manifest is removed before anything is written and the new one is written
  only after every shard and the tokenizer are in place, so no manifest ever points at partial data.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import tarfile
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from PIL import Image

from clip_model.image_ops import to_rgb
from components.common import config, storage
from components.common.dataset import FORMAT, read_tokenizer_json
from components.common.progress import Progress
from components.shard.config import ShardConfig

SPLITS = ("train", "validation")
REQUIRED_COLUMNS = ("key", "source_uri", "sha256", "phash", "caption", "width", "height", "language", "image")
SHARD_RE = re.compile(r"^(train|validation)-\d{6}\.tar$")
TAR_MTIME = 0  # fixed member mtime -> reproducible tars
# --------------------------------------------------------------------------- input

def is_validation(key: str, val_fraction: float) -> bool:
    """The split of a key: a hash of the key alone, so it never depends on order, seed or shard size."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    return h / 2.0**64 < val_fraction


@dataclass
class _Rows:
    """Every kept row: small columns as Python dicts; image bytes in Arrow arrays memory-mapped from
    uncompressed IPC files on local disk, so RAM stays bounded however large the input is."""
    meta: list[dict]  # one dict per row (no image)
    where: list[tuple[int, int]]  # (chunk index, row within the chunk)
    chunks: list[Any]  # image BinaryArrays


def _check_key(key: Any, path: str, row: int) -> str:
    if not isinstance(key, str) or not key:
        raise ValueError(f"{path} row {row}: key {key!r} must be a non-empty string")
    if "." in key or "/" in key or any(c.isspace() for c in key):
        raise ValueError(f"{path} row {row}: key {key!r} must not contain '.', '/' or whitespace "
                         "(webdataset splits member names at the first dot)")
    return key


def _read_part(path: str, name: str, spill: str, rows: _Rows, seen: dict[str, str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise ValueError(f"{name}: missing columns {missing} (a kept part file needs {list(REQUIRED_COLUMNS)})")
    small = pf.read(columns=[c for c in REQUIRED_COLUMNS if c != "image"]).to_pylist()
    for r, m in enumerate(small):
        key = _check_key(m["key"], name, r)
        if key in seen:
            raise ValueError(f"{name} row {r}: duplicate key {key!r} (also in {seen[key]})")
        seen[key] = name
        if not isinstance(m["caption"], str) or not m["caption"].strip():
            raise ValueError(f"{name} row {r}: key {key!r} has an empty caption")
        rows.meta.append(m)
    with pa.OSFile(spill, "wb") as sink:
        with pa.ipc.new_file(sink, pa.schema([pf.schema_arrow.field("image")])) as writer:
            for batch in pf.iter_batches(batch_size=256, columns=["image"]):
                writer.write_batch(batch)
    reader = pa.ipc.open_file(pa.memory_map(spill, "r"))
    for i in range(reader.num_record_batches):
        chunk = reader.get_batch(i).column(0)
        rows.where += [(len(rows.chunks), r) for r in range(len(chunk))]
        rows.chunks.append(chunk)
    if len(rows.where) != len(rows.meta):
        raise ValueError(f"{name}: image column has a different number of rows than the other columns")


def _read_kept(filtered_dir: str, tmp: str) -> _Rows:
    """All kept rows of the filter output (remote part files are fetched one at a time)."""
    kept = storage.join(filtered_dir, "kept")
    files = sorted(p for p in storage.list_files(kept) if p.endswith(".parquet"))
    if not files:
        raise FileNotFoundError(f"no kept/*.parquet part files in the filter output {filtered_dir}")
    rows = _Rows([], [], [])
    seen: dict[str, str] = {}
    for t, uri in enumerate(files):
        with storage.local_copy(uri) as path:
            _read_part(path, uri, os.path.join(tmp, f"images-{t:06d}.arrow"), rows, seen)
    for m in rows.meta:
        m["source_uri"] = portable_source(str(m["source_uri"]), filtered_dir)
    return rows


# --------------------------------------------------------------------------- samples

def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def encode_image(data: bytes, quality: int, what: str, max_side: int | None = None,
                 shorter_side: int | None = None) -> tuple[bytes, int, int]:
    """-> (JPEG bytes, width, height). The image is brought down so that its shorter side is at most
    ``shorter_side`` and its longer side at most ``max_side`` (never enlarged). A JPEG already within
    both keeps its bytes (only its header is parsed: the filter stage fully decoded every kept image);
    others are decoded (JPEGs in draft mode, i.e. downscaled by the decoder), resized (bicubic) and
    re-encoded."""
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        scale = min([1.0] + [side / length for side, length in ((shorter_side, min(w, h)), (max_side, max(w, h)))
                             if side is not None])
        if scale == 1.0 and _is_jpeg(data) and img.mode in ("RGB", "L"):
            return data, w, h
        if scale < 1.0:
            w, h = max(1, round(w * scale)), max(1, round(h * scale))
            if img.format == "JPEG":
                img.draft("RGB", (w, h))
        img.load()
    except Exception as e:  # PIL raises many types; name the record
        raise ValueError(f"{what}: image bytes cannot be decoded ({type(e).__name__}: {e})") from e
    img = to_rgb(img)  # alpha over white, as the training transform does
    if img.size != (w, h):
        img = img.resize((w, h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=quality)
    return out.getvalue(), w, h


def _tar_size(nbytes: int) -> int:
    return tarfile.BLOCKSIZE + (nbytes + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE


def _tar_file_size(member_bytes: int) -> int:
    """Size of a finished tar: members + end-of-archive blocks, padded to tarfile's 10 KiB records."""
    return -(-(member_bytes + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _make_sample(rows: _Rows, i: int, cfg: ShardConfig, split: str) -> dict:
    m = rows.meta[i]
    c, r = rows.where[i]
    raw = rows.chunks[c][r].as_py()
    if not raw:
        raise ValueError(f"key {m['key']!r}: empty image bytes")
    shorter_side = cfg.train_shorter_side if split == "train" else None  # validation: for its own transform
    jpg, w, h = encode_image(raw, cfg.jpeg_quality, f"key {m['key']!r}", cfg.image_max_side, shorter_side)
    meta = {k: m[k] for k in ("key", "source_uri", "sha256", "phash", "width", "height", "language")}
    meta.update(caption=m["caption"], jpg_width=w, jpg_height=h)
    return {"__key__": m["key"], "jpg": jpg, "txt": m["caption"].encode("utf-8"),
            "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")}


# --------------------------------------------------------------------------- output

class _Uploader:
    """Uploads closed shards in a background thread (overlapping with encoding the next one),
    skipping those already present with the same size and sha256."""

    def __init__(self, output_uri: str, cfg: ShardConfig):
        self.output_uri, self.cfg = output_uri, cfg
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.futures: list[Future] = []
        self.uploaded: list[str] = []
        self.skipped: list[str] = []

    def submit(self, local: str, name: str) -> Future:
        fut = self.pool.submit(self._put, local, name)
        self.futures.append(fut)
        return fut

    def _put(self, local: str, name: str) -> dict:
        nbytes, digest = os.path.getsize(local), storage.sha256_file(local)
        uri = storage.join(self.output_uri, name)
        if storage.exists(uri) and storage.size(uri) == nbytes and storage.sha256(uri) == digest:
            self.skipped.append(name)
        else:
            storage.upload_file(local, uri, sha256=digest, multipart_threshold=self.cfg.multipart_threshold)
            self.uploaded.append(name)
        os.unlink(local)
        return {"uri": uri, "bytes": nbytes, "sha256": digest}

    def throttle(self, max_pending: int = 2) -> None:
        """Surface an upload failure early, and wait while more than ``max_pending`` finished shards
        are queued (a slow store must not fill the local disk with tars)."""
        for f in self.futures:
            if f.done() and f.exception() is not None:
                f.result()
        pending = [f for f in self.futures if not f.done()]
        for f in pending[:max(0, len(pending) - max_pending)]:
            f.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _write_split(split: str, order: list[int], rows: _Rows, cfg: ShardConfig, tmp: str,
                 uploader: _Uploader, progress, digests: list[str]) -> list[tuple[Future, int]]:
    """Write one split's shards (each sample's `sample_digest` appended to `digests`); returns (upload
    future, sample count) per shard."""
    from webdataset import TarWriter

    out: list[tuple[Future, int]] = []
    state: dict[str, Any] = {"writer": None, "count": 0, "bytes": 0, "path": None}

    def close() -> None:
        if state["writer"] is None:
            return
        state["writer"].close()
        name = f"{split}-{len(out):06d}.tar"
        out.append((uploader.submit(state["path"], name), state["count"]))
        uploader.throttle()
        state.update(writer=None, count=0, bytes=0)

    with ThreadPoolExecutor(max_workers=max(1, cfg.num_threads)) as pool:
        window = 4 * max(1, cfg.num_threads)
        pending = [pool.submit(_make_sample, rows, i, cfg, split) for i in order[:window]]
        nxt = len(pending)
        while pending:
            sample = pending.pop(0).result()
            if nxt < len(order):
                pending.append(pool.submit(_make_sample, rows, order[nxt], cfg, split))
                nxt += 1
            nbytes = sum(_tar_size(len(sample[k])) for k in ("jpg", "txt", "json"))
            if state["writer"] is not None and (state["count"] >= cfg.samples_per_shard
                                                or _tar_file_size(state["bytes"] + nbytes) > cfg.max_shard_bytes):
                close()
            if state["writer"] is None:
                state["path"] = os.path.join(tmp, f"{split}-{len(out):06d}.tar")
                state["writer"] = TarWriter(state["path"], user="clip", group="clip", mode=0o444,
                                            mtime=TAR_MTIME, encoder=False)
            state["writer"].write(sample)
            digests.append(sample_digest(split, sample["jpg"], sample["txt"].decode("utf-8")))
            state["count"] += 1
            state["bytes"] += nbytes
            progress.update(1)
        close()
    return out


def sample_digest(split: str, jpg: bytes, caption: str) -> str:
    """What one sample contributes to the content hash: its split, image bytes and caption."""
    h = hashlib.sha256(split.encode("ascii") + b"\0")
    h.update(hashlib.sha256(jpg).digest())
    h.update(caption.encode("utf-8"))
    return h.hexdigest()


def content_hash(sample_digests: list[str]) -> str:
    """The dataset's identity: the sorted per-sample digests (`sample_digest`), so it depends only on the
    samples (image bytes, captions, split), not on keys, shuffle, shard sizes, paths or time."""
    h = hashlib.sha256()
    for d in sorted(sample_digests):
        h.update(d.encode("ascii") + b"\n")
    return h.hexdigest()


def portable_source(source_uri: str, filtered_dir: str) -> str:
    """A record's source URI as stored in its sample JSON: one inside the filter output (the corpus the
    filter generated under its run's work area) relative to it, so reruns write identical samples."""
    root = filtered_dir.rstrip("/") + "/"
    return source_uri[len(root):] if source_uri.startswith(root) else source_uri


def shard(filtered_dir: str, output_uri: str, cfg: ShardConfig | None = None) -> dict:
    """Turn the filter stage's kept pairs into webdataset shards, a tokenizer and a manifest.

    Returns the manifest as written to ``<output_uri>/manifest.json`` plus a ``run`` entry (not in the
    file) listing the shards ``uploaded``, ``skipped`` (already present, same size and sha256) and
    ``removed`` (stale shards of an earlier, larger run), and the elapsed ``seconds``.
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

    with tempfile.TemporaryDirectory(prefix="shard-") as tmp:
        stats_uri = storage.join(filtered_dir, "stats.json")
        filter_stats = storage.read_json(stats_uri) if storage.exists(stats_uri) else {}
        rows = _read_kept(filtered_dir, tmp)
        by_split: dict[str, list[int]] = {s: [] for s in SPLITS}
        for i in sorted(range(len(rows.meta)), key=lambda i: rows.meta[i]["key"]):
            split = "validation" if is_validation(rows.meta[i]["key"], cfg.val_fraction) else "train"
            by_split[split].append(i)
        if not by_split["train"]:
            raise ValueError(f"{filtered_dir}: no training samples ({len(rows.meta)} kept rows, "
                             f"val_fraction={cfg.val_fraction})")
        for s in SPLITS:
            random.Random(f"{cfg.seed}:{s}").shuffle(by_split[s])

        # Tokenizer: the one cfg.tokenizer names (a checkpoint's, a preset, a file), or the starting
        # checkpoint's, else trained on the training captions in key order (independent of the shuffle).
        tok_local = os.path.join(tmp, "tokenizer.json")
        if cfg.tokenizer_spec:
            with open(tok_local, "w", encoding="utf-8") as f:
                f.write(read_tokenizer_json(cfg.tokenizer_spec))
        else:
            from clip_model.tokenizer import ClipTokenizer

            captions = [rows.meta[i]["caption"] for i in sorted(by_split["train"], key=lambda i: rows.meta[i]["key"])]
            ClipTokenizer.train(captions, vocab_size=cfg.vocab_size).save(tok_local)

        uploader = _Uploader(output_uri, cfg)
        progress = Progress(len(rows.meta), "samples", label="shard")
        try:
            digests: list[str] = []
            written = {s: _write_split(s, by_split[s], rows, cfg, tmp, uploader, progress, digests) for s in SPLITS}
            tok_future = uploader.submit(tok_local, "tokenizer.json")
            splits = {}
            for s in SPLITS:
                shards = [dict(fut.result(), samples=n) for fut, n in written[s]]
                shards = [{k: d[k] for k in ("uri", "samples", "bytes", "sha256")} for d in shards]
                splits[s] = {"samples": sum(d["samples"] for d in shards), "shards": shards}
            tok = tok_future.result()
        finally:
            uploader.close()
        progress.close()

    keep = {d["uri"].rsplit("/", 1)[1] for s in SPLITS for d in splits[s]["shards"]}
    removed = []
    for uri in storage.list_files(output_uri):
        rel = uri[len(output_uri.rstrip("/")) + 1:] if storage.is_s3(uri) else os.path.relpath(uri, output_uri)
        if SHARD_RE.match(rel) and rel not in keep:  # a direct child named like a shard
            storage.delete(uri)
            removed.append(rel)

    chash = content_hash(digests)
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
    print(f"[shard] {total} samples -> {sum(len(splits[s]['shards']) for s in SPLITS)} shards at {output_uri} "
          f"in {seconds:.1f}s ({total / max(seconds, 1e-9):.1f} samples/s); uploaded {len(uploader.uploaded)}, "
          f"skipped {len(uploader.skipped)} unchanged, removed {len(removed)} stale", flush=True)
    return dict(manifest, run={"uploaded": sorted(uploader.uploaded), "skipped": sorted(uploader.skipped),
                               "removed": sorted(removed), "seconds": seconds})

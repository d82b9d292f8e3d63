"""One shard writer: the rows of one shard slot (a range of the sorted kept rows) -> encoded samples ->
tar(s) -> upload -> its shard records. Runs as a Ray task on any node, or in the driver for small inputs
(`in_process.py`); nothing in it depends on where it runs, how many writers run, or in what order they finish,
so the shards are the same for any cluster.

A slot holds `samples_per_shard` rows (the last of a split fewer). Its tar is `{split}-{slot:06d}.tar`; when
the encoded samples would grow it past `max_shard_bytes`, the rest go to `{split}-{slot:06d}-01.tar`, `-02`...

Resumable: after its tars are uploaded the writer records them in `<output>/_done/{split}-{slot:06d}.json`
with a fingerprint of its input (every field of every sample it writes, and the settings that shape the
bytes). A rerun whose fingerprint matches, and whose tars are present with the recorded size and sha256,
is skipped without encoding anything.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
from typing import Any, Iterator

from PIL import Image

from clip_model.image_ops import to_rgb
from components.common import storage
from components.common.progress import Progress
from components.shard.config import ShardConfig
from components.shard.rows import SPLITS

TAR_MTIME = 0  # fixed member mtime -> reproducible tars
DONE_DIR = "_done"  # the writers' completion records under the output (removed once the manifest is written)
META_COLUMNS = ("key", "source_uri", "sha256", "phash", "width", "height", "language")
DIGEST_MODULUS = 2**256  # per-sample sha256 digests are summed modulo this (an order-free multiset hash)


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


def sample_digest(split: str, jpg: bytes, caption: str) -> str:
    """What one sample contributes to the content hash: its split, image bytes and caption."""
    h = hashlib.sha256(split.encode("ascii") + b"\0")
    h.update(hashlib.sha256(jpg).digest())
    h.update(caption.encode("utf-8"))
    return h.hexdigest()


def digest_sum(digests: Iterator[str] | list[str]) -> int:
    """The sum of sample digests modulo 2^256: partial sums of any grouping add up to the same total."""
    return sum(int(d, 16) for d in digests) % DIGEST_MODULUS


def _tar_size(nbytes: int) -> int:
    return tarfile.BLOCKSIZE + (nbytes + tarfile.BLOCKSIZE - 1) // tarfile.BLOCKSIZE * tarfile.BLOCKSIZE


def _tar_file_size(member_bytes: int) -> int:
    """Size of a finished tar: members + end-of-archive blocks, padded to tarfile's 10 KiB records."""
    return -(-(member_bytes + 2 * tarfile.BLOCKSIZE) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def piece_name(split: str, slot: int, piece: int) -> str:
    return f"{split}-{slot:06d}.tar" if piece == 0 else f"{split}-{slot:06d}-{piece:02d}.tar"


def put(local: str, uri: str, multipart_threshold: int | None = None) -> tuple[dict, bool]:
    """Upload a finished local file unless `uri` already holds the same bytes (size and sha256); removes the
    local file. -> ({"uri", "bytes", "sha256"}, uploaded?)."""
    nbytes, digest = os.path.getsize(local), storage.sha256_file(local)
    same = storage.exists(uri) and storage.size(uri) == nbytes and storage.sha256(uri) == digest
    if not same:
        storage.upload_file(local, uri, sha256=digest, multipart_threshold=multipart_threshold)
    os.unlink(local)
    return {"uri": uri, "bytes": nbytes, "sha256": digest}, not same


def portable_source(source_uri: str, filtered_dir: str) -> str:
    """A record's source URI as stored in its sample JSON: one inside the filter output (the corpus the
    filter generated under its run's work area) relative to it, so reruns write identical samples."""
    root = filtered_dir.rstrip("/") + "/"
    return source_uri[len(root):] if source_uri.startswith(root) else source_uri


class SlotRows:
    """The rows of one slot: the slices of the sorted blocks that hold them, read column-wise."""

    def __init__(self, tables: list[Any], filtered_dir: str):
        import pyarrow as pa

        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        self.n = table.num_rows
        self.cols = {c: table.column(c).to_pylist() for c in (*META_COLUMNS, "caption", "path")}
        self.cols["source_uri"] = [portable_source(str(s), filtered_dir) for s in self.cols["source_uri"]]
        self.images = table.column("image")

    def meta(self, i: int) -> dict:
        return {c: self.cols[c][i] for c in META_COLUMNS}

    def check_unique(self) -> None:
        keys, paths = self.cols["key"], self.cols["path"]
        for i in range(1, self.n):  # sorted by (rank, key): a duplicate key is adjacent
            if keys[i] == keys[i - 1]:
                raise ValueError(f"{paths[i]}: duplicate key {keys[i]!r} (also in {paths[i - 1]})")

    def fingerprint(self, split: str, slot: int, cfg: ShardConfig) -> str:
        """Everything that decides this slot's tars: the settings that shape the bytes and every row's fields
        and image bytes (hashing them costs far less than encoding them)."""
        h = hashlib.sha256(json.dumps({"split": split, "slot": slot, "quality": cfg.jpeg_quality,
                                       "max_side": cfg.image_max_side, "shorter": cfg.train_shorter_side,
                                       "max_bytes": cfg.max_shard_bytes}, sort_keys=True).encode())
        for i in range(self.n):
            h.update(json.dumps([self.cols["caption"][i], self.meta(i)], sort_keys=True, ensure_ascii=False).encode())
            h.update(hashlib.sha256(self.images[i].as_py() or b"").digest())
        return h.hexdigest()


def _sample(rows: SlotRows, i: int, split: str, cfg: ShardConfig) -> dict:
    key, raw = rows.cols["key"][i], rows.images[i].as_py()
    if not raw:
        raise ValueError(f"{rows.cols['path'][i]}: key {key!r} has empty image bytes")
    shorter_side = cfg.train_shorter_side if split == "train" else None  # validation: for its own transform
    jpg, w, h = encode_image(raw, cfg.jpeg_quality, f"key {key!r}", cfg.image_max_side, shorter_side)
    meta = dict(rows.meta(i), caption=rows.cols["caption"][i], jpg_width=w, jpg_height=h)
    return {"__key__": key, "jpg": jpg, "txt": rows.cols["caption"][i].encode("utf-8"),
            "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")}


def _verified(done: dict, fingerprint: str) -> bool:
    """A completion record of this very input whose tars are all present with their recorded size and sha256."""
    if done.get("fingerprint") != fingerprint:
        return False
    return all(storage.exists(p["uri"]) and storage.size(p["uri"]) == p["bytes"]
               and storage.sha256(p["uri"]) == p["sha256"] for p in done["pieces"])


class SlotLog:
    """The finished slots' records as the writers return them (in any order): the progress line, and the
    simulated crash of `fail_after_slots`."""

    def __init__(self, total: int, cfg: ShardConfig):
        self.results: list[dict] = []
        self.fail_after = cfg.fail_after_slots
        self.progress = Progress(total, "samples", label="shard")

    def add(self, result: dict) -> None:
        self.results.append(result)
        self.progress.update(result["samples"])
        if self.fail_after is not None and len(self.results) >= self.fail_after:
            raise RuntimeError(f"fail_after_slots={self.fail_after}: the run stops after {len(self.results)} "
                               "written shard slots (a simulated crash)")

    def close(self) -> list[dict]:
        """-> the records in slot order."""
        self.progress.close()
        return sorted(self.results, key=lambda r: (SPLITS.index(r["split"]), r["slot"]))


def write_slot(split: str, slot: int, tables: list[Any], cfg: ShardConfig, output_uri: str,
               filtered_dir: str) -> dict:
    """Write one slot's tar(s). -> {"split", "slot", "pieces": [{"uri", "samples", "bytes", "sha256"}],
    "samples", "digest_sum" (hex), "first_key", "last_key", "uploaded": [names], "skipped": [names]}."""
    from webdataset import TarWriter

    rows = SlotRows(tables, filtered_dir)
    rows.check_unique()
    fingerprint = rows.fingerprint(split, slot, cfg)
    done_uri = storage.join(output_uri, DONE_DIR, f"{split}-{slot:06d}.json")
    if storage.exists(done_uri):
        try:
            done = storage.read_json(done_uri)
        except ValueError:  # a torn record is no record
            done = {}
        if _verified(done, fingerprint):
            names = [p["uri"].rsplit("/", 1)[1] for p in done["pieces"]]
            return {**done["result"], "uploaded": [], "skipped": names}

    pieces: list[dict] = []
    uploaded, skipped, digests = [], [], []
    with tempfile.TemporaryDirectory(prefix="shard-writer-") as tmp:
        state: dict[str, Any] = {"writer": None, "count": 0, "bytes": 0, "path": None}

        def close() -> None:
            state["writer"].close()
            name = piece_name(split, slot, len(pieces))
            record, fresh = put(state["path"], storage.join(output_uri, name), cfg.multipart_threshold)
            pieces.append({"uri": record["uri"], "samples": state["count"], "bytes": record["bytes"],
                           "sha256": record["sha256"]})
            (uploaded if fresh else skipped).append(name)
            state.update(writer=None, count=0, bytes=0)

        for i in range(rows.n):
            sample = _sample(rows, i, split, cfg)
            nbytes = sum(_tar_size(len(sample[k])) for k in ("jpg", "txt", "json"))
            if state["writer"] is not None and _tar_file_size(state["bytes"] + nbytes) > cfg.max_shard_bytes:
                close()
            if state["writer"] is None:
                state["path"] = os.path.join(tmp, piece_name(split, slot, len(pieces)))
                state["writer"] = TarWriter(state["path"], user="clip", group="clip", mode=0o444,
                                            mtime=TAR_MTIME, encoder=False)
            state["writer"].write(sample)
            digests.append(sample_digest(split, sample["jpg"], rows.cols["caption"][i]))
            state["count"] += 1
            state["bytes"] += nbytes
        if state["writer"] is not None:
            close()
    result = {"split": split, "slot": slot, "pieces": pieces, "samples": rows.n,
              "digest_sum": f"{digest_sum(digests):064x}", "first_key": rows.cols["key"][0],
              "last_key": rows.cols["key"][-1]}
    storage.write_json(done_uri, {"fingerprint": fingerprint, "pieces": pieces, "result": result})
    return {**result, "uploaded": uploaded, "skipped": skipped}

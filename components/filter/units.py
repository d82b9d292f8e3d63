"""The filter's work on one unit, the same under Ray and in one process (stage.py runs it).

`analyse_unit` reads the unit once: every record goes through the per-record rules (rules.py) and,
when set, the CLIP score; it writes the unit's decision rows (`<work>/decisions/part-<unit>.parquet`)
and its candidates, the passing records with their original image bytes
(`<work>/candidates/part-<unit>.parquet`), and returns only the compact columns the whole-dataset
rules need (`ALIVE_SCHEMA`: no captions, no images). `write_kept_unit` later copies the candidates that
survived the whole-dataset rules to `kept/part-<unit>.parquet`.

A record's uid is `unit index << 32 | record index`.
"""

from __future__ import annotations

import hashlib
import io
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from components.common import storage
from components.filter.config import FilterConfig
from components.filter.readers import iter_unit
from components.filter.rules import analyse, empty_row
from components.filter.sources import SourceConfigError

UNIT_SHIFT = 32
KEPT_SCHEMA = pa.schema([("key", pa.string()), ("source_uri", pa.string()), ("sha256", pa.string()),
                         ("phash", pa.int64()), ("caption", pa.string()), ("width", pa.int64()),
                         ("height", pa.int64()), ("language", pa.string()), ("image", pa.binary())])
KEPT_COLUMNS = tuple(KEPT_SCHEMA.names)
# kept pairs' parquet: image bytes stored as they are (JPEG/PNG do not compress), the rest zstd
KEPT_COMPRESSION = {"image": "none"} | {c: "zstd" for c in KEPT_COLUMNS if c != "image"}
DECISION_SCHEMA = pa.schema([
    ("key", pa.string()), ("source_uri", pa.string()), ("kept", pa.bool_()), ("reason", pa.string()),
    ("detail", pa.string()), ("caption", pa.string()), ("language", pa.string()), ("language_score", pa.float64()),
    ("width", pa.int64()), ("height", pa.int64()), ("sha256", pa.string()), ("phash", pa.int64()),
    ("clip_score", pa.float64()), ("duplicate_of", pa.string())])
ALIVE_SCHEMA = pa.schema([("uid", pa.int64()), ("key", pa.string()), ("phash", pa.int64()), ("pixels", pa.int64()),
                          ("exact", pa.int64()), ("language", pa.string()), ("concepts", pa.int64()),
                          ("clip_score", pa.float64())])
_WRITE = {"compression": "zstd", "use_dictionary": ["reason", "language"]}


def part_uri(work_uri: str, kind: str, idx: int) -> str:
    return storage.join(work_uri, kind, f"part-{idx:06d}.parquet")


def write_parquet(uri: str, table: pa.Table, **options) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **options)
    storage.write_bytes(uri, sink.getvalue().to_pybytes())


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(pa.BufferReader(storage.read_bytes(uri)), columns=columns)


def _exact_digest(sha256: str, caption_norm: str) -> int:
    """64 bits of sha256(image sha256, normalised caption): equal for exact duplicates."""
    d = hashlib.sha256(f"{sha256}\0{caption_norm}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(d[:8], "big", signed=True)


def _concept_mask(caption: str, patterns: list[re.Pattern]) -> int:
    mask = 0
    text = caption.lower()
    for i, p in enumerate(patterns):
        if p.search(text):
            mask |= 1 << i
    return mask


def concept_patterns(queries: tuple[str, ...]) -> list[re.Pattern]:
    """Whole-word, case-insensitive patterns of the concept queries (bit i of a mask = query i)."""
    return [re.compile(r"(?<!\w)" + re.escape(q.lower()) + r"(?!\w)") for q in queries]


def analyse_unit(idx: int, unit: dict, cfg: FilterConfig, work_uri: str) -> dict:
    """Per-record rules over one unit; writes its decision and candidate parts; returns
    {"idx", "records", "alive": ALIVE_SCHEMA table}."""
    rows: list[dict] = []
    images: list[bytes] = []
    try:
        for i, rec in enumerate(iter_unit(unit, cfg.source)):
            uid = (idx << UNIT_SHIFT) | i
            try:
                row = analyse(rec, uid, cfg)
            except Exception as e:  # noqa: BLE001 - a broken record never stops the run
                row = {**empty_row(uid, rec.key, rec.source_uri), "reason": "unreadable",
                       "detail": f"{type(e).__name__}: {e}"}
            rows.append(row)
            if not row["reason"]:
                images.append(rec.image)
    except SourceConfigError:
        raise  # the input does not match the configuration: stop with the message
    except Exception as e:  # noqa: BLE001 - a unit that cannot be read on becomes one error record
        where = unit.get("uri") or (unit.get("items") or [["?"]])[0][0]
        rows.append({**empty_row((idx << UNIT_SHIFT) | 0xFFFFFFFF, f"unit{idx:06d}_error", str(where)),
                     "reason": "unreadable", "detail": f"reading stopped after {len(rows)} records: "
                                                       f"{type(e).__name__}: {e}"})
    alive = [r for r in rows if not r["reason"]]
    scores = clip_scores(cfg, images, [r["caption"] for r in alive]) if cfg.clip_bundle else [None] * len(alive)
    for r, s in zip(alive, scores):
        r["clip_score"] = s
    patterns = concept_patterns(cfg.concept_queries)
    decisions = pa.Table.from_pylist([{**{c: r.get(c) for c in DECISION_SCHEMA.names}, "kept": not r["reason"]}
                                      for r in rows], schema=DECISION_SCHEMA)
    write_parquet(part_uri(work_uri, "decisions", idx), decisions.append_column(
        "uid", pa.array([r["uid"] for r in rows], pa.int64())), **_WRITE)
    candidates = pa.Table.from_pylist([{**{c: r[c] for c in KEPT_COLUMNS if c != "image"}, "image": img}
                                       for r, img in zip(alive, images)], schema=KEPT_SCHEMA)
    write_parquet(part_uri(work_uri, "candidates", idx), candidates.append_column(
        "uid", pa.array([r["uid"] for r in alive], pa.int64())), compression=KEPT_COMPRESSION | {"uid": "zstd"})
    compact = pa.Table.from_pylist([{
        "uid": r["uid"], "key": r["key"], "phash": r["phash"], "pixels": r["width"] * r["height"],
        "exact": _exact_digest(r["sha256"], r["caption_norm"]), "language": r["language"],
        "concepts": _concept_mask(r["caption"], patterns) if patterns else 0, "clip_score": r["clip_score"]}
        for r in alive], schema=ALIVE_SCHEMA)
    return {"idx": idx, "records": len(rows), "alive": compact}


def write_kept_unit(idx: int, work_uri: str, kept_uri: str, rejected_uids: pa.Array) -> int:
    """Copy the unit's candidates that are not in `rejected_uids` to kept/part-<unit>.parquet; returns the count."""
    table = read_parquet(part_uri(work_uri, "candidates", idx))
    if len(rejected_uids):
        table = table.filter(pc.invert(pc.is_in(table["uid"], value_set=rejected_uids)))
    if table.num_rows:
        write_parquet(storage.join(kept_uri, f"part-{idx:06d}.parquet"), table.select(list(KEPT_COLUMNS)),
                      compression=KEPT_COMPRESSION)
    storage.delete(part_uri(work_uri, "candidates", idx))
    return table.num_rows


# --------------------------------------------------------------------------- the CLIP-score rule

_CLIP_CACHE: dict[str, object] = {}


def _onnx_clip(bundle: str):
    """One OnnxClip per worker process and bundle (downloaded first when the bundle is on S3)."""
    if bundle not in _CLIP_CACHE:
        import tempfile

        from components.inference.onnx_clip import OnnxClip, fetch_remote_bundle

        local = fetch_remote_bundle(bundle, tempfile.mkdtemp(prefix="clip-bundle-")) if storage.is_s3(bundle) else bundle
        _CLIP_CACHE[bundle] = OnnxClip(local, intra_op_threads=1)
    return _CLIP_CACHE[bundle]


def clip_scores(cfg: FilterConfig, images: list[bytes], captions: list[str]) -> list[float]:
    """Cosine similarity of each image and its caption under the ONNX bundle `cfg.clip_bundle`."""
    from PIL import Image

    model = _onnx_clip(cfg.clip_bundle)
    out: list[float] = []
    for s in range(0, len(images), cfg.clip_batch_size):
        batch = [Image.open(io.BytesIO(b)) for b in images[s:s + cfg.clip_batch_size]]  # RGB as serving makes it
        img = model.encode_images(batch)
        txt = model.encode_texts(captions[s:s + cfg.clip_batch_size])
        out += [float(x) for x in (img * txt).sum(axis=1)]
    return out

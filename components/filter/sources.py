"""Raw image-text records from any input, local or s3:// (all I/O through components/common/storage.py).

Inputs (a single file or a directory / prefix holding any mix of them):
- a folder of images with same-stem captions: `x.jpg` + `x.txt`, or `x.json` with a "caption" or
  "text" field (other JSON fields become metadata);
- tables: `.parquet`, `.jsonl`/`.ndjson`, `.csv` with an image column (encoded bytes, or a
  {"bytes": ...} struct) or an image-path column (relative to the table), and a caption column;
- webdataset tars (img2dataset / DataComp layout): members `KEY.jpg|png|webp`, `KEY.txt`, `KEY.json`.

Work is split into *units* (a group of files, one table, one tar) so that readers can run in
parallel; `list_units` is deterministic and `iter_unit` yields records in a fixed order, so
(unit index, record index) identifies a record across passes. Files whose name starts with "_" or
"." are ignored (e.g. `_SUCCESS`, `_planted.json`). A broken record (missing caption, unreadable
member or file) is yielded with `error` set; it never stops the iteration.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field

from components.common import storage
from components.filter.config import SourceConfig

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXTS = ("txt", "json")
TABLE_EXTS = ("parquet", "jsonl", "ndjson", "csv")
TAR_EXTS = ("tar",)
CAPTION_FIELDS = ("caption", "text", "txt", "TEXT", "alt", "alt_text")
IMAGE_FIELDS = ("image", "img", "jpg", "png", "webp", "image_bytes")
IMAGE_PATH_FIELDS = ("image_path", "path", "file", "filepath", "file_name", "filename", "image_file")
KEY_FIELDS = ("key", "id", "uid")
_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")


class SourceConfigError(ValueError):
    """The input does not match the configuration (e.g. a table lacks the configured column)."""


@dataclass
class RawRecord:
    key: str                      # no dots, slashes or whitespace
    source_uri: str               # file URI, `<table uri>#<row>`, or `<tar uri>#<member>`
    image: bytes | None
    caption: str | None
    meta: dict = field(default_factory=dict)
    error: str | None = None      # why the record is unusable as read (missing caption, unreadable image)
    error_reason: str | None = None   # a short code: missing_caption | missing_image | unreadable


def sanitize_key(raw: str) -> str:
    """A webdataset-safe key: runs of anything but letters, digits, '_' and '-' become '_'."""
    key = _KEY_BAD.sub("_", raw).strip("_")
    return key or "_"


def _ext(name: str) -> str:
    base = posixpath.basename(name)
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _hidden(path: str, root: str) -> bool:
    rel = _relative(path, root)
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/")
    if path == root:
        return posixpath.basename(path)
    return path[len(root) + 1:] if path.startswith(root + "/") else posixpath.basename(path)


def list_units(source_uri: str, cfg: SourceConfig | None = None) -> list[dict]:
    """Deterministic list of work units under `source_uri` (a file, directory or s3:// prefix)."""
    cfg = cfg or SourceConfig()
    files = storage.list_files(source_uri)
    if not files:
        raise FileNotFoundError(f"source {source_uri}: no files found")
    single = len(files) == 1 and files[0].rstrip("/") == source_uri.rstrip("/")
    root = posixpath.dirname(source_uri.rstrip("/")) if single else source_uri.rstrip("/")
    units: list[dict] = []
    stems: dict[str, dict[str, str]] = {}
    for f in files:
        if _hidden(f, root):
            continue
        ext = _ext(f)
        if ext in TABLE_EXTS:
            units.append({"kind": "table", "uri": f, "format": "jsonl" if ext == "ndjson" else ext})
        elif ext in TAR_EXTS:
            units.append({"kind": "tar", "uri": f})
        elif ext in IMAGE_EXTS or ext in CAPTION_EXTS:
            rel = _relative(f, root)
            stem = rel[: -(len(ext) + 1)]
            slot = "caption_" + ext if ext in CAPTION_EXTS else "image"
            entry = stems.setdefault(stem, {})
            if slot == "image" and "image" in entry:
                entry.setdefault("extra_images", []).append(f)  # type: ignore[union-attr]
            else:
                entry[slot] = f
    groups = sorted(stems.items())
    for start in range(0, len(groups), cfg.files_per_unit):
        units.append({"kind": "files", "items": [[stem, e.get("image"), e.get("caption_txt"),
                                                  e.get("caption_json")]
                                                 for stem, e in groups[start:start + cfg.files_per_unit]]})
    if not units:
        raise FileNotFoundError(f"source {source_uri}: no images, tables or tars among {len(files)} files")
    return units


def estimate_records(unit: dict) -> int | None:
    """Records in a unit when known without reading it (files, parquet); None otherwise."""
    if unit["kind"] == "files":
        return len(unit["items"])
    if unit["kind"] == "table" and unit["format"] == "parquet" and not storage.is_s3(unit["uri"]):
        import pyarrow.parquet as pq
        return pq.ParquetFile(unit["uri"]).metadata.num_rows
    return None


def iter_unit(unit: dict, cfg: SourceConfig | None = None) -> Iterator[RawRecord]:
    cfg = cfg or SourceConfig()
    kind = unit["kind"]
    if kind == "files":
        yield from _iter_files(unit["items"])
    elif kind == "table":
        yield from _iter_table(unit["uri"], unit["format"], cfg)
    elif kind == "tar":
        yield from _iter_tar(unit["uri"])
    else:
        raise ValueError(f"unknown unit kind {kind!r}")


def iter_records(source_uri: str, cfg: SourceConfig | None = None) -> Iterator[RawRecord]:
    """Every record under `source_uri`, in unit order."""
    for unit in list_units(source_uri, cfg):
        yield from iter_unit(unit, cfg)


# --------------------------------------------------------------------------- captions

def caption_from_json(obj: object) -> tuple[str | None, dict]:
    """(caption, metadata) from a caption JSON document (first of CAPTION_FIELDS that is a string)."""
    if not isinstance(obj, dict):
        return None, {}
    meta = {k: v for k, v in obj.items() if isinstance(v, (str, int, float, bool)) or v is None}
    for f in CAPTION_FIELDS:
        if isinstance(obj.get(f), str):
            return obj[f], meta
    return None, meta


def _decode_text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- folders

def _iter_files(items: list) -> Iterator[RawRecord]:
    for stem, image_uri, txt_uri, json_uri in items:
        key = sanitize_key(stem)
        uri = image_uri or txt_uri or json_uri
        rec = RawRecord(key=key, source_uri=uri, image=None, caption=None)
        meta: dict = {}
        try:
            if json_uri:
                try:
                    caption, meta = caption_from_json(json.loads(_decode_text(storage.read_bytes(json_uri))))
                except json.JSONDecodeError as e:
                    caption, meta = None, {"json_error": str(e)}
                rec.caption = caption
            if txt_uri:
                rec.caption = _decode_text(storage.read_bytes(txt_uri))
            rec.meta = meta
            if image_uri is None:
                rec.error, rec.error_reason = f"{key}: no image file next to {uri}", "missing_image"
            else:
                rec.image = storage.read_bytes(image_uri)
                if rec.caption is None:
                    rec.error = (f"{key}: no caption (" + (f"{json_uri} has no caption/text field"
                                 if json_uri else f"no {stem}.txt or {stem}.json") + ")")
                    rec.error_reason = "missing_caption"
        except Exception as e:  # noqa: BLE001 - a broken record never stops the iteration
            rec.error, rec.error_reason = f"{key}: cannot read {uri}: {e}", "unreadable"
        yield rec


# --------------------------------------------------------------------------- tables

def _pick(columns: list[str], wanted: str | None, defaults: tuple[str, ...], what: str, uri: str,
          required: bool = True) -> str | None:
    if wanted:
        if wanted not in columns:
            raise SourceConfigError(f"table {uri}: no {what} column {wanted!r} (columns: {columns})")
        return wanted
    for c in defaults:
        if c in columns:
            return c
    if required:
        raise SourceConfigError(f"table {uri}: no {what} column (looked for {list(defaults)}; columns: {columns}); "
                         f"set SourceConfig.{what.replace(' ', '_')}_column")
    return None


def _read_table(uri: str, fmt: str):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson
    import pyarrow.parquet as pq

    data = storage.read_bytes(uri)
    if fmt == "parquet":
        return pq.read_table(pa.BufferReader(data))
    if fmt == "csv":  # every column as text: keys such as 000123 must not become integers
        names = pacsv.read_csv(io.BytesIO(data)).column_names
        return pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
            column_types={n: pa.string() for n in names}))
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line.strip()]
    return pa.Table.from_pylist(rows) if rows else pajson.read_json(io.BytesIO(data))


def _table_columns(cols: list[str], uri: str, cfg: SourceConfig) -> tuple[str, str | None, str | None, str | None]:
    """(caption, image bytes, image path, key) column names; SourceConfigError when they do not fit."""
    cap_col = _pick(cols, cfg.caption_column, CAPTION_FIELDS, "caption", uri)
    img_col = _pick(cols, cfg.image_column, IMAGE_FIELDS, "image", uri, required=False)
    path_col = None if img_col else _pick(cols, cfg.image_path_column, IMAGE_PATH_FIELDS, "image path", uri)
    key_col = _pick(cols, cfg.key_column, KEY_FIELDS, "key", uri, required=False)
    return cap_col, img_col, path_col, key_col


def _header_columns(uri: str, fmt: str) -> list[str]:
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        if storage.is_s3(uri):
            return pq.read_schema(pa.BufferReader(storage.read_bytes(uri))).names
        return pq.read_schema(uri).names
    with storage.open_read(uri) as f:
        first = f.readline().decode("utf-8", errors="replace")
    if fmt == "csv":
        import csv

        return next(csv.reader([first]), [])
    return list(json.loads(first)) if first.strip() else []


def check_table_columns(units: list[dict], cfg: SourceConfig) -> None:
    """Resolve the configured columns of the tables on the driver (every local table, the first remote
    one per format) so a misconfiguration stops the run with a clear SourceConfigError."""
    checked_remote: set[str] = set()
    for unit in units:
        if unit["kind"] != "table":
            continue
        if storage.is_s3(unit["uri"]):
            if unit["format"] in checked_remote:
                continue
            checked_remote.add(unit["format"])
        _table_columns(_header_columns(unit["uri"], unit["format"]), unit["uri"], cfg)


def _iter_table(uri: str, fmt: str, cfg: SourceConfig) -> Iterator[RawRecord]:
    table = _read_table(uri, fmt)
    cols = table.column_names
    cap_col, img_col, path_col, key_col = _table_columns(cols, uri, cfg)
    base = posixpath.dirname(uri) if storage.is_s3(uri) else uri.rsplit("/", 1)[0] if "/" in uri else "."
    stem = sanitize_key(posixpath.basename(uri).rsplit(".", 1)[0])
    meta_cols = [c for c in cols if c not in {cap_col, img_col, path_col, key_col}]
    for i, row in enumerate(table.to_pylist()):
        key = sanitize_key(str(row[key_col])) if key_col and row.get(key_col) is not None else f"{stem}_{i:08d}"
        rec = RawRecord(key=key, source_uri=f"{uri}#{i}", image=None, caption=row.get(cap_col),
                        meta={c: row[c] for c in meta_cols if isinstance(row[c], (str, int, float, bool))})
        try:
            if img_col:
                value = row.get(img_col)
                if isinstance(value, dict):
                    value = value.get("bytes")
                rec.image = bytes(value) if value is not None else None
                if rec.image is None:
                    rec.error, rec.error_reason = f"{key}: empty image cell in {uri} row {i}", "missing_image"
            else:
                rel = row.get(path_col)
                if not rel:
                    rec.error, rec.error_reason = f"{key}: empty image path in {uri} row {i}", "missing_image"
                else:
                    path = rel if rel.startswith(("s3://", "/")) else storage.join(base, rel)
                    rec.source_uri = path
                    rec.image = storage.read_bytes(path)
        except Exception as e:  # noqa: BLE001
            rec.error, rec.error_reason = f"{key}: cannot read the image of {uri} row {i}: {e}", "unreadable"
        if rec.error is None and rec.caption is None:
            rec.error, rec.error_reason = f"{key}: empty caption cell in {uri} row {i}", "missing_caption"
        if rec.caption is not None and not isinstance(rec.caption, str):
            rec.caption = str(rec.caption)
        yield rec


# --------------------------------------------------------------------------- webdataset tars

def _member_key(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the basename."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(d, stem) if d else stem), ext.lower()


def _iter_tar(uri: str) -> Iterator[RawRecord]:
    current: str | None = None
    parts: dict[str, tuple[str, bytes | None, str | None]] = {}

    def flush() -> Iterator[RawRecord]:
        if current is not None:
            yield _tar_record(uri, current, parts)

    try:
        with storage.open_read(uri) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _member_key(member.name)
                if posixpath.basename(k).startswith(("_", ".")):
                    continue
                if k != current:
                    yield from flush()
                    current, parts = k, {}
                try:
                    f = tar.extractfile(member)
                    parts[ext] = (member.name, f.read() if f else None, None)
                except Exception as e:  # noqa: BLE001
                    parts[ext] = (member.name, None, str(e))
            yield from flush()
            current = None
    except Exception as e:  # noqa: BLE001 - a truncated or unreadable tar yields one error record
        if current is not None and parts:
            yield _tar_record(uri, current, parts)
        yield RawRecord(key=sanitize_key(posixpath.basename(uri).rsplit(".", 1)[0] + "_tar_error"),
                        source_uri=uri, image=None, caption=None,
                        error=f"{uri}: unreadable tar after {current or 'the start'}: {e}",
                        error_reason="unreadable")


def _tar_record(uri: str, key: str, parts: dict[str, tuple[str, bytes | None, str | None]]) -> RawRecord:
    skey = sanitize_key(key)
    img_ext = next((e for e in IMAGE_EXTS if e in parts), None)
    member = parts[img_ext][0] if img_ext else next(iter(parts.values()))[0]
    rec = RawRecord(key=skey, source_uri=f"{uri}#{member}", image=None, caption=None)
    caption, meta = None, {}
    if "json" in parts and parts["json"][1] is not None:
        try:
            caption, meta = caption_from_json(json.loads(_decode_text(parts["json"][1])))
        except json.JSONDecodeError as e:
            meta = {"json_error": str(e)}
    if "txt" in parts and parts["txt"][1] is not None:
        caption = _decode_text(parts["txt"][1])
    rec.caption, rec.meta = caption, meta
    if img_ext is None:
        rec.error, rec.error_reason = f"{skey}: no image member in {uri} (members: {sorted(parts)})", "missing_image"
    elif parts[img_ext][1] is None:
        rec.error, rec.error_reason = f"{skey}: unreadable member {member}: {parts[img_ext][2]}", "unreadable"
    else:
        rec.image = parts[img_ext][1]
        if caption is None:
            rec.error, rec.error_reason = f"{skey}: no caption member (.txt / .json) in {uri}", "missing_caption"
    return rec

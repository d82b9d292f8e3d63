"""What a source holds: its work units, record keys and table columns (the readers are in readers.py).

Inputs (a single file or a directory / prefix holding any mix of them), local or s3://:
- a folder of images with same-stem captions: `x.jpg` + `x.txt`, or `x.json` with a "caption" or
  "text" field (other JSON fields become metadata);
- tables: `.parquet`, `.jsonl`/`.ndjson`, `.csv` with an image column (encoded bytes, or a
  {"bytes": ...} struct) or an image-path column (relative to the table), and a caption column. The
  images a table names by path are that table's: they are not listed again as image-only records;
- webdataset tars (img2dataset / DataComp layout): members `KEY.jpg|png|webp`, `KEY.txt`, `KEY.json`.
  img2dataset writes `NNNNN.parquet` (key, caption, url, status, error_message, ...) and
  `NNNNN_stats.json` beside each `NNNNN.tar`: a parquet beside a same-stem tar is read as the tar's
  *sidecar* (its rows whose `status` is not "success" are the failed downloads, one `missing_image`
  record each; the successful ones are the tar's samples) and the stats file is skipped.

Work is split into *units* (a group of files, one table, one tar) so that readers run in parallel;
`list_units` is deterministic and a unit's reader yields records in a fixed order, so (unit index,
record index) identifies a record. Files whose name starts with "_" or "." are ignored (e.g.
`_SUCCESS`, `_planted.json`).

Keys (`make_key`) are unique and stable for any name: letters of any script, digits, "_" and "-"
are kept; a name with anything else (spaces, dots, slashes, combining marks, bytes that are not
UTF-8) is sanitised and gets a hash of the original name appended, so two names never merge.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import re
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
_KEY_BAD = re.compile(r"[^\w-]+")


class SourceConfigError(ValueError):
    """The input does not match the configuration (e.g. a table lacks the configured column)."""


@dataclass
class RawRecord:
    key: str                      # see make_key: no dots, slashes or whitespace
    source_uri: str               # file URI, `<table uri>#<row>` / `#L<line>`, or `<tar uri>#<member>`
    image: bytes | None
    caption: str | None
    meta: dict = field(default_factory=dict)
    error: str | None = None      # why the record is unusable as read (missing caption, unreadable image)
    error_reason: str | None = None   # missing_image | unreadable | missing_caption | caption_encoding


def make_key(raw: str) -> str:
    """A webdataset-safe key that is unique for every distinct `raw` (see the module doc)."""
    key = _KEY_BAD.sub("_", raw).strip("_")
    if key == raw:
        return key
    digest = hashlib.sha1(raw.encode("utf-8", "surrogateescape")).hexdigest()[:10]
    return f"{key}-{digest}" if key else digest


def _ext(name: str) -> str:
    base = posixpath.basename(name)
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/")
    if path == root:
        return posixpath.basename(path)
    return path[len(root) + 1:] if path.startswith(root + "/") else posixpath.basename(path)


def _hidden(rel: str) -> bool:
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def _list_source(source_uri: str) -> list[str]:
    """Every file under the source; a missing path and an empty source fail with different messages."""
    if not storage.is_s3(source_uri) and not os.path.exists(source_uri):
        raise FileNotFoundError(f"source {source_uri}: no such file or directory")
    files = storage.list_files(source_uri)  # a missing bucket raises BucketNotFound, naming it
    if not files:
        what = "no objects under this prefix (it is empty or does not exist)" if storage.is_s3(source_uri) \
            else "the directory is empty"
        raise FileNotFoundError(f"source {source_uri}: {what}")
    return files


def list_units(source_uri: str, cfg: SourceConfig | None = None) -> list[dict]:
    """Deterministic list of work units under `source_uri` (a file, directory or s3:// prefix)."""
    cfg = cfg or SourceConfig()
    files = _list_source(source_uri)
    single = len(files) == 1 and files[0].rstrip("/") == source_uri.rstrip("/")
    root = posixpath.dirname(source_uri.rstrip("/")) if single else source_uri.rstrip("/")
    rels = {f: _relative(f, root) for f in files}
    visible = [f for f in files if not _hidden(rels[f])]
    tars = {f[:-len(".tar")] for f in visible if _ext(f) in TAR_EXTS}
    units: list[dict] = []
    images: list[str] = []
    for f in visible:
        ext, stem = _ext(f), f.rsplit(".", 1)[0]
        if ext == "parquet" and stem in tars:  # img2dataset's metadata of the tar beside it
            units.append({"kind": "sidecar", "uri": f})
        elif ext in TABLE_EXTS:
            units.append({"kind": "table", "uri": f, "format": "jsonl" if ext == "ndjson" else ext,
                          "key_prefix": make_key(rels[f].rsplit(".", 1)[0])})
        elif ext in TAR_EXTS:
            units.append({"kind": "tar", "uri": f})
        elif ext == "json" and stem.endswith("_stats") and stem[:-len("_stats")] in tars:
            continue  # img2dataset's per-shard statistics
        elif ext in IMAGE_EXTS or ext in CAPTION_EXTS:
            images.append(f)
    if images:
        units += _file_units(images, rels, _table_images(units, cfg), cfg.files_per_unit)
    if not units:
        exts = sorted({_ext(f) or "(none)" for f in files})
        raise FileNotFoundError(f"source {source_uri}: no images, tables or tars among its {len(files)} files "
                                f"(extensions: {', '.join(exts)}; names starting with '_' or '.' are skipped)")
    return units


def _file_units(files: list[str], rels: dict[str, str], taken: set[str], per_unit: int) -> list[dict]:
    """Folder pairs grouped by stem, `per_unit` stems per unit; an image a table names is that table's,
    not a record of its own, unless it has its own caption file (then it is a folder pair as well)."""
    stems: dict[str, dict] = {}
    for f in files:
        ext = _ext(f)
        stem = rels[f][: -(len(ext) + 1)]
        slot = "caption_" + ext if ext in CAPTION_EXTS else "image"
        entry = stems.setdefault(stem, {})
        if slot not in entry:  # a second image with the same stem is ignored (x.jpg and x.png)
            entry[slot] = f
    groups = sorted((stem, e) for stem, e in stems.items()
                    if not ("image" in e and len(e) == 1
                            and (e["image"] if storage.is_s3(e["image"]) else os.path.normpath(e["image"])) in taken))
    return [{"kind": "files", "items": [[stem, e.get("image"), e.get("caption_txt"), e.get("caption_json")]
                                        for stem, e in groups[s:s + per_unit]]}
            for s in range(0, len(groups), per_unit)]


def _table_images(units: list[dict], cfg: SourceConfig) -> set[str]:
    """The image files named by the path column of the tables among `units` (only that column is read)."""
    taken: set[str] = set()
    for unit in units:
        if unit["kind"] != "table":
            continue
        _, img_col, path_col, _ = table_columns(header_columns(unit["uri"], unit["format"]), unit["uri"], cfg)
        if img_col or not path_col:
            continue
        for _, row, _ in table_rows(unit["uri"], unit["format"], columns=[path_col]):
            if isinstance(row, dict) and isinstance(row.get(path_col), str) and row[path_col]:
                taken.add(image_path(unit["uri"], row[path_col]))
    return taken


# --------------------------------------------------------------------------- table rows

def table_rows(uri: str, fmt: str, columns: list[str] | None = None) -> Iterator[tuple[int, dict | None, str | None]]:
    """(position, row, None) per row, or (position, None, why) for a line that cannot be parsed.
    Parquet positions are 0-based row numbers; JSONL / CSV positions are 1-based line numbers."""
    if fmt == "parquet":
        i = 0
        for batch in parquet_file(uri).iter_batches(batch_size=1024, columns=columns):
            for row in batch.to_pylist():
                yield i, row, None
                i += 1
        return
    with storage.open_read(uri) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
        yield from (_csv_rows(text) if fmt == "csv" else _jsonl_rows(text))


def _jsonl_rows(lines) -> Iterator[tuple[int, dict | None, str | None]]:
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, None, f"line {lineno}: not valid JSON ({e.msg} at column {e.colno})"
            continue
        if isinstance(row, dict):
            yield lineno, row, None
        else:
            yield lineno, None, f"line {lineno}: a JSON object expected, found {type(row).__name__}"


def _csv_rows(text) -> Iterator[tuple[int, dict | None, str | None]]:
    reader = csv.reader(text, strict=True)
    header: list[str] | None = None
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, None, f"line {start}: malformed CSV ({e})"
            continue
        if header is None:
            header = row
        elif row:
            if len(row) != len(header):
                yield start, None, f"line {start}: {len(row)} fields, the header has {len(header)}"
            else:
                yield start, dict(zip(header, row)), None


def image_path(table_uri: str, rel: str) -> str:
    """The image a table row names: absolute paths and s3:// URIs as they are, others relative to the table."""
    if rel.startswith("s3://"):
        return rel
    if storage.is_s3(table_uri):
        bucket_and_key = posixpath.normpath(posixpath.join(posixpath.dirname(table_uri[len("s3://"):]), rel))
        return "s3://" + bucket_and_key
    return os.path.normpath(os.path.join(os.path.dirname(table_uri), rel))


def estimate_records(unit: dict) -> int | None:
    """Records in a unit when known without reading it (files, local parquet); None otherwise."""
    if unit["kind"] == "files":
        return len(unit["items"])
    if unit["kind"] == "table" and unit["format"] == "parquet" and not storage.is_s3(unit["uri"]):
        import pyarrow.parquet as pq
        return pq.ParquetFile(unit["uri"]).metadata.num_rows
    return None


# --------------------------------------------------------------------------- table columns

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


def table_columns(cols: list[str], uri: str, cfg: SourceConfig) -> tuple[str, str | None, str | None, str | None]:
    """(caption, image bytes, image path, key) column names; SourceConfigError when they do not fit."""
    cap_col = _pick(cols, cfg.caption_column, CAPTION_FIELDS, "caption", uri)
    img_col = _pick(cols, cfg.image_column, IMAGE_FIELDS, "image", uri, required=False)
    path_col = None if img_col else _pick(cols, cfg.image_path_column, IMAGE_PATH_FIELDS, "image path", uri)
    key_col = _pick(cols, cfg.key_column, KEY_FIELDS, "key", uri, required=False)
    return cap_col, img_col, path_col, key_col


def parquet_file(uri: str):
    """A parquet file, local or s3://, opened for random access (`storage.pyarrow_filesystem`): reading its
    schema fetches only the footer, reading columns only their byte ranges, never the whole object."""
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_filesystem(uri)
    return pq.ParquetFile(fs.open_input_file(path))


def header_columns(uri: str, fmt: str) -> list[str]:
    """A table's column names, from its schema or first line."""
    if fmt == "parquet":
        names = parquet_file(uri).schema_arrow.names
    else:
        import json

        with storage.open_read(uri) as f:
            first = f.readline().decode("utf-8", errors="replace")
        if fmt == "csv":
            import csv

            names = next(csv.reader([first]), [])
        else:
            try:
                obj = json.loads(first) if first.strip() else {}
            except json.JSONDecodeError:
                obj = {}  # a malformed first line is that line's problem, found by the reader
            names = list(obj) if isinstance(obj, dict) else []
    return names


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
        cols = header_columns(unit["uri"], unit["format"])
        if cols or unit["format"] != "jsonl":  # a JSONL table whose first line is broken is checked per row
            table_columns(cols, unit["uri"], cfg)

"""Records of one work unit (see sources.py), read in a fixed order; a broken record never stops a unit.

- A malformed JSONL or CSV line is one record with reason `unreadable` and its line number (1-based,
  as an editor shows it); the other lines go on.
- Captions must be UTF-8 (a UTF-8 or UTF-16 byte-order mark is honoured). A caption that is not is
  decoded with `SourceConfig.caption_encodings` when one is configured and fits, else the record is
  rejected as `caption_encoding`; so is a caption that already holds U+FFFD (decoded with errors
  upstream). Replacement characters never reach the kept pairs.
"""

from __future__ import annotations

import codecs
import json
import posixpath
import re
from collections.abc import Iterator

from components.common import storage
from components.common.tar_reader import member_key
from components.common.tar_samples import tar_members
from components.filter.config import SourceConfig
from components.filter.sources import CAPTION_FIELDS, IMAGE_EXTS, RawRecord, header_columns, image_path, list_units, \
    make_key, table_columns, table_rows

_SURROGATE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by the surrogateescape handler


def iter_unit(unit: dict, cfg: SourceConfig | None = None) -> Iterator[RawRecord]:
    cfg = cfg or SourceConfig()
    kind = unit["kind"]
    if kind == "files":
        yield from _iter_files(unit["items"], cfg)
    elif kind == "table":
        yield from _iter_table(unit, cfg)
    elif kind == "sidecar":
        yield from _iter_sidecar(unit["uri"])
    elif kind == "tar":
        yield from _iter_tar(unit["uri"], cfg)
    else:
        raise ValueError(f"unknown unit kind {kind!r}")


def iter_records(source_uri: str, cfg: SourceConfig | None = None) -> Iterator[RawRecord]:
    """Every record under `source_uri`, in unit order."""
    for unit in list_units(source_uri, cfg):
        yield from iter_unit(unit, cfg)


# --------------------------------------------------------------------------- captions

def decode_caption(data: bytes, fallbacks: tuple[str, ...] = ()) -> tuple[str | None, str | None]:
    """(text, None) or (None, why it is not text): UTF-8 (BOMs honoured), else the fallback encodings."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return check_caption(data.decode("utf-16"))
        except UnicodeDecodeError:
            pass
    try:
        return check_caption(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        for encoding in fallbacks:
            try:
                return check_caption(data.decode(encoding))
            except UnicodeDecodeError:
                continue
        tried = f"; also tried {', '.join(fallbacks)}" if fallbacks else " (SourceConfig.caption_encodings names " \
                                                                           "encodings to try)"
        return None, f"caption is not UTF-8: byte 0x{data[e.start]:02x} at offset {e.start}{tried}"


def check_caption(text: str, fallbacks: tuple[str, ...] = ()) -> tuple[str | None, str | None]:
    """A decoded caption as it may be kept, or why not (raw bytes kept by surrogateescape, U+FFFD)."""
    if _SURROGATE.search(text):
        return decode_caption(text.encode("utf-8", "surrogateescape"), fallbacks)
    if "\ufffd" in text:
        return None, "caption holds U+FFFD replacement characters (it was decoded with errors before)"
    return text, None


def _set_caption(rec: RawRecord, value: object, fallbacks: tuple[str, ...]) -> None:
    if value is None:
        return
    if isinstance(value, bytes):
        text, why = decode_caption(value, fallbacks)
    elif isinstance(value, str):
        text, why = check_caption(value, fallbacks)
    else:
        text, why = str(value), None
    rec.caption = text
    if why and rec.error is None:
        rec.error, rec.error_reason = f"{rec.key}: {why}", "caption_encoding"


def caption_from_json(obj: object) -> tuple[object, dict]:
    """(caption, metadata) from a caption JSON document (first of CAPTION_FIELDS that is a string)."""
    if not isinstance(obj, dict):
        return None, {}
    meta = {k: v for k, v in obj.items() if isinstance(v, (str, int, float, bool)) or v is None}
    for f in CAPTION_FIELDS:
        if isinstance(obj.get(f), str):
            return obj[f], meta
    return None, meta


def _json_caption(rec: RawRecord, data: bytes, fallbacks: tuple[str, ...]) -> bool:
    """Caption and metadata of a caption JSON file into `rec`; False when it is not JSON."""
    try:
        caption, rec.meta = caption_from_json(json.loads(data.decode("utf-8-sig", "surrogateescape")))
    except json.JSONDecodeError as e:
        rec.meta = {"json_error": str(e)}
        return False
    _set_caption(rec, caption, fallbacks)
    return True


def _missing_caption(rec: RawRecord, why: str) -> None:
    if rec.error is None and rec.caption is None:
        rec.error, rec.error_reason = f"{rec.key}: {why}", "missing_caption"


# --------------------------------------------------------------------------- folders

def _iter_files(items: list, cfg: SourceConfig) -> Iterator[RawRecord]:
    fallbacks = cfg.caption_encodings
    for stem, image_uri, txt_uri, json_uri in items:
        key = make_key(stem)
        uri = image_uri or txt_uri or json_uri
        rec = RawRecord(key=key, source_uri=uri, image=None, caption=None)
        try:
            if image_uri is None:
                rec.error, rec.error_reason = f"{key}: no image file next to {uri}", "missing_image"
            else:
                rec.image = storage.read_bytes(image_uri)
            if json_uri:
                _json_caption(rec, storage.read_bytes(json_uri), fallbacks)
            if txt_uri:
                rec.caption = None
                _set_caption(rec, storage.read_bytes(txt_uri), fallbacks)
            _missing_caption(rec, f"no caption ({json_uri} has no caption/text field)" if json_uri and not txt_uri
                             else f"no {posixpath.basename(stem)}.txt or .json")
        except Exception as e:  # noqa: BLE001 - a broken record never stops the iteration
            rec.error, rec.error_reason = f"{key}: cannot read {uri}: {e}", "unreadable"
        yield rec


# --------------------------------------------------------------------------- tables

def _iter_table(unit: dict, cfg: SourceConfig) -> Iterator[RawRecord]:
    uri, fmt = unit["uri"], unit["format"]
    text_table = fmt != "parquet"
    cols: tuple | None = None
    fallbacks = cfg.caption_encodings
    for pos, row, why in table_rows(uri, fmt):
        where = f"line {pos}" if text_table else f"row {pos}"
        source_uri = f"{uri}#L{pos}" if text_table else f"{uri}#{pos}"
        if row is None:
            yield RawRecord(key=f"{unit['key_prefix']}_L{pos:08d}", source_uri=source_uri, image=None, caption=None,
                            error=f"{uri} {why}", error_reason="unreadable")
            continue
        if cols is None:  # a row has every column (JSONL rows may differ: its first line, else this row)
            cols = table_columns((fmt == "jsonl" and header_columns(uri, fmt)) or list(row), uri, cfg)
        cap_col, img_col, path_col, key_col = cols
        raw_key = row.get(key_col) if key_col else None
        key = make_key(str(raw_key)) if raw_key not in (None, "") else \
            f"{unit['key_prefix']}_{'L' if text_table else ''}{pos:08d}"
        used = {cap_col, img_col, path_col, key_col}
        rec = RawRecord(key=key, source_uri=source_uri, image=None, caption=None,
                        meta={c: v for c, v in row.items() if c not in used and isinstance(v, (str, int, float, bool))})
        try:
            if img_col:
                value = row.get(img_col)
                value = value.get("bytes") if isinstance(value, dict) else value
                if value is None:
                    status = "".join(f" ({k}: {row[k]})" for k in ("status", "error_message") if row.get(k))
                    rec.error, rec.error_reason = f"{key}: empty image cell in {uri} {where}{status}", "missing_image"
                else:
                    rec.image = bytes(value)
            elif not row.get(path_col):
                rec.error, rec.error_reason = f"{key}: empty image path in {uri} {where}", "missing_image"
            else:
                rec.source_uri = image_path(uri, str(row[path_col]))
                rec.image = storage.read_bytes(rec.source_uri)
        except Exception as e:  # noqa: BLE001
            rec.error, rec.error_reason = f"{key}: cannot read the image of {uri} {where}: {e}", "unreadable"
        _set_caption(rec, row.get(cap_col), fallbacks)
        _missing_caption(rec, f"empty caption cell in {uri} {where}")
        yield rec


def _iter_sidecar(uri: str) -> Iterator[RawRecord]:
    """img2dataset's parquet beside its tar: one missing_image record per failed download."""
    for pos, row, _ in table_rows(uri, "parquet"):
        if "status" not in row:  # metadata without download outcomes: the tar holds every record
            return
        if row["status"] == "success":
            continue
        rec = RawRecord(key=make_key(str(row.get("key"))), source_uri=f"{uri}#{pos}", image=None, caption=None,
                        error=f"img2dataset did not fetch {row.get('url', '?')}: {row.get('status')}"
                              + (f" ({row['error_message']})" if row.get("error_message") else ""),
                        error_reason="missing_image")
        if isinstance(row.get("caption"), str):
            rec.caption = row["caption"]
        yield rec


# --------------------------------------------------------------------------- webdataset tars

def _iter_tar(uri: str, cfg: SourceConfig) -> Iterator[RawRecord]:
    current: str | None = None
    parts: dict[str, tuple[str, bytes]] = {}  # extension -> (member name, bytes)
    try:
        for name, data in tar_members(uri):  # a tar made elsewhere: tarfile reads every format of it
            k, ext = member_key(name)
            if posixpath.basename(k).startswith(("_", ".")):
                continue
            if k != current:
                if current is not None:
                    yield _tar_record(uri, current, parts, cfg)
                current, parts = k, {}
            parts[ext] = (name, data)
        if current is not None:
            yield _tar_record(uri, current, parts, cfg)
        current = None
    except Exception as e:  # noqa: BLE001 - a truncated or unreadable tar yields one error record
        if current is not None and parts:
            yield _tar_record(uri, current, parts, cfg)
        yield RawRecord(key=make_key(posixpath.basename(uri).rsplit(".", 1)[0] + "_tar_error"),
                        source_uri=uri, image=None, caption=None,
                        error=f"{uri}: unreadable tar after {current or 'the start'}: {e}",
                        error_reason="unreadable")


def _tar_record(uri: str, key: str, parts: dict[str, tuple[str, bytes]], cfg: SourceConfig) -> RawRecord:
    skey = make_key(key)
    img_ext = next((e for e in IMAGE_EXTS if e in parts), None)
    member = parts[img_ext][0] if img_ext else next(iter(parts.values()))[0]
    rec = RawRecord(key=skey, source_uri=f"{uri}#{member}", image=None, caption=None)
    if img_ext is None:
        rec.error, rec.error_reason = f"{skey}: no image member in {uri} (members: {sorted(parts)})", "missing_image"
    else:
        rec.image = parts[img_ext][1]
    if "json" in parts:
        _json_caption(rec, parts["json"][1], cfg.caption_encodings)
    if "txt" in parts:
        rec.caption = None
        _set_caption(rec, parts["txt"][1], cfg.caption_encodings)
    _missing_caption(rec, f"no caption member (.txt / .json) in {uri}")
    return rec


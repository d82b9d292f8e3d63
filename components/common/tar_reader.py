"""Webdataset tars read straight from their headers: the training reader's shards and the evaluation
suite's CLIP_benchmark tars.

Python's `tarfile` in streaming mode (what `webdataset.tarfile_to_samples` uses) parses every member
through several layers of Python objects: ~0.14 ms per sample of three members on one core, about an
eighth of what a training reader worker spends per sample. Here a member is one 512-byte header
(checksum verified; ustar, with PAX `path` records and GNU long names for names over 100 bytes, e.g.
non-ASCII keys), its data and its padding (~0.03 ms per sample). gzip, bz2 and xz tars are
decompressed on the fly, as `tarfile`'s "r|*" does. Samples come out as webdataset's dicts:
``{"__key__", "__url__", "<extension>": bytes, ...}``, grouped by key as webdataset groups them (the
key is the member's path up to the first dot of its file name; extensions in lower case).

A storage failure in the middle of a shard (one that the S3 reader's own ranged re-reads could not ride
out) does not change the sample stream: `shard_samples` re-opens the shard after a backoff and skips to
the sample where it stopped, so the caller sees every sample exactly once and in order (each resume is
logged, naming the shard and the sample, and counted in `RESUMES`). Only when the storage stays down past
the last attempt does the error reach the caller.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import tarfile
import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO

from components.common import storage
from components.common.storage import StorageError, StorageNotFound

log = logging.getLogger("clipflow.storage")

BLOCK = tarfile.BLOCKSIZE
COMPRESSED = ((b"\x1f\x8b", gzip.open), (b"BZh", bz2.open), (b"\xfd7zXZ\x00", lzma.open))  # magic -> reader of a file object
SKIPPED_TYPES = {b"5", b"1", b"2", b"3", b"4", b"6", b"7", b"g", b"K"}  # dirs, links, devices, global PAX, GNU link names
RESUME_ATTEMPTS = 6  # re-opens of a shard after storage failures (each after a backoff) before giving up
RESUME_BACKOFF_S = 1.0  # the first backoff; it doubles up to RESUME_BACKOFF_MAX_S (6 attempts: ~1 minute in all)
RESUME_BACKOFF_MAX_S = 30.0
RESUMES = {"count": 0}  # shard reads resumed in this process (the training reader reports it as a metric)


class ShardFormatError(ValueError):
    """A shard that is not a readable tar (truncated, or a header that does not parse)."""


def _read(stream: IO[bytes], n: int, url: str, what: str) -> bytes:
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise ShardFormatError(f"{url}: truncated tar ({what}: {n - left} of {n} bytes)")
        chunks.append(chunk)
        left -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _size(header: bytes, url: str) -> int:
    field = header[124:136]
    if field[0] & 0x80:  # GNU base-256 for sizes of 8 GiB and more
        return int.from_bytes(field[1:], "big")
    try:
        return int(field.rstrip(b"\0 ").lstrip(b" ") or b"0", 8)
    except ValueError:
        raise ShardFormatError(f"{url}: a tar header with an unreadable size field {field!r}") from None


def _check_header(header: bytes, url: str) -> None:
    """The header checksum: the sum of its bytes with the checksum field read as spaces."""
    field = header[148:156]
    try:
        matches = int(field.strip(b"\0 "), 8) == sum(header) - sum(field) + 8 * ord(" ")
    except ValueError:
        matches = False
    if not matches:
        raise ShardFormatError(f"{url}: not a tar, or a damaged one (a header's checksum does not match)")


def _pax_path(data: bytes) -> bytes | None:
    """The `path` record of a PAX extended header ("<length> <key>=<value>\\n" records)."""
    path, i = None, 0
    while i < len(data) and data[i] != 0:
        space = data.index(b" ", i)
        length = int(data[i:space])
        key, _, value = data[space + 1:i + length - 1].partition(b"=")
        if key == b"path":
            path = value
        i += length
    return path


def iter_members(stream: IO[bytes], url: str = "<stream>") -> Iterator[tuple[str, bytes]]:
    """(path, data) of every regular file in a tar stream, in order."""
    long_name: bytes | None = None
    while True:
        header = stream.read(BLOCK)
        if not header or header.count(0) == BLOCK:  # the end-of-archive blocks (or no archive trailer)
            return
        if len(header) < BLOCK:
            header += _read(stream, BLOCK - len(header), url, "a header")
        _check_header(header, url)
        size, kind = _size(header, url), header[156:157]
        data = _read(stream, size, url, "a member") if size else b""
        if size % BLOCK:
            _read(stream, BLOCK - size % BLOCK, url, "padding")
        if kind == b"x":  # PAX: the next member's attributes
            long_name = _pax_path(data) or long_name
            continue
        if kind == b"L":  # GNU: the next member's long name
            long_name = data.rstrip(b"\0")
            continue
        if kind in SKIPPED_TYPES:
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].split(b"\0", 1)[0]
            prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
            if prefix:
                name = prefix + b"/" + name
        yield name.decode("utf-8", "surrogateescape"), data  # as tarfile decodes names


def _decompressed(stream: IO[bytes]) -> IO[bytes]:
    """`stream` itself, or a reader decompressing it when it starts like a gzip, bz2 or xz file."""
    head = stream.peek(6)[:6]  # type: ignore[attr-defined]  (storage.open_read's readers are buffered)
    return next((reader(stream) for magic, reader in COMPRESSED if head.startswith(magic)), stream)


def member_key(path: str) -> tuple[str, str]:
    """webdataset's convention: (key, extension) = (the path up to the first dot of the file name, the
    rest in lower case); a name without a dot has extension ""."""
    directory, _, name = path.rpartition("/")
    stem, _, extension = name.partition(".")
    return (f"{directory}/{stem}" if directory else stem), extension.lower()


@contextmanager
def open_tar(url: str) -> Iterator[IO[bytes]]:
    """A tar's bytes (local or s3://, streamed through `storage.open_read`), decompressed when it is a
    gzip, bz2 or xz file: what `iter_members` reads."""
    with storage.open_read(url) as raw, _decompressed(raw) as stream:
        yield stream


def group_members(members: Iterable[tuple[str, bytes]], url: str) -> Iterator[dict]:
    """(path, data) members in tar order -> webdataset's samples, members grouped by key; a member without
    an extension is not a sample member (webdataset skips these too)."""
    sample: dict | None = None
    for path, data in members:
        key, extension = member_key(path)
        if not extension:
            continue
        if sample is None or sample["__key__"] != key:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        sample[extension] = data
    if sample is not None:
        yield sample


def _samples(url: str) -> Iterator[dict]:
    try:
        with open_tar(url) as stream:
            yield from group_members(iter_members(stream, url), url)
    except (EOFError, zlib.error, lzma.LZMAError) as exc:
        raise ShardFormatError(f"{url}: damaged compressed tar ({exc})") from exc


def _transient(exc: BaseException) -> bool:
    """A failure of the storage, not of the object: worth re-opening the shard for."""
    return isinstance(exc, (StorageError, ConnectionError, TimeoutError)) and not isinstance(
        exc, (StorageNotFound, FileNotFoundError, PermissionError))


def shard_samples(url: str, skip: int = 0) -> Iterator[dict]:
    """The samples of one tar (local or s3://, read through `storage.open_read`) as webdataset's dicts,
    members grouped by key, from sample number ``skip`` on (the ones before are parsed, not returned). A
    transient storage failure re-opens the shard and continues at the sample where it stopped (see the
    module docstring). A damaged compressed stream raises `ShardFormatError` too."""
    done, attempt = 0, 0  # samples returned; re-opens so far
    while True:
        try:
            for i, sample in enumerate(_samples(url)):
                if i >= skip + done:
                    yield sample
                    done += 1
            return
        except Exception as exc:
            if not _transient(exc) or attempt >= RESUME_ATTEMPTS:
                raise
            attempt += 1
            RESUMES["count"] += 1
            wait = min(RESUME_BACKOFF_S * 2 ** (attempt - 1), RESUME_BACKOFF_MAX_S)
            log.warning("shard %s: storage failed after sample %d (%s: %s); re-opening it in %.1f s and resuming "
                        "at that sample (attempt %d of %d)", url, skip + done, type(exc).__name__, exc, wait,
                        attempt, RESUME_ATTEMPTS)
            time.sleep(wait)

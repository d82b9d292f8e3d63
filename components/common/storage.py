"""Storage I/O: the one place that talks to the object store.

A URI is either a local path or ``s3://bucket/key`` (S3 through `components.common.s3`: boto3 with an
optional endpoint, e.g. AWS, SeaweedFS, MinIO, Ceph, moto on loopback). Large files go through boto3's
managed multipart transfer.

Every S3 failure is raised as :class:`StorageError` naming the URI, the endpoint and the cause
(missing bucket, missing key, rejected credentials, unreachable or silent endpoint); a missing object is
:class:`StorageNotFound`, which is also a ``FileNotFoundError``. Every S3 call has an overall deadline
and logs its retries (`components.common.s3_retry`); `check_writable` is the fast preflight check.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any, BinaryIO

from components.common.s3 import (MULTIPART_THRESHOLD, SHA256_META, BodyReader, BucketNotFound, MiB,  # noqa: F401 - re-exported
                                  StorageError, StorageNotFound, check_access, client, endpoint_url, ensure_bucket,
                                  head, is_s3, pyarrow_filesystem, split_s3, transfer_config, translate_errors, where)
from components.common.s3_retry import RetryPolicy  # noqa: F401 - re-exported

# --------------------------------------------------------------------------- URIs

def join(uri: str, *parts: str) -> str:
    """Join path components onto a local path or an s3:// URI."""
    if is_s3(uri):
        out = uri.rstrip("/")
        for p in parts:
            p = str(p).strip("/")
            if p:
                out = f"{out}/{p}"
        return out
    return os.path.join(uri, *[str(p) for p in parts])


def _local_missing(uri: str, op: str) -> StorageNotFound:
    return StorageNotFound(f"{op} {uri}: no such file")



def check_writable(uri: str) -> None:
    """Fail fast (seconds, not minutes) unless ``uri`` can be written: for s3:// the endpoint answers, the
    bucket exists and the credentials may write there (`s3.check_access`); locally the directory can be
    created and written. Raises StorageError naming the endpoint or the path."""
    if is_s3(uri):
        check_access(uri)
        return
    try:
        os.makedirs(uri, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=uri, prefix=".clipflow-preflight-"):
            pass
    except OSError as e:
        raise StorageError(f"check {uri}: cannot write there ({e})") from e


# --------------------------------------------------------------------------- bytes / text / json

def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        b, k = split_s3(uri)
        with translate_errors(uri, "read"):
            return client().get_object(Bucket=b, Key=k)["Body"].read()
    try:
        with open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise _local_missing(uri, "read") from None


TMP_PREFIX = ".tmp-"  # a local atomic write's temporary file, renamed into place once whole


def _atomic_local_write(path: str, write) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=TMP_PREFIX, suffix="-" + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` (atomically: readers see the old object or the whole new one)."""
    if is_s3(uri):
        b, k = split_s3(uri)
        with translate_errors(uri, "write"):
            client().put_object(Bucket=b, Key=k, Body=data)
        return
    _atomic_local_write(uri, lambda f: f.write(data))


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    try:
        return json.loads(read_text(uri))
    except json.JSONDecodeError as e:
        raise ValueError(f"{uri}: not valid JSON ({e})") from e


def write_json(uri: str, obj: Any, indent: int | None = 2) -> None:
    write_text(uri, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- metadata

def exists(uri: str) -> bool:
    """Whether the object / file exists (a missing *bucket* raises BucketNotFound)."""
    if is_s3(uri):
        return head(uri) is not None
    return os.path.exists(uri)


def size(uri: str) -> int:
    if is_s3(uri):
        h = head(uri)
        if h is None:
            raise StorageNotFound(f"size {uri}: no such object (at {where()})")
        return int(h["ContentLength"])
    try:
        return os.path.getsize(uri)
    except FileNotFoundError:
        raise _local_missing(uri, "size") from None


def sha256_file(path: str) -> str:
    """sha256 hex digest of a local file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256(uri: str) -> str:
    """sha256 of an object or file: for S3 the value recorded at upload (``x-amz-meta-sha256``)
    when present, else computed by streaming the object."""
    if not is_s3(uri):
        if not os.path.exists(uri):
            raise _local_missing(uri, "sha256")
        return sha256_file(uri)
    h = head(uri)
    if h is None:
        raise StorageNotFound(f"sha256 {uri}: no such object (at {where()})")
    recorded = (h.get("Metadata") or {}).get(SHA256_META)
    if recorded:
        return recorded
    digest = hashlib.sha256()
    with open_read(uri) as f:
        for chunk in iter(lambda: f.read(4 * MiB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_files(prefix: str) -> list[str]:
    """All files below the directory ``prefix`` (recursively), sorted, as full URIs / paths.
    A missing local directory or empty S3 prefix gives []. A local write's temporary file (a process killed
    mid-write leaves one behind) is not a file of the folder: it is not listed."""
    if is_s3(prefix):
        return [uri for uri, _size in list_sizes(prefix)]
    if os.path.isfile(prefix):
        return [prefix]
    out = []
    for root, _dirs, files in os.walk(prefix):
        out += [os.path.join(root, f) for f in files if not f.startswith(TMP_PREFIX)]
    return sorted(out)


def list_sizes(prefix: str) -> list[tuple[str, int]]:
    """(URI / path, size in bytes) of every file below ``prefix``, sorted as `list_files`; the sizes come
    with the listing (no request per object)."""
    if is_s3(prefix):
        b, k = split_s3(prefix)
        if k and not k.endswith("/"):
            k += "/"
        out: list[tuple[str, int]] = []
        with translate_errors(prefix, "list"):
            for page in client().get_paginator("list_objects_v2").paginate(Bucket=b, Prefix=k):
                out += [(f"s3://{b}/{o['Key']}", int(o["Size"])) for o in page.get("Contents", [])
                        if not o["Key"].endswith("/")]
        return sorted(out)
    return [(path, os.path.getsize(path)) for path in list_files(prefix)]


def delete(uri: str) -> None:
    """Delete an object / file; deleting something missing is not an error."""
    if is_s3(uri):
        b, k = split_s3(uri)
        with translate_errors(uri, "delete"):
            client().delete_object(Bucket=b, Key=k)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(uri)


# --------------------------------------------------------------------------- streams and files

def open_read(uri: str, buffer_size: int = 1 * MiB) -> BinaryIO:
    """A binary, buffered, streaming reader (an S3 object is not downloaded up front; dropped
    connections are resumed where they broke off)."""
    if is_s3(uri):
        return io.BufferedReader(BodyReader(uri), buffer_size=buffer_size)
    try:
        return open(uri, "rb", buffering=buffer_size)
    except FileNotFoundError:
        raise _local_missing(uri, "open") from None


def upload_file(local: str, uri: str, sha256: str | None = None,
                multipart_threshold: int | None = None, multipart_chunksize: int | None = None) -> None:
    """Copy a local file to ``uri``; above ``multipart_threshold`` bytes S3 gets a multipart upload.
    ``sha256`` (when given) is recorded as object metadata so :func:`sha256` needs no download.
    The object appears only when complete (S3 semantics; local copies go through a rename)."""
    if not os.path.isfile(local):
        raise _local_missing(local, "upload")
    if is_s3(uri):
        b, k = split_s3(uri)
        extra = {"Metadata": {SHA256_META: sha256}} if sha256 else None
        with translate_errors(uri, "upload"):
            client().upload_file(local, b, k, ExtraArgs=extra,
                                  Config=transfer_config(multipart_threshold, multipart_chunksize))
        return
    if os.path.abspath(local) == os.path.abspath(uri):
        return
    _atomic_local_write(uri, lambda f: _copy_into(local, f))


def _copy_into(src: str, dst_file) -> None:
    with open(src, "rb") as f:
        shutil.copyfileobj(f, dst_file, 4 * MiB)


def download_file(uri: str, local: str) -> None:
    if is_s3(uri):
        b, k = split_s3(uri)
        os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
        with translate_errors(uri, "download"):
            client().download_file(b, k, local, Config=transfer_config())
        return
    if not os.path.isfile(uri):
        raise _local_missing(uri, "download")
    if os.path.abspath(local) != os.path.abspath(uri):
        _atomic_local_write(local, lambda f: _copy_into(uri, f))


def _relative(uri: str, prefix: str) -> str:
    if is_s3(prefix):
        return uri[len(prefix.rstrip("/")) + 1:]
    return os.path.relpath(uri, prefix)


def download_dir(prefix: str, local_dir: str) -> list[str]:
    """Copy every file below ``prefix`` into ``local_dir`` (keeping relative paths)."""
    out = []
    for uri in list_files(prefix):
        dst = os.path.join(local_dir, *_relative(uri, prefix).split("/"))
        download_file(uri, dst)
        out.append(dst)
    return out


def upload_dir(local_dir: str, prefix: str) -> list[str]:
    """Copy every file below ``local_dir`` to ``prefix`` (keeping relative paths)."""
    out = []
    for path in list_files(local_dir):
        rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
        dst = join(prefix, rel) if is_s3(prefix) else os.path.join(prefix, rel)
        upload_file(path, dst)
        out.append(dst)
    return out


@contextlib.contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local path for ``uri``: the path itself, or a temporary download removed afterwards."""
    if not is_s3(uri):
        if not os.path.exists(uri):
            raise _local_missing(uri, "open")
        yield uri
        return
    with tempfile.TemporaryDirectory(prefix="storage-") as d:
        path = os.path.join(d, os.path.basename(split_s3(uri)[1]) or "object")
        download_file(uri, path)
        yield path



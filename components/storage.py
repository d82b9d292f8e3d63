"""Storage I/O: the one place that talks to the object store.

A URI is either a local path or ``s3://bucket/key``. S3 goes through boto3 with an optional
endpoint (AWS, SeaweedFS, MinIO, Ceph, moto on loopback) taken from ``AWS_ENDPOINT_URL`` (or
``S3_ENDPOINT_URL``), credentials from the standard AWS variables, path-style addressing, and
checksums only "when required" (boto3 >= 1.36 sends CRC checksums by default, which several
S3-compatible stores reject). Large files go through boto3's managed multipart transfer.

Every S3 failure is raised as :class:`StorageError` naming the URI, the endpoint and the cause
(missing bucket, missing key, rejected credentials, unreachable endpoint); a missing object is
:class:`StorageNotFound`, which is also a ``FileNotFoundError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from typing import Any, BinaryIO
from urllib.parse import urlparse

import boto3
import urllib3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

MiB = 1024 * 1024
MULTIPART_THRESHOLD = 64 * MiB  # files above this go up in parts
MULTIPART_CHUNKSIZE = 16 * MiB  # S3 needs >= 5 MiB per part (except the last)
MAX_CONCURRENCY = 8
SHA256_META = "sha256"  # user metadata key (x-amz-meta-sha256) recorded by upload_file

_ACCESS_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden",
                 "InvalidToken", "ExpiredToken", "InvalidClientTokenId", "AuthorizationHeaderMalformed"}


class StorageError(OSError):
    """A storage operation failed; the message names the URI, the endpoint and the cause."""


class StorageNotFound(StorageError, FileNotFoundError):
    """The object (or local file) does not exist."""


class BucketNotFound(StorageNotFound):
    """The bucket itself does not exist at the endpoint."""


# --------------------------------------------------------------------------- URIs

def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


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


# --------------------------------------------------------------------------- client

def endpoint_url() -> str | None:
    """The S3 endpoint in use (None = AWS's default)."""
    return os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()


def _after_fork_in_child() -> None:  # a lock held by another thread at fork() would never be released
    global _clients_lock
    _clients_lock = threading.Lock()
    _clients.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _client():
    """One boto3 S3 client per process and endpoint/credentials (boto3 clients are thread-safe,
    not fork-safe: the process id is part of the cache key)."""
    key = (os.getpid(), endpoint_url(), _region(), os.environ.get("AWS_ACCESS_KEY_ID"),
           os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_SESSION_TOKEN"),
           os.environ.get("AWS_PROFILE"))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            config = Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 5, "mode": "standard"},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                connect_timeout=10,
                read_timeout=120,
                max_pool_connections=max(10, MAX_CONCURRENCY * 2),
            )
            session = boto3.session.Session(region_name=_region())
            client = session.client("s3", endpoint_url=endpoint_url(), config=config)
            _clients[key] = client
        return client


def _where() -> str:
    return f"endpoint {endpoint_url() or 'AWS default'}"


def _error(uri: str, op: str, exc: BaseException) -> StorageError:
    """Translate a boto3/botocore exception into a StorageError with a clear message."""
    bucket = split_s3(uri)[0] if is_s3(uri) else ""
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{op} {uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                            f"AWS_SECRET_ACCESS_KEY) for {_where()}")
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"{op} {uri}: cannot connect to {_where()}: {exc}")
    code, msg = "", str(exc)
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        msg = err.get("Message") or msg
        if not code:
            code = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    elif isinstance(exc, S3UploadFailedError):  # wraps the ClientError's text
        for c in ("NoSuchBucket", *_ACCESS_CODES):
            if f"({c})" in msg:
                code = c
                break
    if code == "NoSuchBucket" or (code in ("404", "NotFound") and bucket and not _bucket_exists(bucket)):
        return BucketNotFound(f"{op} {uri}: bucket '{bucket}' does not exist at {_where()}")
    if code in ("NoSuchKey", "404", "NotFound"):
        return StorageNotFound(f"{op} {uri}: no such object (bucket '{bucket}' at {_where()})")
    if code in _ACCESS_CODES:
        return StorageError(f"{op} {uri}: credentials rejected by {_where()} ({code}: {msg}); check "
                            f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    return StorageError(f"{op} {uri}: failed at {_where()}: {code + ': ' if code else ''}{msg}")


def _bucket_exists(bucket: str) -> bool:
    try:
        _client().head_bucket(Bucket=bucket)
        return True
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        return code not in ("404", "NoSuchBucket", "NotFound")
    except BotoCoreError:
        return True  # cannot tell; do not claim it is missing


@contextlib.contextmanager
def _s3_errors(uri: str, op: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except (ClientError, BotoCoreError, S3UploadFailedError) as e:
        raise _error(uri, op, e) from e


def _local_missing(uri: str, op: str) -> StorageNotFound:
    return StorageNotFound(f"{op} {uri}: no such file")


def ensure_bucket(bucket: str) -> None:
    """Create ``bucket`` unless it exists (for local setups and tests)."""
    uri = f"s3://{bucket}"
    if _bucket_exists(bucket):
        return
    with _s3_errors(uri, "create bucket"):
        try:
            _client().create_bucket(Bucket=bucket)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise


# --------------------------------------------------------------------------- bytes / text / json

def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        b, k = split_s3(uri)
        with _s3_errors(uri, "read"):
            return _client().get_object(Bucket=b, Key=k)["Body"].read()
    try:
        with open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise _local_missing(uri, "read") from None


def _atomic_local_write(path: str, write) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix="-" + os.path.basename(path))
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
        with _s3_errors(uri, "write"):
            _client().put_object(Bucket=b, Key=k, Body=data)
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

def _head(uri: str) -> dict | None:
    b, k = split_s3(uri)
    try:
        return _client().head_object(Bucket=b, Key=k)
    except ClientError as e:
        err = _error(uri, "stat", e)
        if isinstance(err, StorageNotFound) and not isinstance(err, BucketNotFound):
            return None  # missing key in an existing bucket
        raise err from e
    except BotoCoreError as e:
        raise _error(uri, "stat", e) from e


def exists(uri: str) -> bool:
    """Whether the object / file exists (a missing *bucket* raises BucketNotFound)."""
    if is_s3(uri):
        return _head(uri) is not None
    return os.path.exists(uri)


def size(uri: str) -> int:
    if is_s3(uri):
        h = _head(uri)
        if h is None:
            raise StorageNotFound(f"size {uri}: no such object (at {_where()})")
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
    h = _head(uri)
    if h is None:
        raise StorageNotFound(f"sha256 {uri}: no such object (at {_where()})")
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
    A missing local directory or empty S3 prefix gives []."""
    if is_s3(prefix):
        b, k = split_s3(prefix)
        if k and not k.endswith("/"):
            k += "/"
        out: list[str] = []
        with _s3_errors(prefix, "list"):
            for page in _client().get_paginator("list_objects_v2").paginate(Bucket=b, Prefix=k):
                out += [f"s3://{b}/{o['Key']}" for o in page.get("Contents", [])
                        if not o["Key"].endswith("/")]
        return sorted(out)
    if os.path.isfile(prefix):
        return [prefix]
    out = []
    for root, _dirs, files in os.walk(prefix):
        out += [os.path.join(root, f) for f in files]
    return sorted(out)


def delete(uri: str) -> None:
    """Delete an object / file; deleting something missing is not an error."""
    if is_s3(uri):
        b, k = split_s3(uri)
        with _s3_errors(uri, "delete"):
            _client().delete_object(Bucket=b, Key=k)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(uri)


# --------------------------------------------------------------------------- streams and files

class _BodyReader(io.RawIOBase):
    """A raw stream over an S3 object's body. A connection dropped mid-stream (long reads of a shard
    by a slow consumer) is resumed with a ranged GET from the current offset, pinned to the object's
    ETag so a concurrently replaced object fails instead of mixing versions."""

    RETRIES = 3

    def __init__(self, uri: str):
        self._uri = uri
        self._bucket, self._key = split_s3(uri)
        self._pos = 0
        with _s3_errors(uri, "open"):
            resp = _client().get_object(Bucket=self._bucket, Key=self._key)
        self._body, self._etag = resp["Body"], resp.get("ETag")
        self._size = int(resp.get("ContentLength", -1))

    def readable(self) -> bool:
        return True

    def _reopen(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        kw = {"IfMatch": self._etag} if self._etag else {}
        with _s3_errors(self._uri, "resume read"):
            resp = _client().get_object(Bucket=self._bucket, Key=self._key, Range=f"bytes={self._pos}-", **kw)
        self._body = resp["Body"]

    def readinto(self, b) -> int:
        if 0 <= self._size <= self._pos:
            return 0
        for attempt in range(self.RETRIES + 1):
            try:
                data = self._body.read(len(b))
                break
            except (BotoCoreError, urllib3.exceptions.HTTPError, OSError) as e:
                if attempt == self.RETRIES:
                    raise StorageError(f"read {self._uri}: connection lost at byte {self._pos} "
                                       f"{self.RETRIES + 1} times ({type(e).__name__}: {e})") from e
                self._reopen()
        n = len(data)
        b[:n] = data
        self._pos += n
        return n

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self._body.close()
        super().close()


def open_read(uri: str, buffer_size: int = 1 * MiB) -> BinaryIO:
    """A binary, buffered, streaming reader (an S3 object is not downloaded up front; dropped
    connections are resumed where they broke off)."""
    if is_s3(uri):
        return io.BufferedReader(_BodyReader(uri), buffer_size=buffer_size)
    try:
        return open(uri, "rb")
    except FileNotFoundError:
        raise _local_missing(uri, "open") from None


def transfer_config(multipart_threshold: int | None = None,
                    multipart_chunksize: int | None = None) -> TransferConfig:
    return TransferConfig(multipart_threshold=multipart_threshold or MULTIPART_THRESHOLD,
                          multipart_chunksize=multipart_chunksize or MULTIPART_CHUNKSIZE,
                          max_concurrency=MAX_CONCURRENCY, use_threads=True)


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
        with _s3_errors(uri, "upload"):
            _client().upload_file(local, b, k, ExtraArgs=extra,
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
        with _s3_errors(uri, "download"):
            _client().download_file(b, k, local, Config=transfer_config())
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


# --------------------------------------------------------------------------- pyarrow (Ray Train)

def pyarrow_filesystem(uri: str):
    """``(pyarrow.fs.FileSystem, path)`` for ``uri``: an S3FileSystem pointed at our endpoint with
    path ``bucket/key`` (pyarrow ignores AWS_ENDPOINT_URL), or the local filesystem and an
    absolute path. Pass them as Ray Train's ``RunConfig(storage_filesystem=..., storage_path=...)``."""
    import pyarrow.fs as pafs

    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    b, k = split_s3(uri)
    kw: dict[str, Any] = {"region": _region()}
    ep = endpoint_url()
    if ep:
        parsed = urlparse(ep if "://" in ep else f"https://{ep}")
        kw["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kw["scheme"] = parsed.scheme or "https"
        kw["force_virtual_addressing"] = False
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        kw["access_key"] = os.environ["AWS_ACCESS_KEY_ID"]
        kw["secret_key"] = os.environ["AWS_SECRET_ACCESS_KEY"]
        if os.environ.get("AWS_SESSION_TOKEN"):
            kw["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kw), f"{b}/{k}".rstrip("/")

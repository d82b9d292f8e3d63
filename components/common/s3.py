"""The S3 side of storage: one boto3 client per process, errors that name the culprit, resumable reads.

Only `components.common.storage` imports this module; everything else goes through storage's URI API.
The client uses the endpoint from ``AWS_ENDPOINT_URL`` (or ``S3_ENDPOINT_URL``), the standard AWS
credential variables, path-style addressing, and checksums only "when required" (boto3 >= 1.36 sends
CRC checksums by default, which several S3-compatible stores reject). Every call has a deadline and
logs its retries (`components.common.s3_retry`).
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlparse

import boto3
import urllib3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, ConnectTimeoutError, EndpointConnectionError,
                                 NoCredentialsError, ReadTimeoutError)

from components.common.s3_retry import RetryPolicy, log

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


def client(policy: RetryPolicy | None = None):
    """One boto3 S3 client per process, endpoint/credentials and retry policy (boto3 clients are
    thread-safe, not fork-safe: the process id is part of the cache key). `policy` defaults to
    `RetryPolicy.from_env()`."""
    policy = policy or RetryPolicy.from_env()
    key = (os.getpid(), endpoint_url(), _region(), os.environ.get("AWS_ACCESS_KEY_ID"),
           os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_SESSION_TOKEN"),
           os.environ.get("AWS_PROFILE"), policy)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            config = Config(
                s3={"addressing_style": "path"},
                retries={"total_max_attempts": 1, "mode": "standard"},  # the policy decides about retries
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
                connect_timeout=policy.connect_timeout_s,
                read_timeout=policy.read_timeout_s,
                max_pool_connections=max(10, MAX_CONCURRENCY * 2),
            )
            session = boto3.session.Session(region_name=_region())
            client = session.client("s3", endpoint_url=endpoint_url(), config=config)
            policy.install(client, where())
            _clients[key] = client
        return client


def where() -> str:
    return f"endpoint {endpoint_url() or 'AWS default'}"


def _error(uri: str, op: str, exc: BaseException) -> StorageError:
    """Translate a boto3/botocore exception into a StorageError with a clear message."""
    bucket = split_s3(uri)[0] if is_s3(uri) else ""
    if isinstance(exc, NoCredentialsError):
        return StorageError(f"{op} {uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID and "
                            f"AWS_SECRET_ACCESS_KEY) for {where()}")
    if isinstance(exc, EndpointConnectionError):
        return StorageError(f"{op} {uri}: cannot connect to {where()}: {exc}")
    if isinstance(exc, ConnectTimeoutError):
        return StorageError(f"{op} {uri}: cannot connect to {where()} (no answer to the connection: {exc})")
    if isinstance(exc, ReadTimeoutError):
        return StorageError(f"{op} {uri}: {where()} accepts connections but does not answer ({exc}): check "
                            "the endpoint URL and the object store's health")
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
        return BucketNotFound(f"{op} {uri}: bucket '{bucket}' does not exist at {where()}")
    if code in ("NoSuchKey", "404", "NotFound"):
        return StorageNotFound(f"{op} {uri}: no such object (bucket '{bucket}' at {where()})")
    if code in _ACCESS_CODES:
        return StorageError(f"{op} {uri}: credentials rejected by {where()} ({code}: {msg}); check "
                            f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    return StorageError(f"{op} {uri}: failed at {where()}: {code + ': ' if code else ''}{msg}")


def _bucket_exists(bucket: str) -> bool:
    try:
        client().head_bucket(Bucket=bucket)
        return True
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        return code not in ("404", "NoSuchBucket", "NotFound")
    except BotoCoreError:
        return True  # cannot tell; do not claim it is missing


@contextlib.contextmanager
def translate_errors(uri: str, op: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except (ClientError, BotoCoreError, S3UploadFailedError) as e:
        raise _error(uri, op, e) from e


def ensure_bucket(bucket: str) -> None:
    """Create ``bucket`` unless it exists (for local setups and tests)."""
    uri = f"s3://{bucket}"
    if _bucket_exists(bucket):
        return
    with translate_errors(uri, "create bucket"):
        try:
            client().create_bucket(Bucket=bucket)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise


PREFLIGHT = RetryPolicy(deadline_s=15.0, connect_timeout_s=3.0, read_timeout_s=5.0)


def check_access(uri: str, policy: RetryPolicy = PREFLIGHT) -> None:
    """Fail fast, naming the endpoint, unless the endpoint answers, the bucket exists, and the credentials
    may list and write under ``uri`` (a probe object is written and deleted). Ends within
    ``policy.deadline_s`` per request."""
    bucket, key = split_s3(uri)
    c = client(policy)
    try:
        c.head_bucket(Bucket=bucket)
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise BucketNotFound(f"check {uri}: bucket '{bucket}' does not exist at {where()}") from e
        raise _error(uri, "check", e) from e
    except BotoCoreError as e:
        raise _error(uri, "check", e) from e
    probe = f"{key.rstrip('/')}/_clipflow_preflight".lstrip("/")
    with translate_errors(f"s3://{bucket}/{probe}", "check (write)"):
        c.put_object(Bucket=bucket, Key=probe, Body=b"clipflow preflight\n")
        c.delete_object(Bucket=bucket, Key=probe)


def head(uri: str) -> dict | None:
    b, k = split_s3(uri)
    try:
        return client().head_object(Bucket=b, Key=k)
    except ClientError as e:
        err = _error(uri, "stat", e)
        if isinstance(err, StorageNotFound) and not isinstance(err, BucketNotFound):
            return None  # missing key in an existing bucket
        raise err from e
    except BotoCoreError as e:
        raise _error(uri, "stat", e) from e



class BodyReader(io.RawIOBase):
    """A raw stream over an S3 object's body. A connection dropped mid-stream (long reads of a shard
    by a slow consumer) is resumed with a ranged GET from the current offset, pinned to the object's
    ETag so a concurrently replaced object fails instead of mixing versions."""

    RETRIES = 3

    def __init__(self, uri: str):
        self._uri = uri
        self._bucket, self._key = split_s3(uri)
        self._pos = 0
        with translate_errors(uri, "open"):
            resp = client().get_object(Bucket=self._bucket, Key=self._key)
        self._body, self._etag = resp["Body"], resp.get("ETag")
        self._size = int(resp.get("ContentLength", -1))

    def readable(self) -> bool:
        return True

    def _reopen(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        kw = {"IfMatch": self._etag} if self._etag else {}
        with translate_errors(self._uri, "resume read"):
            resp = client().get_object(Bucket=self._bucket, Key=self._key, Range=f"bytes={self._pos}-", **kw)
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
                log.warning("S3 read %s at %s: connection lost at byte %d (%s: %s); resuming (%d of %d)",
                            self._uri, where(), self._pos, type(e).__name__, e, attempt + 1, self.RETRIES)
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


def transfer_config(multipart_threshold: int | None = None,
                    multipart_chunksize: int | None = None) -> TransferConfig:
    return TransferConfig(multipart_threshold=multipart_threshold or MULTIPART_THRESHOLD,
                          multipart_chunksize=multipart_chunksize or MULTIPART_CHUNKSIZE,
                          max_concurrency=MAX_CONCURRENCY, use_threads=True)



# --------------------------------------------------------------------------- pyarrow (Ray Train)

def pyarrow_filesystem(uri: str):
    """``(pyarrow.fs.FileSystem, path)`` for ``uri``: an S3FileSystem pointed at our endpoint with
    path ``bucket/key`` (pyarrow ignores AWS_ENDPOINT_URL), or the local filesystem and an
    absolute path. Pass them as Ray Train's ``RunConfig(storage_filesystem=..., storage_path=...)``."""
    import pyarrow.fs as pafs

    if not is_s3(uri):
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    b, k = split_s3(uri)
    policy = RetryPolicy.from_env()  # per-request timeouts as for boto3; pyarrow retries by count (AWS standard)
    kw: dict[str, Any] = {"region": _region(), "connect_timeout": policy.connect_timeout_s,
                          "request_timeout": policy.read_timeout_s,
                          "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=8)}
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

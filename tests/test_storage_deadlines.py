"""S3 calls end by their deadline, name the endpoint and log their retries; retries still ride out a
store that drops its first connections. Endpoints are on 127.0.0.1 (tests/net_helpers.py)."""

from __future__ import annotations

import logging
import time
from urllib.parse import urlparse

import pytest

from components.common import storage
from tests.net_helpers import FlakyProxy, SilentServer, refused_endpoint

DEADLINE_S = 4.0


@pytest.fixture
def short_deadline(monkeypatch, s3_server):
    """A 4 s deadline with 1 s attempts (the defaults are 120 s and 5 + 30 s), dummy credentials."""
    monkeypatch.setenv("CLIPFLOW_S3_DEADLINE_S", str(DEADLINE_S))
    monkeypatch.setenv("CLIPFLOW_S3_CONNECT_TIMEOUT_S", "1")
    monkeypatch.setenv("CLIPFLOW_S3_READ_TIMEOUT_S", "1")


def point_at(monkeypatch, url: str) -> None:
    for var in ("AWS_ENDPOINT_URL", "S3_ENDPOINT_URL"):
        monkeypatch.setenv(var, url)


def retries_logged(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "clipflow.storage" and r.levelno == logging.WARNING]


def test_refused_endpoint_fails_by_the_deadline_naming_it(short_deadline, monkeypatch, caplog):
    url = refused_endpoint()
    point_at(monkeypatch, url)
    caplog.set_level(logging.WARNING, "clipflow.storage")
    t = time.monotonic()
    with pytest.raises(storage.StorageError, match=f"cannot connect to endpoint {url}"):
        storage.exists("s3://some-bucket/some/key")
    assert time.monotonic() - t <= DEADLINE_S + 1
    lines = retries_logged(caplog)
    assert any("retrying in" in ln and url in ln and "HeadObject s3://some-bucket/some/key" in ln for ln in lines)
    assert "giving up" in lines[-1]


def test_silent_endpoint_fails_by_the_deadline_naming_it(short_deadline, monkeypatch, caplog):
    with SilentServer() as silent:
        point_at(monkeypatch, silent.url)
        caplog.set_level(logging.WARNING, "clipflow.storage")
        t = time.monotonic()
        with pytest.raises(storage.StorageError, match=f"endpoint {silent.url} accepts connections but does not answer"):
            storage.read_bytes("s3://some-bucket/key.bin")
        took = time.monotonic() - t
    assert 1 <= took <= DEADLINE_S + 1, took  # waited for the answer, then gave up on time
    assert any("ReadTimeoutError" in ln for ln in retries_logged(caplog))


def test_retries_ride_out_dropped_connections(short_deadline, s3_server, bucket, monkeypatch, caplog):
    uri = f"s3://{bucket}/flaky/object.bin"
    storage.write_bytes(uri, b"payload")
    with FlakyProxy(urlparse(s3_server).port, drop_first=2) as proxy:
        point_at(monkeypatch, proxy.url)
        caplog.set_level(logging.WARNING, "clipflow.storage")
        assert storage.read_bytes(uri) == b"payload"
        assert proxy.dropped == 2
    lines = retries_logged(caplog)
    assert len([ln for ln in lines if "retrying in" in ln]) == 2 and not any("giving up" in ln for ln in lines)


def test_preflight_check_names_the_culprit(s3_server, bucket, monkeypatch, tmp_path):
    storage.check_writable(f"s3://{bucket}/runs")  # reachable, bucket present, writable
    assert storage.list_files(f"s3://{bucket}/runs") == []  # the probe object is gone
    storage.check_writable(str(tmp_path / "local" / "runs"))
    with pytest.raises(storage.BucketNotFound, match=f"bucket 'no-such-bucket' does not exist at endpoint {s3_server}"):
        storage.check_writable("s3://no-such-bucket/runs")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(storage.StorageError, match="cannot write there"):
        storage.check_writable(str(blocker / "runs"))


@pytest.mark.parametrize("kind", ["refused", "silent"])
def test_preflight_fails_within_30_s_on_a_dead_endpoint(kind, s3_server, monkeypatch):
    """The preflight's own policy (15 s deadline, 3 + 5 s attempts), not the test's short one."""
    silent = SilentServer() if kind == "silent" else None
    url = silent.url if silent else refused_endpoint()
    point_at(monkeypatch, url)
    t = time.monotonic()
    try:
        with pytest.raises(storage.StorageError, match=f"endpoint {url}"):
            storage.check_writable("s3://clip-data/runs")
    finally:
        if silent:
            silent.close()
    assert time.monotonic() - t < 30

"""components/common/storage.py against the local filesystem and a loopback S3 (moto) server."""

from __future__ import annotations

import os

import pytest

from components.common import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("bucket")
    return f"s3://{bucket}/prefix"


def test_round_trips(root, tmp_path):
    a = storage.join(root, "dir", "a.bin")
    storage.write_bytes(a, b"\x00\x01hello")
    assert storage.read_bytes(a) == b"\x00\x01hello"
    assert storage.exists(a) and storage.size(a) == 7
    assert not storage.exists(storage.join(root, "dir", "nope.bin"))

    t = storage.join(root, "t.txt")
    storage.write_text(t, "héllo")
    assert storage.read_text(t) == "héllo"
    j = storage.join(root, "dir", "sub", "x.json")
    storage.write_json(j, {"b": [1, 2], "a": None})
    assert storage.read_json(j) == {"a": None, "b": [1, 2]}

    assert storage.list_files(root) == sorted([a, t, j])
    assert storage.list_files(storage.join(root, "dir")) == sorted([a, j])
    assert storage.list_files(storage.join(root, "missing")) == []

    with storage.open_read(a) as f:
        assert f.read(2) == b"\x00\x01" and f.read() == b"hello"

    local = tmp_path / "up.bin"
    local.write_bytes(os.urandom(3000))
    dst = storage.join(root, "up", "up.bin")
    digest = storage.sha256_file(str(local))
    storage.upload_file(str(local), dst, sha256=digest)
    assert storage.size(dst) == 3000 and storage.sha256(dst) == digest
    storage.download_file(dst, str(tmp_path / "down.bin"))
    assert (tmp_path / "down.bin").read_bytes() == local.read_bytes()

    storage.delete(dst)
    assert not storage.exists(dst)
    storage.delete(dst)  # idempotent


def test_dir_round_trip(root, tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "top.txt").write_text("top")
    (src / "a" / "b" / "deep.bin").write_bytes(b"deep")
    uploaded = storage.upload_dir(str(src), storage.join(root, "tree"))
    assert len(uploaded) == 2
    got = storage.download_dir(storage.join(root, "tree"), str(tmp_path / "back"))
    assert sorted(os.path.relpath(p, tmp_path / "back") for p in got) == ["a/b/deep.bin", "top.txt"]
    assert (tmp_path / "back" / "a" / "b" / "deep.bin").read_bytes() == b"deep"


def test_a_killed_writes_temporary_file_is_not_listed(tmp_path, monkeypatch):
    """A process killed mid-write leaves its temporary file beside the finished ones: listings (and so every
    reader of a folder: shuffles, resumes, uploads) see only whole files."""
    folder = str(tmp_path / "parts")
    storage.write_bytes(storage.join(folder, "000001.parquet"), b"whole")

    def killed(f):
        f.write(b"half")
        raise KeyboardInterrupt  # the write stops here; unlike a kill, this one cleans up, so keep the file

    monkeypatch.setattr(os, "unlink", lambda path: None)
    with pytest.raises(KeyboardInterrupt):
        storage._atomic_local_write(storage.join(folder, "000002.parquet"), killed)
    monkeypatch.undo()
    left = [n for n in os.listdir(folder) if n.startswith(storage.TMP_PREFIX)]
    assert len(left) == 1 and left[0].endswith("000002.parquet")
    assert storage.list_files(folder) == [storage.join(folder, "000001.parquet")]
    assert storage.list_sizes(folder) == [(storage.join(folder, "000001.parquet"), 5)]


def test_multipart_upload(bucket, tmp_path):
    data = os.urandom(11 * storage.MiB)
    local = tmp_path / "big.bin"
    local.write_bytes(data)
    uri = f"s3://{bucket}/big/big.bin"
    storage.upload_file(str(local), uri, multipart_threshold=5 * storage.MiB,
                        multipart_chunksize=5 * storage.MiB)
    head = storage.client().head_object(Bucket=bucket, Key="big/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 1 MiB parts
    assert storage.read_bytes(uri) == data
    # no recorded sha256 -> computed by streaming the object
    assert storage.sha256(uri) == storage.sha256_file(str(local))


def test_missing_bucket_and_key_are_clear(s3_server, bucket, tmp_path):
    with pytest.raises(storage.BucketNotFound, match=r"bucket 'no-such-bucket' does not exist at endpoint http://127\.0\.0\.1"):
        storage.read_bytes("s3://no-such-bucket/x.json")
    with pytest.raises(storage.BucketNotFound, match="no-such-bucket"):
        storage.exists("s3://no-such-bucket/x.json")
    f = tmp_path / "f.bin"
    f.write_bytes(b"x")
    with pytest.raises(storage.StorageError, match="bucket 'no-such-bucket' does not exist"):
        storage.upload_file(str(f), "s3://no-such-bucket/f.bin")
    with pytest.raises(FileNotFoundError, match=rf"s3://{bucket}/missing\.json: no such object"):
        storage.read_bytes(f"s3://{bucket}/missing.json")
    with pytest.raises(FileNotFoundError, match="no such file"):
        storage.read_bytes(str(tmp_path / "missing.json"))


def test_wrong_credentials_are_clear(bucket, monkeypatch):
    from moto import settings

    # moto checks signatures only once IAM authentication is switched on.
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(storage.StorageError, match=r"credentials rejected by endpoint .*InvalidAccessKeyId"):
        storage.read_bytes(f"s3://{bucket}/x.json")
    with pytest.raises(storage.StorageError, match="credentials rejected"):
        storage.write_bytes(f"s3://{bucket}/x.json", b"{}")


def test_pyarrow_filesystem(bucket, tmp_path):
    import pyarrow.fs as pafs

    storage.write_bytes(f"s3://{bucket}/ray/x.txt", b"abc")
    fs, path = storage.pyarrow_filesystem(f"s3://{bucket}/ray")
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{bucket}/ray"
    with fs.open_input_stream(f"{path}/x.txt") as f:
        assert f.read() == b"abc"
    fs, path = storage.pyarrow_filesystem(str(tmp_path))
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path)


def test_client_is_cached_per_endpoint(s3_server, monkeypatch):
    c1 = storage.client()
    assert storage.client() is c1
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert storage.client() is not c1
    assert storage.client().meta.endpoint_url == "http://127.0.0.1:1"


def test_stream_resumes_after_dropped_connection(bucket):
    from botocore.exceptions import ResponseStreamingError

    data = os.urandom(300_000)
    uri = f"s3://{bucket}/stream.bin"
    storage.write_bytes(uri, data)
    f = storage.open_read(uri, buffer_size=4096)
    real = f.raw._body
    reads = []

    class Dropping:  # the connection breaks on the 3rd read, as a reset socket would
        def read(self, amt=None):
            reads.append(amt)
            if len(reads) == 3:
                raise ResponseStreamingError(error="Connection reset by peer")
            return real.read(amt)

        def close(self):
            real.close()

    f.raw._body = Dropping()
    assert f.read(10_000) == data[:10_000]
    assert f.read() == data[10_000:]
    assert len(reads) == 3  # after the drop, reads continue on a fresh ranged GET
    f.close()

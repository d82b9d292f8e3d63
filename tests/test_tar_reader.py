"""The header-level tar reader the training loader uses gives what webdataset (Python's tarfile) gives."""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds

from components.common.tar_reader import ShardFormatError, iter_members, shard_samples

MEMBERS = [  # (path, data): unicode keys (PAX path records), a name over 100 bytes, sizes around a block
    ("plain_000.jpg", b"\xff\xd8" + bytes(510)), ("plain_000.txt", b"a red circle"), ("plain_000.json", b"{}"),
    ("caf\u00e9_\u732b_001.jpg", bytes(513)), ("caf\u00e9_\u732b_001.txt", "un caf\u00e9".encode()),
    ("caf\u00e9_\u732b_001.CLS", b"3"),  # extensions come out in lower case, as webdataset's
    ("k" * 120 + ".jpg", bytes(1)), ("k" * 120 + ".txt", b""),
    ("sub/dir/key_002.jpg", bytes(1024)), ("sub/dir/key_002.txt", b"nested"),
]


def _tar(members, fmt=tarfile.PAX_FORMAT, directory=False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        if directory:
            info = tarfile.TarInfo("sub")
            info.type = tarfile.DIRTYPE
            tf.addfile(info)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_members_as_tarfile_reads_them(fmt):
    data = _tar(MEMBERS, fmt, directory=True)  # PAX: `path` records; GNU: long-name members (UTF-8 names)
    assert list(iter_members(io.BytesIO(data))) == MEMBERS


def test_ustar_prefix_names():
    name = "p" * 90 + "/" + "q" * 60 + ".txt"  # over 100 bytes: ustar splits it into prefix + name
    data = _tar([(name, b"x")], tarfile.USTAR_FORMAT)
    assert list(iter_members(io.BytesIO(data))) == [(name, b"x")]


def test_samples_equal_webdatasets(tmp_path):
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(_tar(MEMBERS))
    ours = list(shard_samples(str(shard)))
    theirs = list(wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples()))
    assert [s["__key__"] for s in ours] == [s["__key__"] for s in theirs] == [
        "plain_000", "caf\u00e9_\u732b_001", "k" * 120, "sub/dir/key_002"]
    for a, b in zip(ours, theirs):
        assert {k: v for k, v in a.items() if not k.startswith("__")} == \
               {k: v for k, v in b.items() if not k.startswith("__")}
        assert a["__url__"] == b["__url__"] == str(shard)


@pytest.mark.parametrize("compress", ["gzip", "bz2", "lzma"])
def test_compressed_tars_read_like_plain_ones(tmp_path, compress):
    import importlib

    shard = tmp_path / "set.tar.x"
    shard.write_bytes(importlib.import_module(compress).compress(_tar(MEMBERS)))
    plain = tmp_path / "set.tar"
    plain.write_bytes(_tar(MEMBERS))
    strip = lambda samples: [{k: v for k, v in s.items() if k != "__url__"} for s in samples]  # noqa: E731
    assert strip(shard_samples(str(shard))) == strip(shard_samples(str(plain)))


@pytest.mark.parametrize("data", [b"not a tar at all, " * 40, bytes(100) + b"x" * 412 + bytes(1024)])
def test_what_is_not_a_tar_is_refused(tmp_path, data):
    shard = tmp_path / "notes.tar"
    shard.write_bytes(data)
    with pytest.raises(ShardFormatError, match=r"notes\.tar: not a tar, or a damaged one"):
        list(shard_samples(str(shard)))


def test_a_damaged_gzip_names_itself(tmp_path):
    import gzip

    shard = tmp_path / "cut.tar.gz"
    shard.write_bytes(gzip.compress(_tar(MEMBERS))[:300])
    with pytest.raises(ShardFormatError, match=r"cut\.tar\.gz: "):
        list(shard_samples(str(shard)))


def test_a_truncated_shard_names_itself(tmp_path):
    shard = tmp_path / "cut.tar"
    shard.write_bytes(_tar(MEMBERS)[:2000])
    with pytest.raises(ShardFormatError, match=r"cut\.tar: truncated tar"):
        list(shard_samples(str(shard)))


def test_a_shard_on_s3_streams(bucket, tmp_path):
    from components.common import storage

    uri = f"s3://{bucket}/tar-reader/train-000000.tar"
    storage.write_bytes(uri, _tar(MEMBERS))
    assert [s["__key__"] for s in shard_samples(uri)][:2] == ["plain_000", "caf\u00e9_\u732b_001"]

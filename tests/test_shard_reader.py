"""Shard stage -> manifest -> webdataset reader, on a loopback S3 server and on local disk."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import tarfile

import pytest
import torch

from components.common import config, storage
from components.common import dataset as reader
from components.shard.config import ShardConfig
from components.shard.stage import content_hash, is_validation, sample_digest, shard
from components.train.loader import make_loader
from tests.fixtures_data import fake_kept_rows, write_kept_parts

N = 60
CFG = ShardConfig(samples_per_shard=8, image_max_side=96, val_fraction=0.1, seed=3, vocab_size=320,
                  num_cpus=2)


@pytest.fixture(scope="module")
def rows():
    return fake_kept_rows()


@pytest.fixture(scope="module")
def filtered(tmp_path_factory, rows) -> str:
    root = str(tmp_path_factory.mktemp("filtered"))
    write_kept_parts(root, rows)
    return root


@pytest.fixture(scope="module")
def sharded(s3_server, filtered) -> tuple[str, dict]:
    """Filter output uploaded to S3, then sharded from S3 to S3 (once per module)."""
    bucket = "shard-tests"
    storage.ensure_bucket(bucket)
    src = f"s3://{bucket}/filtered"
    storage.upload_dir(filtered, src)
    out = f"s3://{bucket}/shards"
    return out, shard(src, out, CFG)


def _shard_names(manifest: dict) -> list[str]:
    return [s["uri"].rsplit("/", 1)[1] for sp in ("train", "validation") for s in manifest["splits"][sp]["shards"]]


def test_manifest_and_shards(sharded, rows, tmp_path):
    out, result = sharded
    manifest = reader.load_manifest(out)
    assert manifest == {k: v for k, v in result.items() if k != "run"}
    assert manifest["format"] == "clip-wds/1" and manifest["filter_stats"]["kept"] == N
    val_keys = {r["key"] for r in rows if is_validation(r["key"], CFG.val_fraction)}
    assert 0 < len(val_keys) < N
    assert manifest["splits"]["validation"]["samples"] == len(val_keys)
    assert manifest["splits"]["train"]["samples"] == N - len(val_keys)
    train = manifest["splits"]["train"]["shards"]
    assert [s["uri"] for s in train] == [f"{out}/train-{i:06d}.tar" for i in range(len(train))]
    assert len(train) == -(-(N - len(val_keys)) // CFG.samples_per_shard)
    assert all(s["samples"] <= CFG.samples_per_shard for s in train)
    digests = []
    for split in ("train", "validation"):
        for s in manifest["splits"][split]["shards"]:
            local = str(tmp_path / "check.tar")
            storage.download_file(s["uri"], local)
            assert storage.sha256_file(local) == s["sha256"] and os.path.getsize(local) == s["bytes"]
            with tarfile.open(local) as tf:
                members = tf.getmembers()
                assert {m.mtime for m in members} == {0}
                assert len(members) == 3 * s["samples"]
                data = {m.name: tf.extractfile(m).read() for m in members}
            digests += [sample_digest(split, data[name], data[name[:-4] + ".txt"].decode()) for name in data
                        if name.endswith(".jpg")]
    assert manifest["tokenizer"] == f"{out}/tokenizer.json"
    assert manifest["tokenizer_sha256"] == hashlib.sha256(storage.read_bytes(manifest["tokenizer"])).hexdigest()
    assert manifest["content_hash"] == content_hash(digests)
    assert sorted(result["run"]["uploaded"]) == sorted(_shard_names(manifest) + ["tokenizer.json"])


def test_iter_samples_round_trip(sharded, rows):
    out, manifest = sharded
    by_key = {r["key"]: r for r in rows}
    seen = {}
    for split in ("train", "validation"):
        for key, img, caption, meta in reader.iter_samples(manifest, split):
            assert key not in seen
            seen[key] = split
            r = by_key[key]
            assert caption == r["caption"] and meta["sha256"] == r["sha256"] and meta["phash"] == r["phash"]
            assert img.mode == "RGB" and max(img.size) <= CFG.image_max_side
            assert img.size == (meta["jpg_width"], meta["jpg_height"])
            if max(r["width"], r["height"]) <= CFG.image_max_side and r["image"][:3] == b"\xff\xd8\xff":
                assert img.size == (r["width"], r["height"])  # small JPEGs keep their bytes
            assert (split == "validation") == is_validation(key, CFG.val_fraction)
    assert set(seen) == set(by_key)
    # the shuffle is by seed, not by key order
    train_keys = [k for k, *_ in reader.iter_samples(manifest, "train")]
    assert train_keys != sorted(train_keys)


def test_rerun_is_idempotent(sharded):
    out, first = sharded
    before = storage.read_bytes(f"{out}/manifest.json")
    again = shard(out.replace("/shards", "/filtered"), out, CFG)
    assert again["run"]["uploaded"] == []
    assert sorted(again["run"]["skipped"]) == sorted(_shard_names(first) + ["tokenizer.json"])
    assert storage.read_bytes(f"{out}/manifest.json") == before


def test_local_output_is_byte_identical(sharded, filtered, tmp_path):
    _, s3_manifest = sharded
    local = shard(filtered, str(tmp_path / "out"), CFG)
    assert local["content_hash"] == s3_manifest["content_hash"]
    assert [s["sha256"] for s in local["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in s3_manifest["splits"]["train"]["shards"]]
    assert os.path.isfile(tmp_path / "out" / "train-000000.tar")
    assert len(list(reader.iter_samples(local, "validation"))) == local["splits"]["validation"]["samples"] > 0
    # a given tokenizer is copied, not retrained
    copied = shard(filtered, str(tmp_path / "out2"), dataclasses.replace(CFG, tokenizer=s3_manifest["tokenizer"]))
    assert copied["tokenizer_sha256"] == s3_manifest["tokenizer_sha256"]
    assert (tmp_path / "out2" / "tokenizer.json").read_bytes() == storage.read_bytes(s3_manifest["tokenizer"])


def test_content_hash_means_same_data(bucket, rows, tmp_path):
    """The same samples, filtered under two run prefixes (source URIs inside each, as the generated corpus
    has), give the same hash and byte-identical shards; shard size changes the shards, not the hash; a
    changed caption changes the hash."""
    def filter_output(root: str, rows: list[dict]) -> str:
        local = str(tmp_path / "staging" / root.replace("/", "_").replace(":", "")) if storage.is_s3(root) else root
        write_kept_parts(local, [dict(r, source_uri=f"{root}/source/{r['key']}.img") for r in rows])
        if storage.is_s3(root):
            storage.upload_dir(local, root)
        return root

    a = filter_output(str(tmp_path / "run-a" / "filtered"), rows)
    b = filter_output(f"s3://{bucket}/run-b/filtered", rows)
    ma = shard(a, str(tmp_path / "run-a" / "shards"), CFG)
    mb = shard(b, f"s3://{bucket}/run-b/shards", CFG)
    assert ma["content_hash"] == mb["content_hash"]
    assert [s["sha256"] for s in ma["splits"]["train"]["shards"]] == [s["sha256"] for s in mb["splits"]["train"]["shards"]]
    _, _, _, meta = next(iter(reader.iter_samples(ma, "train")))
    assert meta["source_uri"] == f"source/{meta['key']}.img"

    bigger = shard(a, str(tmp_path / "run-a" / "big"), ShardConfig(**{**config.to_dict(CFG), "samples_per_shard": 32}))
    assert bigger["content_hash"] == ma["content_hash"]
    assert bigger["splits"]["train"]["shards"][0]["sha256"] != ma["splits"]["train"]["shards"][0]["sha256"]

    changed = [dict(r, caption=r["caption"] + " again") if i == 0 else r for i, r in enumerate(rows)]
    mc = shard(filter_output(str(tmp_path / "run-c" / "filtered"), changed), str(tmp_path / "run-c" / "shards"), CFG)
    assert mc["content_hash"] != ma["content_hash"]


def test_crash_leaves_no_manifest_and_rerun_resumes(s3_server, bucket, filtered, sharded):
    """A run stopped after some shard slots are written leaves no manifest; the rerun skips the completed and
    verified slots (without encoding them), writes a recorded slot whose tar has gone again, and ends
    byte-identical to the uninterrupted run (in this process; on Ray: test_shard_cluster.py)."""
    crash_and_resume(f"s3://{bucket}/crash", filtered, sharded[1], CFG)


def crash_and_resume(out: str, filtered: str, first: dict, cfg: ShardConfig, relayout: bool = True) -> None:
    """Crash a run of `cfg` into `out` after 3 slots, resume it and compare it with `first` (the uninterrupted
    run); with `relayout`, then a crash and a finished run of another shard size into the same `out`."""
    with pytest.raises(RuntimeError, match="fail_after_slots=3"):
        shard(filtered, out, dataclasses.replace(cfg, fail_after_slots=3))
    assert not storage.exists(f"{out}/manifest.json")
    done = [json.loads(storage.read_bytes(u)) for u in storage.list_files(f"{out}/_done")]
    assert len(done) >= 3
    completed = sorted(p["uri"].rsplit("/", 1)[1] for d in done for p in d["pieces"])
    lost = completed.pop()  # recorded, but its tar is gone: not trusted
    storage.delete(f"{out}/{lost}")

    resumed = shard(filtered, out, cfg)
    assert sorted(resumed["run"]["skipped"]) == completed
    assert set(resumed["run"]["uploaded"]) == set(_shard_names(resumed)) - set(completed) | {"tokenizer.json"}
    assert lost in resumed["run"]["uploaded"]
    assert {k: v for k, v in resumed.items() if k not in ("run", "created_at", "source", "splits", "tokenizer")} == \
        {k: v for k, v in first.items() if k not in ("run", "created_at", "source", "splits", "tokenizer")}
    assert [[s["sha256"] for s in resumed["splits"][sp]["shards"]] for sp in ("train", "validation")] == \
        [[s["sha256"] for s in first["splits"][sp]["shards"]] for sp in ("train", "validation")]
    assert not storage.list_files(f"{out}/_done")  # the records go once the manifest is written
    if not relayout:
        return

    # A run with another layout removes the old manifest first, and the finished run deletes the shards
    # the new layout no longer has.
    bigger = dataclasses.replace(cfg, samples_per_shard=20)
    with pytest.raises(RuntimeError):
        shard(filtered, out, dataclasses.replace(bigger, fail_after_slots=1))
    assert not storage.exists(f"{out}/manifest.json")
    final = shard(filtered, out, bigger)
    assert final["run"]["removed"] and all(n.startswith("train-") for n in final["run"]["removed"])
    listed = {u.rsplit("/", 1)[1] for u in storage.list_files(out)}
    assert listed == set(_shard_names(final)) | {"tokenizer.json", "manifest.json"}


def test_bad_input_is_named(tmp_path, rows):
    bad = [dict(r) for r in rows[:4]]
    bad[2]["key"] = "000.002"
    write_kept_parts(str(tmp_path / "f"), bad)
    with pytest.raises(ValueError, match=r"key '000\.002' must not contain '\.'"):
        shard(str(tmp_path / "f"), str(tmp_path / "o"), CFG)
    with pytest.raises(FileNotFoundError, match="no kept/\\*.parquet"):
        shard(str(tmp_path / "empty"), str(tmp_path / "o"), CFG)


def _captions(tok, tokens: torch.Tensor) -> list[str]:
    return [tok.decode(t) for t in tokens]


def test_loader_split_by_node_disjoint_and_complete(sharded, rows):
    out, manifest = sharded
    tok = reader.load_tokenizer(manifest["tokenizer"])
    expected = sorted(_captions(tok, tok([r["caption"] for r in rows if not is_validation(r["key"], CFG.val_fraction)])))
    per_rank = []
    for rank in range(2):
        loader = make_loader(f"{out}/manifest.json", "train", None, image_size=32, batch_size=5,
                                    train=False, num_workers=2, rank=rank, world_size=2)
        got = []
        for images, tokens in loader:
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
            assert tokens.dtype == torch.long and tokens.shape == (images.shape[0], 77)
            got += _captions(tok, tokens)
        per_rank.append(got)
    assert per_rank[0] and per_rank[1]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == expected


def test_training_loader_drops_last_and_reshuffles(sharded):
    _, manifest = sharded
    tok = reader.load_tokenizer(manifest["tokenizer"])
    loader = make_loader(manifest, "train", tok, image_size=32, batch_size=8, train=True, seed=1)
    n = manifest["splits"]["train"]["samples"]
    epochs = [[_captions(tok, t) for _, t in loader] for _ in range(2)]
    assert all(len(e) == n // 8 == loader.batches_per_epoch for e in epochs)
    assert all(len(b) == 8 for e in epochs for b in e)
    assert epochs[0] != epochs[1]
    # the order is a function of (seed, epoch): a new loader with the same seed repeats it
    again = make_loader(manifest, "train", tok, image_size=32, batch_size=8, train=True, seed=1)
    assert [_captions(tok, t) for _, t in again] == epochs[0]
    again.set_epoch(1)
    assert [_captions(tok, t) for _, t in again] == epochs[1]


def test_too_few_shards_fail_clearly_for_evaluation_training_plans_by_samples(sharded):
    _, manifest = sharded
    n = len(manifest["splits"]["train"]["shards"])
    with pytest.raises(ValueError, match=rf"has {n} shards but world_size=4 x num_workers=4 = 16 readers"):
        make_loader(manifest, "train", None, image_size=32, batch_size=4, num_workers=4, rank=1, world_size=4,
                    train=False)
    # training plans by samples, not shards: with more readers than shards every rank still takes the same
    # number of batches (idle readers deliver nothing, no rank runs short), and resampling never runs dry
    per_rank = [len(list(make_loader(manifest, "train", None, image_size=32, batch_size=4, num_workers=4, rank=r,
                                     world_size=4, shuffle_buffer=8))) for r in range(4)]
    assert per_rank == [manifest["splits"]["train"]["samples"] // 4 // 4] * 4
    make_loader(manifest, "train", None, image_size=32, batch_size=4, num_workers=4, rank=1,
                world_size=4, resample=True)


def test_resample_yields_more_than_an_epoch(sharded):
    _, manifest = sharded
    n = manifest["splits"]["train"]["samples"]
    loader = make_loader(manifest, "train", None, image_size=32, batch_size=8, resample=True, seed=5)
    batches = list(itertools.islice(iter(loader), 2 * n // 8 + 1))
    assert len(batches) == 2 * n // 8 + 1
    assert sum(t.shape[0] for _, t in batches) > 2 * n


def test_max_shard_bytes_and_no_validation(filtered, tmp_path):
    cfg = ShardConfig(**{**CFG.__dict__, "samples_per_shard": 1000, "max_shard_bytes": 40_000, "val_fraction": 0.0})
    m = shard(filtered, str(tmp_path / "o"), cfg)
    train = m["splits"]["train"]["shards"]
    assert m["splits"]["train"]["samples"] == N and m["splits"]["validation"] == {"samples": 0, "shards": []}
    assert len(train) > 1 and all(s["bytes"] <= 40_000 for s in train)
    assert sum(s["samples"] for s in train) == N
    with pytest.raises(ValueError, match="split 'validation' has no shards"):
        make_loader(m, "validation", None, image_size=32, batch_size=4)


def test_training_images_stored_at_their_shorter_side_validation_as_it_comes(filtered, rows, tmp_path):
    cfg = ShardConfig(**{**CFG.__dict__, "image_max_side": None, "train_image_size": 64, "val_fraction": 0.3})
    assert cfg.train_shorter_side == 74  # 64 x 1.15
    m = shard(filtered, str(tmp_path / "o"), cfg)
    assert m["train_shorter_side"] == 74 and m["image_max_side"] is None
    by_key = {r["key"]: r for r in rows}
    seen = {"train": 0, "validation": 0}
    for split in ("train", "validation"):
        for key, img, _caption, meta in reader.iter_samples(m, split):
            r = by_key[key]
            seen[split] += 1
            if split == "validation" or min(r["width"], r["height"]) <= 74:
                assert img.size == (r["width"], r["height"])  # kept (the validation split: for its own transform)
            else:
                assert min(img.size) == 74 and abs(img.width / img.height - r["width"] / r["height"]) < 0.03
            assert img.size == (meta["jpg_width"], meta["jpg_height"])
    assert seen["train"] and seen["validation"]
    off = shard(filtered, str(tmp_path / "off"), ShardConfig(**{**cfg.__dict__, "train_image_size": None}))
    assert off["train_shorter_side"] is None
    assert {k for k, img, *_ in reader.iter_samples(off, "train") if img.size != (by_key[k]["width"], by_key[k]["height"])} == set()
    with pytest.raises(ValueError, match="train_resize_factor"):
        ShardConfig(train_resize_factor=0.5)


def test_reader_uint8_batches_normalised_equal_the_transform(sharded):
    from clip_model.transforms import image_transform

    _, manifest = sharded
    # 64 px from images of at most 96: no JPEG draft decoding (that needs a shorter side >= 128), the
    # reader decodes exactly what iter_samples does
    loader = make_loader(manifest, "validation", None, image_size=64, batch_size=4, train=False)
    raw = list(loader)
    # uint8 in PIL's layout (channels-last strides, never transposed in the workers)
    assert all(images.dtype == torch.uint8 and images.stride()[1] == 1 for images, _ in raw)
    normalised = torch.cat([images for images, _ in loader.on_device("cpu")])
    assert normalised.is_contiguous()
    transform = image_transform(64, train=False)
    expected = torch.stack([transform(img) for _, img, _, _ in reader.iter_samples(manifest, "validation")])
    assert normalised.dtype == torch.float32 and normalised.shape == expected.shape
    assert (normalised - expected).abs().max().item() <= 1e-6
    assert torch.equal(torch.cat([images for images, _ in raw]), torch.cat([images for images, _ in loader]))


def test_persistent_workers_follow_the_epoch(sharded):
    import psutil

    _, manifest = sharded
    tok = reader.load_tokenizer(manifest["tokenizer"])
    loader = make_loader(manifest, "train", tok, image_size=32, batch_size=4, train=True, num_workers=2, seed=1,
                         prefetch=3)
    first = [_captions(tok, t) for _, t in loader]
    workers = {p.pid for p in psutil.Process().children()}
    second = [_captions(tok, t) for _, t in loader]
    assert {p.pid for p in psutil.Process().children()} == workers and len(workers) >= 2  # no new processes
    assert first != second and len(first) == len(second) > 0
    # the workers read the epoch from shared memory: a fresh loader at epoch 1 repeats the second pass
    again = make_loader(manifest, "train", tok, image_size=32, batch_size=4, train=True, num_workers=2, seed=1)
    again.set_epoch(1)
    assert [_captions(tok, t) for _, t in again] == second
    random_crop = make_loader(manifest, "train", tok, image_size=32, batch_size=4, train=True, train_crop="random")
    assert all(images.shape == (4, 3, 32, 32) for images, _ in random_crop)
    with pytest.raises(ValueError, match="prefetch=0"):
        make_loader(manifest, "train", tok, image_size=32, batch_size=4, prefetch=0)


def test_tokenizer_is_trained_on_a_bounded_deterministic_sample(filtered, rows, tmp_path):
    """With tokenizer_sample=n the BPE learns from exactly the first n training captions of the seeded sample
    order (`rank_of`), whatever the input's part order."""
    from clip_model.tokenizer import ClipTokenizer
    from components.shard.stage import rank_of

    cfg = dataclasses.replace(CFG, tokenizer_sample=12)
    m = shard(filtered, str(tmp_path / "o"), cfg)
    train = sorted((r for r in rows if not is_validation(r["key"], cfg.val_fraction)),
                   key=lambda r: (rank_of(r["key"], "train", cfg.seed), r["key"]))
    expected = ClipTokenizer.train([r["caption"] for r in train[:12]], vocab_size=cfg.vocab_size).to_str()
    assert storage.read_text(m["tokenizer"]) == expected
    everything = ClipTokenizer.train([r["caption"] for r in train], vocab_size=cfg.vocab_size).to_str()
    assert expected != everything  # the sample, not every caption
    # the sample order is the shards' order: the first training shard starts with those rows
    first = [k for k, *_ in reader.iter_samples(m, "train")][:12]
    assert first == [r["key"] for r in train[:12]]

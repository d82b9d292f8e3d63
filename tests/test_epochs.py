"""Epochs as the paper counts them, exact data positions, and shard reads that survive storage failures:
the reader and its plan (`components.train.loader`, `components.train.sampler`) tested directly."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from components.common import tar_reader
from components.common.dataset import load_manifest
from components.train.loader import WdsLoader, make_loader
from components.train.sampler import ShardTable, resolve_budget, steps_per_epoch


_SMALL: dict[str, str] = {}  # the session's small shards (this module's fixture, imported by others too)


@pytest.fixture(scope="session")
def small(tmp_path_factory) -> str:
    """~100 training samples of 72 px in 16-sample shards (a partial last one): the manifest's path. Built once
    per session: test_train_cluster.py imports this fixture too (each importing module gets its own fixture
    definition, so the shards are cached here)."""
    from tests.fixtures_data import make_shards

    if "manifest" not in _SMALL:
        _SMALL["manifest"] = make_shards(tmp_path_factory.mktemp("small"), n=110, samples_per_shard=16, size=72,
                                         fmt="JPEG")
    return _SMALL["manifest"]


@pytest.fixture(scope="module")
def uneven(small) -> dict:
    """The small shards' manifest: an odd number of shards, a partial last one."""
    manifest = load_manifest(small)
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) % 2 == 1 and len({s["samples"] for s in shards}) > 1
    return manifest


def _keys_of(loader: WdsLoader, batches=None) -> list[str]:
    """The keys of the batches the caller takes from `loader` (one pass, or `batches` of its stream)."""
    keys: list[str] = []

    def consumed(meta, _orig=loader.consumed):
        keys.extend(meta[3])
        _orig(meta)

    loader.consumed = consumed
    for _ in (loader if batches is None else batches):
        pass
    return keys


def test_every_sample_once_per_epoch_across_ranks_and_workers(uneven):
    """2 ranks x 2 loader workers, 3 epochs: each key once per epoch, except each epoch's remainder
    (N - W x steps_per_epoch x global batch, < one global batch), which changes from epoch to epoch."""
    n = uneven["splits"]["train"]["samples"]
    batch, world = 8, 2
    loaders = [make_loader(uneven, "train", None, image_size=32, batch_size=batch, num_workers=2, rank=r,
                           world_size=world, seed=7, shuffle_buffer=16) for r in range(world)]
    spe = steps_per_epoch(n, world, batch)
    dropped = n - spe * batch * world
    assert 0 <= dropped < batch * world
    seen, left_out = Counter(), []
    for epoch in range(3):
        per_rank = [_keys_of(loader) for loader in loaders]
        assert [len(k) for k in per_rank] == [spe * batch] * world  # every rank ends the epoch at the same step
        epoch_keys = Counter(k for keys in per_rank for k in keys)
        assert max(epoch_keys.values()) == 1  # no sample twice in an epoch
        seen.update(epoch_keys)
        left_out.append(n - len(epoch_keys))
    assert left_out == [dropped] * 3
    assert len(seen) <= n and all(1 <= c <= 3 for c in seen.values())
    assert sum(seen.values()) == 3 * (n - dropped)
    # without a remainder every key would be seen exactly 3 times; with one, only the left-out ones miss
    assert sum(3 - c for c in seen.values()) + 3 * (n - len(seen)) == 3 * dropped
    for loader in loaders:
        assert loader.batches_per_epoch == spe


def test_budget_exactly_one_given_and_derived():
    b = resolve_budget(steps=0, epochs=3, samples=0, num_samples=1000, world_size=2, batch_size=16, grad_accum=2)
    assert b.steps_per_epoch == 500 // 32 == 15 and b.steps == 45 and b.given == "epochs"
    assert b.dropped_per_epoch == 1000 - 15 * 64 < 64 and b.samples == 45 * 64
    s = resolve_budget(steps=30, epochs=0, samples=0, num_samples=1000, world_size=2, batch_size=16, grad_accum=2)
    assert s.steps == 30 and s.epochs == pytest.approx(2.0) and s.given == "steps"
    assert resolve_budget(steps=0, epochs=0, samples=6400, num_samples=1000, world_size=2, batch_size=16,
                          grad_accum=2).steps == 100
    assert resolve_budget(steps=0, epochs=0, samples=0, num_samples=1000, world_size=2, batch_size=16,
                          grad_accum=2).steps == 32 * 15  # the paper's 32 epochs
    with pytest.raises(ValueError, match="given twice"):
        resolve_budget(steps=5, epochs=2, samples=0, num_samples=1000, world_size=2, batch_size=16, grad_accum=2)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        resolve_budget(steps=5, epochs=0, samples=0, num_samples=100, world_size=2, batch_size=64, grad_accum=1)


def test_manifest_planning_is_fast_with_40000_shards(tmp_path):
    """What a rank does with a manifest of 40,000 shards of ~10,000 samples (512 ranks x 8 loader workers): load
    it, plan its 8 workers' epoch, and at a checkpoint place all 4,096 readers in shard terms. Together ~0.15 CPU
    seconds (was ~1 s: a shuffle per plan and the split's size summed per plan); held under 0.5 (CPU time: other
    work on the machine does not count)."""
    import json

    from components.common.dataset import FORMAT
    from components.train.sampler import where_in_shards

    shards = [{"uri": f"s3://b/train-{i:06d}.tar", "samples": 10_000 - (i % 7), "sha256": "0" * 64}
              for i in range(40_000)]
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"format": FORMAT, "splits": {"train": {
        "shards": shards, "samples": sum(s["samples"] for s in shards)}}}))
    ranks, workers, batch = 512, 8, 64
    t = time.process_time()
    table = ShardTable.from_manifest(load_manifest(str(path)), "train")
    spe = steps_per_epoch(table.num_samples, ranks, batch)
    plans = [table.reader_segments(3, 1, 511, ranks, worker, workers, batch, spe) for worker in range(workers)]
    consumed = [[(r * 7 + w * 13) % (spe * batch // workers) for w in range(workers)] for r in range(ranks)]
    where = table.shard_positions(3, 1, consumed, batch, spe)
    elapsed = time.process_time() - t
    assert elapsed < 0.5, f"one rank's manifest handling took {elapsed:.2f} CPU seconds"
    sizes = [sum(s.size for s in segs) for segs in plans]
    assert sum(sizes) == spe * batch and all(size % batch == 0 for size in sizes)  # whole batches, the rank's share
    urls = [s.url for segs in plans for s in segs]
    assert len(set(urls)) >= len(urls) - 7  # disjoint, but for shards split where a worker's run ends
    assert [where[511][w] for w in range(workers)] == [where_in_shards(plans[w], consumed[511][w])
                                                        for w in range(workers)]
    fresh = ShardTable.from_manifest(load_manifest(str(path)), "train")  # no cached plan: the same answer
    assert fresh.shard_positions(3, 1, consumed[:2] + [[0] * workers] * (ranks - 2), batch, spe)[:2] == where[:2]
    assert len({w["shard"] for r in where for w in r}) > 4000  # readers spread over the shards


def test_resumed_reader_continues_exactly(uneven):
    """Stop a 2-worker reader mid-epoch, start a fresh one from the recorded positions: the batches it
    gives are exactly the rest of the uninterrupted epoch (same keys, same crops); nothing is repeated."""
    import torch

    def loader():
        return make_loader(uneven, "train", None, image_size=32, batch_size=4, num_workers=2, seed=3,
                           shuffle_buffer=8, prefetch=3)

    full = loader()
    stream = full.epochs(1)
    reference: list = []
    reference_keys = _keys_of(full, [reference.append(next(stream)) or reference[-1]
                                     for _ in range(full.batches_per_epoch + 3)])  # into epoch 2

    cut = 7
    first = loader()
    s1 = first.epochs(1)
    taken = _keys_of(first, [next(s1) for _ in range(cut)])
    positions = list(first.positions)  # what a checkpoint stores (batches prefetched beyond are not counted)
    assert sum(positions) == cut * 4
    second = loader()
    s2 = second.epochs(1, positions)
    rest_batches = []
    rest = _keys_of(second, [rest_batches.append(next(s2)) or rest_batches[-1]
                             for _ in range(second.batches_per_epoch + 3 - cut)])
    assert taken + rest == reference_keys
    for (a, _), (b, _) in zip(reference[cut:], rest_batches):
        assert torch.equal(a, b)  # the same crops: seeded by the reader's seed and the sample's position


def test_a_storage_outage_mid_shard_leaves_the_sample_stream_unchanged(uneven, monkeypatch, caplog):
    """One shard's reads fail twice mid-way (connection errors): the reader re-opens it, skips to the sample
    where it stopped, and delivers the same stream as without the outage, counting the resumes."""
    import io

    import torch

    from components.common import storage

    clean = make_loader(uneven, "train", None, image_size=32, batch_size=4, seed=11, shuffle_buffer=8)
    clean_batches = list(clean)
    clean_keys = _keys_of(make_loader(uneven, "train", None, image_size=32, batch_size=4, seed=11, shuffle_buffer=8))

    victim = uneven["splits"]["train"]["shards"][2]["uri"]
    failures = {"left": 2}
    real_open = storage.open_read

    class Flaky(io.RawIOBase):
        def __init__(self, inner):
            self.inner, self.read_bytes = inner, 0

        def readable(self):
            return True

        def readinto(self, b):
            if self.read_bytes > 3000 and failures["left"]:
                failures["left"] -= 1
                raise storage.StorageError(f"read {victim}: connection reset by peer (injected)")
            data = self.inner.read(min(len(b), 512))
            b[:len(data)] = data
            self.read_bytes += len(data)
            return len(data)

        def close(self):
            self.inner.close()
            super().close()

    def flaky_open(uri, *a, **kw):
        stream = real_open(uri, *a, **kw)
        return io.BufferedReader(Flaky(stream)) if uri == victim else stream

    monkeypatch.setattr(tar_reader.storage, "open_read", flaky_open)
    monkeypatch.setattr(tar_reader, "RESUME_BACKOFF_S", 0.01)
    before = tar_reader.RESUMES["count"]
    flaky = make_loader(uneven, "train", None, image_size=32, batch_size=4, seed=11, shuffle_buffer=8)
    with caplog.at_level("WARNING", logger="clipflow.storage"):
        flaky_keys = _keys_of(flaky)
    assert failures["left"] == 0 and tar_reader.RESUMES["count"] - before == 2 and flaky.resumes == [2]
    assert flaky_keys == clean_keys
    assert sum(f"shard {victim}: storage failed after sample" in r.getMessage() for r in caplog.records) == 2
    failures["left"] = 2
    again = make_loader(uneven, "train", None, image_size=32, batch_size=4, seed=11, shuffle_buffer=8)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(clean_batches, list(again)))
    # a failure that outlasts every attempt reaches the caller
    failures["left"] = 10 ** 6
    monkeypatch.setattr(tar_reader, "RESUME_ATTEMPTS", 2)
    with pytest.raises(storage.StorageError, match="injected"):
        list(tar_reader.shard_samples(victim))



def test_a_run_killed_mid_epoch_resumes_on_the_same_samples(small, tmp_path, monkeypatch):
    """The training loop (LocalWorker, 2 reader workers) for 2 epochs, once straight through and once killed
    in the second epoch (`fail_at_step`) and resumed from its last checkpoint: the surviving steps train on
    exactly the batches of the uninterrupted run, in order; only the steps between the checkpoint and the kill
    ran twice (on the same batches: nothing lost, nothing extra), and step count, schedule and weights agree."""
    import torch

    from components.common import config
    from components.train.config import TrainConfig
    from components.train.loop import run_worker_loop
    from components.train.worker import LocalWorker

    batches: list[list[str]] = []
    real = WdsLoader.consumed

    def spy(self, meta):
        batches.append(list(meta[3]))
        real(self, meta)

    monkeypatch.setattr(WdsLoader, "consumed", spy)

    def loop_config(out, **kw) -> dict:
        cfg = config.from_dict(TrainConfig, dict(model_config="tiny", epochs=2, batch_size=16, loader_workers=2,
                                                 loader_prefetch=2, checkpoint_every=4, log_every=2, lr=1e-3,
                                                 warmup_steps=3, system_metrics=False, **kw))
        return {"cfg": config.to_dict(cfg), "manifest_uri": small, "output_uri": str(out), "run_id": None,
                "tracking_uri": None}

    n = load_manifest(small)["splits"]["train"]["samples"]
    spe = steps_per_epoch(n, 1, 16)
    full = LocalWorker(tmp_path / "full")
    run_worker_loop(loop_config(tmp_path / "a"), full)
    straight = batches[:]
    assert len(straight) == 2 * spe and full.reports[-1]["step"] == 2 * spe
    per_epoch = [Counter(k for b in straight[e * spe:(e + 1) * spe] for k in b) for e in range(2)]
    assert all(max(c.values()) == 1 and sum(c.values()) == spe * 16 for c in per_epoch)  # once per epoch

    kill_at, resumed_at = spe + 3, (spe + 3) // 4 * 4
    assert spe < resumed_at < kill_at
    batches.clear()
    killed = LocalWorker(tmp_path / "killed")
    with pytest.raises(RuntimeError, match="injected failure"):
        run_worker_loop(loop_config(tmp_path / "b", fail_at_step=kill_at), killed)
    before_kill = batches[:]
    state = killed.load_state()
    position = state["data"]["position"]
    assert state["step"] == resumed_at and position["epoch"] == 1
    assert sum(position["readers"][0]) == (resumed_at - spe) * 16  # samples delivered to steps in this epoch
    assert sum(r["shards_finished"] for r in position["shards"][0]) >= 1
    batches.clear()
    run_worker_loop(loop_config(tmp_path / "b", fail_at_step=kill_at), killed)
    after = batches[:]
    assert before_kill[:resumed_at] + after == straight
    assert before_kill[resumed_at:] == straight[resumed_at:kill_at]  # trained twice: the same batches again
    assert killed.reports[-1]["step"] == 2 * spe and killed.reports[-1]["resumed_from_step"] == resumed_at
    end, again = full.load_state(), killed.load_state()
    assert again["scheduler"]["last_epoch"] == end["scheduler"]["last_epoch"] == 2 * spe
    for name, tensor in end["model"].items():
        assert torch.allclose(tensor, again["model"][name], atol=1e-5), name


def test_resume_from_another_runs_checkpoint_folder_or_mlflow_run(small, tmp_path):
    """`resume_from` continues another run: `resolve_resume` finds the newest checkpoint of a Ray run folder,
    of a checkpoint folder itself, or of an MLflow run id (its storage_uri/run_name params), with the step and
    the run it came from; the loop restores it when its own run has no checkpoint yet."""
    import mlflow

    from components.common import config
    from components.train.config import TrainConfig
    from components.train.loop import run_worker_loop
    from components.train.stage import resolve_resume
    from components.train.worker import LocalWorker

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    old_run = client.create_run(client.create_experiment("resume")).info.run_id

    def loop_config(run_id: str | None, **kw) -> dict:
        cfg = config.from_dict(TrainConfig, dict(model_config="tiny", batch_size=16, loader_workers=0,
                                                 checkpoint_every=2, log_every=2, system_metrics=False, **kw))
        return {"cfg": config.to_dict(cfg), "manifest_uri": small, "output_uri": str(tmp_path), "run_id": run_id,
                "tracking_uri": mlflow.get_tracking_uri()}

    first = LocalWorker(tmp_path / "storage" / "old-run", keep=2)
    run_worker_loop(loop_config(old_run, steps=4), first)
    client.log_param(old_run, "storage_uri", str(tmp_path / "storage"))  # what the stage logs for every run
    client.log_param(old_run, "run_name", "old-run")
    newest = str(tmp_path / "storage" / "old-run" / "checkpoint_00000004")
    for given in (str(tmp_path / "storage" / "old-run"), newest, old_run):
        found = resolve_resume(given, client)
        assert found == {"checkpoint_uri": newest, "step": 4, "run_id": old_run}  # run id: given, or meta.json's
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        resolve_resume(str(tmp_path / "nothing-here"), client)

    second = LocalWorker(tmp_path / "new-run")
    run_worker_loop({**loop_config(None, steps=6), "resume_from": newest}, second)
    assert [(r["step"], r["resumed_from_step"]) for r in second.reports] == [(6, 4)]
    assert second.load_state()["scheduler"]["last_epoch"] == 6

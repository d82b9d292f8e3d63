"""A batch's way from a loader worker to the training step: the shared-memory ring of batch slots, the
random resized crop resampled on the device, and a loader's workers stopped when it is freed
(`components.train.batch_transfer`, `components.train.loader`)."""

from __future__ import annotations

import time

from components.train.loader import make_loader
from tests.test_epochs import small, uneven  # noqa: F401  (the session's small shards and their manifest)


def test_batches_through_the_shared_ring_equal_those_sent_whole(uneven, monkeypatch):
    """Reader workers write pixels and tokens into shared ring slots and the loader hands out the slot's own
    memory: a batch taken and dropped before the next (as training does) frees its slot for reuse; batches all
    held at once keep theirs, and the workers go on in shared blocks of their own (the path without a free
    slot). Every way gives the same batches, and every slot is free again once no batch uses it."""
    import gc

    import torch

    from components.train import batch_transfer

    ld = make_loader(uneven, "train", None, image_size=32, batch_size=4, num_workers=2, seed=5, shuffle_buffer=8,
                     prefetch=2)
    lo = None
    streamed = []
    for images, tokens in ld:  # one batch at a time: each is a view of a ring slot
        ring = ld.reader.ring
        lo = ring.pixels.data_ptr()
        assert lo <= images.data_ptr() < lo + ring.pixels.numel()
        streamed.append((images.clone(), tokens.clone(), images.stride()))
        del images, tokens
    assert (ring.state == batch_transfer.FREE).all()  # each slot freed once its batch was dropped
    ld.set_epoch(0)  # the same epoch again
    held = list(ld)  # every batch held: the slots stay held, the rest come in blocks of their own
    assert (ring.state == batch_transfer.HELD).all()
    inside = [lo <= images.data_ptr() < lo + ring.pixels.numel() for images, _ in held]
    assert sum(inside) == ring.state.numel() < len(held)
    monkeypatch.setattr(batch_transfer.BatchRing, "take", lambda self, worker_id: None)  # never a free slot
    ld.set_epoch(0)
    whole = list(ld)
    assert len(streamed) == len(held) == len(whole) == ld.batches_per_epoch
    for (a, ta, stride), (b, tb), (c, tc) in zip(streamed, held, whole):
        assert a.shape == b.shape == c.shape == (4, 3, 32, 32) and stride == b.stride() == c.stride()  # channels-last
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(ta, tb) and torch.equal(ta, tc)
    del held, b, tb
    gc.collect()
    assert (ring.state == batch_transfer.FREE).all()


def test_random_resized_resampled_on_the_device_equals_the_cpu_crop_and_trains(small, tmp_path, monkeypatch):
    """train_crop=random_resized: the workers send each sample's box and margin in a canvas with its geometry,
    and the device (here the CPU: no GPU in the tests) resamples the batch at once: the same normalised batches
    as the CPU crop of the same boxes within the resample's tolerance (tests/test_transforms.py), through the
    ring (2 workers) and in-process; and the training loop trains on them."""
    import math

    import torch

    from clip_model.transforms import ImageTransform, image_transform
    from components.common import config
    from components.train.config import TrainConfig
    from components.train.loop import run_worker_loop
    from components.train.worker import LocalWorker

    def batches(workers: int, device_resample: bool) -> list:
        ld = make_loader(small, "train", None, image_size=64, batch_size=8, num_workers=workers, seed=2,
                         shuffle_buffer=16, train_crop="random_resized", device_resample=device_resample)
        return [(images.clone(), tokens) for images, tokens in ld.on_device("cpu")]

    canvas_side = image_transform(64, True, train_crop="random_resized").device_layout()[0]
    raw = next(iter(make_loader(small, "train", None, image_size=64, batch_size=8, seed=2,
                                train_crop="random_resized", device_resample=True)))
    assert raw[0].shape == (8, 3, canvas_side, canvas_side) and raw[2].shape == (8, 6)  # canvases, geometry
    level = 1 / (255 * min(image_transform(64, True).std))  # one level of 0..255, normalised
    for workers in (0, 2):
        on_cpu, on_device = batches(workers, False), batches(workers, True)
        assert len(on_device) == len(on_cpu)
        for (a, ta), (b, tb) in zip(on_device, on_cpu):
            assert a.shape == b.shape == (8, 3, 64, 64) and torch.equal(ta, tb)
            assert (a - b).abs().mean() < 0.35 * level and (a - b).abs().max() < 8.01 * level

    calls = []
    real = ImageTransform.device_finish
    monkeypatch.setattr(ImageTransform, "device_finish", lambda self, *a: calls.append(1) or real(self, *a))
    from components.train import loader as loader_module

    real_make = loader_module.make_loader  # the loop resamples on the device only with a GPU: here, as if it had one
    monkeypatch.setattr(loader_module, "make_loader", lambda *a, **kw: real_make(*a, **{**kw, "device_resample": True}))
    cfg = config.from_dict(TrainConfig, dict(model_config="tiny", steps=3, batch_size=8, loader_workers=2,
                                             train_crop="random_resized", checkpoint_every=3, log_every=1,
                                             system_metrics=False))
    worker = LocalWorker(tmp_path / "rr")
    run_worker_loop({"cfg": config.to_dict(cfg), "manifest_uri": small, "output_uri": str(tmp_path),
                     "run_id": None, "tracking_uri": None}, worker)
    assert worker.reports[-1]["step"] == 3 and math.isfinite(worker.reports[-1]["loss"]) and len(calls) >= 3


def test_a_loader_freed_by_the_cycle_collector_stops_its_workers_at_once(uneven):
    """A loader in a reference cycle is freed by the cycle collector, which stops the queues' feeder threads
    before the DataLoader's own shutdown runs: its workers then never heard the stop signal and each held the
    collecting test up for the DataLoader's 5 s join timeout (~20 s per test module here). They now stop at once."""
    import gc

    import psutil

    ld = make_loader(uneven, "train", None, image_size=32, batch_size=4, num_workers=2, seed=1, shuffle_buffer=8)
    for _ in range(2):
        assert sum(1 for _ in ld) == ld.batches_per_epoch
    workers = [psutil.Process(w.pid) for w in ld._dataloader._iterator._workers]
    ld.itself = ld  # a cycle: only the cycle collector frees it
    del ld
    t = time.perf_counter()
    gc.collect()
    took = time.perf_counter() - t
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert took < 3.0, f"freeing the loader took {took:.1f} s"

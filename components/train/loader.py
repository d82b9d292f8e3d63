"""The training reader: webdataset shards -> batches of (uint8 images, tokens) for one rank.

Splitting is explicit: shards go to ranks by ``rank``/``world_size`` (given by the caller, never
read from torch.distributed), then to DataLoader workers. Without resampling every (rank, worker)
needs at least one shard, otherwise it would yield nothing and a DDP job would hang: that is refused
with a clear ValueError. With ``resample=True`` each reader draws shards with replacement forever
(seeded by seed, rank, worker and epoch): pair it with a fixed number of steps per epoch, which also
keeps every rank's step count identical.

Shards are read straight from their tar headers (`components.common.tar_reader`, ~10x less CPU per
sample than Python's tarfile). What crosses process boundaries is kept small: workers decode (JPEGs much larger than needed in
draft mode, i.e. downscaled by the decoder), crop and send uint8 batches [B, 3, S, S], a quarter of
the bytes of float32. The workers persist across epochs, batches land in pinned memory when a GPU
is used, and `DeviceBatches` copies them to the device (non_blocking, on a side stream, overlapping
the previous step) and normalises them there.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from components.common.dataset import decode_image, load_manifest, load_tokenizer, shard_uris, split_samples
from components.common.tar_reader import shards_to_samples

SHUFFLE_BUFFER = 2000


# --------------------------------------------------------------------------- shard lists

def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class _ShardList(IterableDataset):
    """Yields ``{"url": ...}`` for this rank and DataLoader worker.

    Without resampling: the shard list is shuffled (train) with a seed shared by all ranks, then
    dealt out ``rank::world_size`` and ``worker::num_workers``, so readers are disjoint and together
    cover every shard once per epoch. With resampling: an endless seeded draw with replacement."""

    def __init__(self, urls: list[str], rank: int, world_size: int, seed: int, shuffle: bool, resample: bool):
        self.urls, self.rank, self.world_size = list(urls), rank, world_size
        self.seed, self.shuffle, self.resample = seed, shuffle, resample
        # In shared memory: persistent DataLoader workers see the epoch the main process sets.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(value)

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        epoch = self.epoch
        if self.resample:
            rng = random.Random(f"{self.seed}:{epoch}:{self.rank}:{worker}")
            while True:
                yield {"url": rng.choice(self.urls)}
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(urls)
        for url in urls[self.rank::self.world_size][worker::num_workers]:
            yield {"url": url}


class _SampleShuffle:
    """The sample shuffle buffer, seeded per (seed, epoch, rank, worker): different in every epoch
    and every reader, reproducible for a given seed."""

    def __init__(self, shards: _ShardList, bufsize: int):
        self.shards, self.bufsize = shards, bufsize

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        worker, _ = _worker()
        s = self.shards
        rng = random.Random(f"{s.seed}:{s.epoch}:{s.rank}:{worker}:samples")
        return wds.shuffle(self.bufsize, initial=min(self.bufsize, 100), rng=rng)(src)


class _ToPair:
    """webdataset sample -> (uint8 pixels [S, S, 3], caption): decoded no larger than the crop needs,
    never transposed here (`Normalize` does that on the device)."""

    def __init__(self, transform):
        self.transform = transform
        self.min_side = transform.min_decoded_side()

    def __call__(self, sample: dict) -> tuple[np.ndarray, str]:
        key = sample.get("__key__", "?")
        if "jpg" not in sample or "txt" not in sample:
            raise ValueError(f"sample {key!r} in {sample.get('__url__')}: needs .jpg and .txt members "
                             f"(has {sorted(k for k in sample if not k.startswith('_'))})")
        image = decode_image(sample["jpg"], key, min_side=self.min_side)
        return self.transform.pixels_hwc(image), sample["txt"].decode("utf-8")


class _Collate:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        # uint8 [B, 3, S, S] with channels-last strides (one copy of the [S, S, 3] pixels); numpy's stack
        # uses no intra-op thread pool (torch.stack with several threads can spend more time in its
        # thread pool than copying, on a busy machine)
        images = torch.from_numpy(np.stack([b[0] for b in batch])).permute(0, 3, 1, 2)
        tokens = self.tokenizer([b[1] for b in batch])
        return images, tokens


# --------------------------------------------------------------------------- loader

class WdsLoader:
    """Iterable of ``(images ByteTensor[B,3,S,S], tokens LongTensor[B,77])``: uint8 pixels (channels-last
    memory: PIL's layout, not transposed), normalised later by ``normalize`` (the transform's; it also
    makes them contiguous), best on the device (`DeviceBatches`, `on_device`).

    ``set_epoch(e)`` changes the shard order / resampling seed (it also advances by itself on each
    new iteration). ``num_samples`` is the split's size when a manifest was given;
    ``batches_per_epoch`` is the number of full batches each rank can take per pass over it. With
    ``num_workers`` > 0 one DataLoader with persistent workers serves every epoch (a new iteration
    restarts its workers' streams, it does not fork new workers)."""

    def __init__(self, pipeline: wds.DataPipeline, shards: _ShardList, num_workers: int,
                 num_samples: int | None, batch_size: int, world_size: int, normalize,
                 prefetch: int = 2, pin_memory: bool = False):
        self.pipeline, self.shards, self.num_workers = pipeline, shards, num_workers
        self.num_samples, self.batch_size, self.world_size = num_samples, batch_size, world_size
        self.normalize, self.prefetch, self.pin_memory = normalize, prefetch, pin_memory
        self._epoch = 0
        self._next_epoch: int | None = None
        self._dataloader: DataLoader | None = None

    @property
    def batches_per_epoch(self) -> int | None:
        if self.num_samples is None:
            return None
        return self.num_samples // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self._next_epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._next_epoch if self._next_epoch is not None else self._epoch
        self._next_epoch, self._epoch = None, epoch + 1
        self.shards.epoch = epoch  # shared memory: read by the shard list in the workers too
        if self.num_workers == 0:
            return iter(self.pipeline)
        if self._dataloader is None:
            self._dataloader = DataLoader(self.pipeline, batch_size=None, num_workers=self.num_workers,
                                          persistent_workers=True, prefetch_factor=self.prefetch,
                                          pin_memory=self.pin_memory)
        return iter(self._dataloader)

    def on_device(self, device: torch.device | str) -> DeviceBatches:
        """One pass (endless when resampling) as normalised float batches on ``device``."""
        return DeviceBatches(iter(self), torch.device(device), self.normalize)


class DeviceBatches:
    """``(uint8 images, tokens)`` batches -> ``(normalised float32 images, tokens)`` on ``device``.

    On CUDA each batch is copied (non_blocking, from pinned memory) and normalised on a side stream;
    the compute stream waits for it only where it uses the batch. The host queues a step's kernels
    and returns for the next batch long before the GPU has run them, so the copy overlaps the
    previous step on the GPU and nothing waits for it on the host. (The wait for the reader is timed by
    the training step, `components.train.train_step.TrainStep.step`.)"""

    def __init__(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], device: torch.device, normalize):
        self.batches, self.device, self.normalize = batches, device, normalize
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __iter__(self) -> DeviceBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        images, tokens = next(self.batches)
        if self.stream is None:
            return self.normalize(images.to(self.device)), tokens.to(self.device)
        with torch.cuda.stream(self.stream):
            images = self.normalize(images.to(self.device, non_blocking=True))
            tokens = tokens.to(self.device, non_blocking=True)
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self.stream)
        for tensor in (images, tokens):
            tensor.record_stream(main)  # allocated on the side stream, used on the main one
        return images, tokens


def make_loader(manifest_or_uris: dict | str | Sequence[str], split: str, tokenizer, image_size: int,
                batch_size: int, train: bool = True, resample: bool = False, num_workers: int = 0,
                rank: int = 0, world_size: int = 1, seed: int = 0,
                shuffle_buffer: int = SHUFFLE_BUFFER, prefetch: int = 2, pin_memory: bool = False,
                train_crop: str = "random_resized") -> WdsLoader:
    """A webdataset pipeline over ``split``'s shards for this ``rank`` of ``world_size``.

    ``tokenizer``: a ClipTokenizer, the URI of a ``tokenizer.json``, or None (the manifest's). Training (``train=True``)
    shuffles shards and samples (buffer ``shuffle_buffer``), uses training augmentation and drops
    each reader's last partial batch; evaluation keeps order and partial batches. ``prefetch``: batches
    each DataLoader worker prepares ahead; ``pin_memory``: batches land in page-locked memory (for
    non_blocking copies to a GPU); ``train_crop``: the training crop (`clip_model.transforms`)."""
    from clip_model.transforms import image_transform

    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if prefetch < 1:
        raise ValueError(f"prefetch={prefetch}: must be >= 1 batch per worker")
    if isinstance(manifest_or_uris, str):
        manifest_or_uris = load_manifest(manifest_or_uris)
    urls = shard_uris(manifest_or_uris, split)
    if not urls:
        raise ValueError(f"split {split!r} has no shards")
    readers = world_size * max(1, num_workers)
    if not resample and len(urls) < readers:
        raise ValueError(
            f"split {split!r} has {len(urls)} shards but world_size={world_size} x num_workers="
            f"{max(1, num_workers)} = {readers} readers each need at least one (an idle reader makes "
            "distributed training hang): write smaller shards, use fewer workers, or resample=True")
    num_samples = split_samples(manifest_or_uris, split)
    if tokenizer is None:
        if not isinstance(manifest_or_uris, dict):
            raise ValueError("tokenizer=None needs a manifest (it names the tokenizer); got a list of shard URIs")
        tokenizer = manifest_or_uris["tokenizer"]
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)

    shards = _ShardList(urls, rank, world_size, seed, shuffle=train, resample=resample)
    stages: list[Any] = [shards, shards_to_samples]
    if train and shuffle_buffer > 1:
        stages.append(_SampleShuffle(shards, shuffle_buffer))
    transform = image_transform(image_size, train, train_crop=train_crop)
    stages.append(wds.map(_ToPair(transform)))
    stages.append(wds.batched(batch_size, collation_fn=_Collate(tokenizer), partial=not train))
    return WdsLoader(wds.DataPipeline(*stages), shards, num_workers, num_samples, batch_size, world_size,
                     transform.normalize, prefetch=prefetch, pin_memory=pin_memory and torch.cuda.is_available())

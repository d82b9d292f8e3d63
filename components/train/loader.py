"""The training reader: webdataset shards -> batches of (uint8 images, tokens) for one rank.

What each reader (rank x DataLoader worker) reads is planned by `components.train.sampler`: in epoch mode
every sample once per epoch across all readers, every rank the same number of batches; resampled, an
endless draw of shards with replacement; for evaluation, whole shards dealt out ``rank::world_size`` and
``worker::num_workers`` in order (each reader needs a shard: too few are refused with a clear ValueError).
Ranks come from the caller (``rank``/``world_size``), never from torch.distributed.

Every batch carries where its reader stands (samples delivered), and the loader keeps the position of the
last batch the training consumed from each worker (`WdsLoader.positions`): a checkpoint stores it and a
resumed run starts each reader there (`set_epoch(epoch, start)`), so nothing is read twice or skipped. A
sample's random crop is seeded by the reader's seed and the sample's position, so a resumed or repeated run
crops alike.

Shards are read straight from their tar headers (`components.common.tar_reader`, ~10x less CPU per
sample than Python's tarfile; a transient storage failure resumes the shard at the sample where it
stopped). What crosses process boundaries is kept small: workers decode (JPEGs much larger than needed in
draft mode, i.e. downscaled by the decoder), crop and send uint8 batches [B, 3, S, S], a quarter of
the bytes of float32. Each sample's crop is packed by Pillow straight into its row of a batch slot of a
shared-memory ring per worker (`BatchRing`, allocated once; `ImageTransform.pixels_into`): no crop copy, no
array per sample, no stacking (~0.2 ms of CPU per 224 px sample less than crop, asarray and stack). The
batch's tokens go into the slot too, so only the slot's number and the keys cross the DataLoader's queue. The
loader hands out the slot's memory itself, which is freed when no tensor uses it any more (or, with a GPU,
copies it into pinned memory and frees it at once). A new shared-memory block per batch, which is what a
DataLoader otherwise sends, costs ~4.5 ms of CPU per batch of 32 at 224 px in page faults (a third of the
decoding); a copy out of the slot ~2 ms on a busy machine. A worker finding no free slot (the caller holds
every earlier batch) writes the batch into a new block as before. The workers persist across epochs, and
`DeviceBatches` copies batches to the device (non_blocking, on a side stream, overlapping the previous step)
and normalises them there. The tokenizer runs on one thread in a worker (`init_worker`).
"""

from __future__ import annotations

import itertools
import random
import weakref
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from clip_model.tokenizer import DEFAULT_CONTEXT_LENGTH
from components.common import tar_reader
from components.common.dataset import decode_image, load_manifest, load_tokenizer, shard_uris
from components.train.batch_transfer import BatchBuffer, BatchRing, DeviceBatches, init_worker, stop_workers
from components.train.sampler import Segment, ShardTable, skip_segments

SHUFFLE_BUFFER = 2000  # samples per shuffled block of a reader's sequence
MODES = ("epochs", "resampled", "eval")


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def read_segments(segments: Iterator[Segment]) -> Iterator[dict]:
    """The samples of the segments, in order. A shard holding fewer samples than the manifest counts is
    an error (a reader running short would leave its rank a step behind the others: a hang)."""
    for seg in segments:
        samples = tar_reader.shard_samples(seg.url, skip=seg.start)
        n = 0
        for sample in samples:
            yield sample
            n += 1
            if n == seg.size:
                break
        samples.close()
        if n < seg.size:
            raise tar_reader.ShardFormatError(
                f"{seg.url}: the manifest counts at least {seg.stop} samples but the shard ends after {seg.start + n}")


class _Reader(IterableDataset):
    """One rank's reader: yields ``(images, tokens, geometry, meta)`` batches, ``meta = (worker, samples
    delivered by that worker so far in the epoch, shard reads resumed in that worker, keys, ring slot)``; the ring
    slot is (DataLoader worker id, slot) when the batch is in `ring` (then the first three are None), else None.
    ``geometry`` is random_resized's crop boxes when the device resamples (`BatchBuffer`). The epoch
    and the start positions live in shared memory: persistent DataLoader workers see what the main process
    sets."""

    def __init__(self, table: ShardTable, mode: str, rank: int, world_size: int, num_workers: int, seed: int,
                 batch_size: int, batches_per_rank: int | None, shuffle_buffer: int, to_pair, tokenizer):
        self.table, self.mode, self.rank, self.world_size = table, mode, rank, world_size
        self.seed, self.batch_size, self.batches_per_rank = seed, batch_size, batches_per_rank
        self.block = max(1, shuffle_buffer)
        self.to_pair, self.tokenizer = to_pair, tokenizer
        size = to_pair.transform.device_layout()[0] if to_pair.device_resample else to_pair.transform.image_size
        self.pixel_shape = (size, size, 3)  # a sample's pixels as the workers write them (PIL's layout)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self._start = torch.zeros(max(1, num_workers), dtype=torch.int64).share_memory_()
        self._rotate = torch.zeros((), dtype=torch.int64).share_memory_()  # DataLoader worker i reads as i + rotate
        self.ring: BatchRing | None = None  # set by the loader before its DataLoader workers start

    def worker_batches(self, num_workers: int) -> list[int] | None:
        """Batches each worker delivers per epoch (epoch mode; None when endless)."""
        if self.mode != "epochs":
            return None
        k = self.batches_per_rank
        return [(w + 1) * k // num_workers - w * k // num_workers for w in range(num_workers)]

    def segments(self, epoch: int, worker: int, num_workers: int) -> Iterator[Segment]:
        """The reader's sequence of shard segments in `epoch` (endless when resampling)."""
        if self.mode == "epochs":
            return iter(self.table.reader_segments(self.seed, epoch, self.rank, self.world_size, worker,
                                                   num_workers, self.batch_size, self.batches_per_rank))
        if self.mode == "resampled":
            return self.table.resampled_segments(f"{self.seed}:{epoch}", self.rank, worker)
        urls, counts = self.table.urls, self.table.counts
        return (Segment(urls[i], 0, counts[i]) for i in range(len(urls))[self.rank::self.world_size][worker::num_workers])

    def _shuffled(self, segments: Iterator[Segment], start: int, key: str) -> Iterator[dict]:
        """The samples from position `start` on, in blocks of `self.block` permuted by (key, block)."""
        block = start // self.block
        stream = read_segments(skip_segments(segments, block * self.block))
        skip = start - block * self.block
        while True:
            chunk = list(itertools.islice(stream, self.block))
            if not chunk:
                return
            random.Random(f"{key}:{block}").shuffle(chunk)
            yield from chunk[skip:] if skip else chunk
            skip, block = 0, block + 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, tuple]]:
        worker_id, num_workers = _worker()
        if self.ring is not None and get_worker_info() is not None:
            self.ring.reclaim(worker_id)  # the main process reads nothing of this worker's last iteration now
        worker = (worker_id + int(self._rotate)) % num_workers
        epoch = int(self._epoch)
        train = self.mode != "eval"
        pos = int(self._start[worker]) if train else 0
        segments = self.segments(epoch, worker, num_workers)
        key = f"{self.seed}:{epoch}:{self.rank}:{worker}"
        samples = (self._shuffled(segments, pos, key) if train
                   else (sample for seg in segments for sample in tar_reader.shard_samples(seg.url)))
        captions: list[str] = []
        keys: list[str] = []
        buffer: BatchBuffer | None = None
        for sample in samples:
            if buffer is None:  # each sample's pixels go straight into the batch's row (a ring slot, mostly)
                buffer = BatchBuffer(self.ring, self.batch_size, self.pixel_shape)
            row = len(captions)
            caption, k = self.to_pair.into(sample, buffer.pixels[row], buffer.geometry[row],
                                           random.Random(f"{key}:{pos}") if train else None)
            captions.append(caption)
            keys.append(k)
            pos += 1
            if len(captions) == self.batch_size:
                yield self._batch(buffer, captions, keys, worker, pos)
                captions, keys, buffer = [], [], None
        if captions and not train:
            yield self._batch(buffer, captions, keys, worker, pos)

    def _batch(self, buffer: BatchBuffer, captions: list[str], keys: list[str], worker: int, pos: int) -> tuple:
        images, tokens, geometry, slot = buffer.finish(captions, self.tokenizer)
        return images, tokens, geometry, (worker, pos, tar_reader.RESUMES["count"], tuple(keys), slot)


class _ToPair:
    """webdataset sample -> (uint8 pixels [S, S, 3], caption, key): decoded no larger than the crop needs,
    never transposed here (`Normalize` does that on the device); random crops drawn from `rng`."""

    def __init__(self, transform, device_resample: bool = False):
        self.transform, self.device_resample = transform, device_resample
        self.min_side = transform.min_decoded_side()

    def _decoded(self, sample: dict) -> tuple[Image.Image, str, str]:
        key = sample.get("__key__", "?")
        if "jpg" not in sample or "txt" not in sample:
            raise ValueError(f"sample {key!r} in {sample.get('__url__')}: needs .jpg and .txt members "
                             f"(has {sorted(k for k in sample if not k.startswith('_'))})")
        return decode_image(sample["jpg"], key, min_side=self.min_side), sample["txt"].decode("utf-8"), key

    def __call__(self, sample: dict, rng: random.Random | None = None) -> tuple[np.ndarray, str, str]:
        image, caption, key = self._decoded(sample)
        return self.transform.pixels_hwc(image, rng), caption, key

    def into(self, sample: dict, out: np.ndarray, geometry: np.ndarray,
             rng: random.Random | None = None) -> tuple[str, str]:
        """The sample's pixels written into `out` (uint8 [S, S, 3], a batch row; with `device_resample` the
        random_resized box and its margin in [C, C, 3], its geometry into `geometry`) -> (caption, key)."""
        image, caption, key = self._decoded(sample)
        if self.device_resample:
            geometry[...] = self.transform.region_into(image, out, rng)
        else:
            self.transform.pixels_into(image, out, rng)
        return caption, key


# --------------------------------------------------------------------------- loader

class WdsLoader:
    """Iterable of ``(images ByteTensor[B,3,S,S], tokens LongTensor[B,77])``: uint8 pixels (channels-last
    memory: PIL's layout, not transposed), normalised later by ``normalize`` (the transform's; it also
    makes them contiguous), best on the device (`DeviceBatches`, `on_device`). For random_resized resampled on
    the device: ``(canvases, tokens, geometry)``, which ``normalize`` (then `ImageTransform.device_finish`) takes.

    One iteration is one epoch (endless when resampling). ``set_epoch(e, start)`` chooses the next
    iteration's epoch and, for resuming, where each of this rank's workers starts (samples it delivered
    before); otherwise the epoch advances by itself on each new iteration. ``positions`` holds, per
    worker, the samples delivered in the current epoch by the batches taken so far; ``resumes`` the shard
    reads each worker resumed after storage failures. ``num_samples`` is the split's size;
    ``batches_per_epoch`` the batches each rank takes per epoch (epoch mode; None otherwise). With
    ``num_workers`` > 0 one DataLoader with persistent workers serves every epoch (a new iteration
    restarts its workers' streams, it does not fork new workers)."""

    def __init__(self, reader: _Reader, num_workers: int, num_samples: int, batch_size: int, normalize,
                 prefetch: int = 2, pin_memory: bool = False):
        self.reader, self.num_workers = reader, num_workers
        self.num_samples, self.batch_size = num_samples, batch_size
        self.normalize, self.prefetch, self.pin_memory = normalize, prefetch, pin_memory
        self.positions = [0] * max(1, num_workers)
        self.resumes = [0] * max(1, num_workers)
        self._epoch = 0
        self._next: tuple[int, list[int] | None] | None = None
        self._dataloader: DataLoader | None = None
        self._stop: weakref.finalize | None = None  # stops the DataLoader's workers (`stop_workers`)

    @property
    def batches_per_epoch(self) -> int | None:
        return self.reader.batches_per_rank if self.reader.mode == "epochs" else None

    @property
    def epoch(self) -> int:
        """The epoch of the current (or last) iteration."""
        return self._epoch - 1

    def set_epoch(self, epoch: int, start: Sequence[int] | None = None) -> None:
        if start is not None and len(start) != len(self.positions):
            raise ValueError(f"start positions {list(start)} for {len(self.positions)} reader workers")
        self._next = (epoch, list(start) if start is not None else None)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._next if self._next is not None else (self._epoch, None)
        self._next, self._epoch = None, epoch + 1
        self.positions = list(start) if start is not None else [0] * len(self.positions)
        self.reader._epoch.fill_(epoch)  # shared memory: read by the reader in the workers too
        self.reader._start.copy_(torch.tensor(self.positions, dtype=torch.int64))
        self.reader._rotate.fill_(self._next_reader())
        if self.num_workers == 0:
            source = iter(self.reader)
        else:
            if self._dataloader is None:
                self.reader.ring = BatchRing(self.num_workers, self.prefetch + 1, self.batch_size,
                                             self.reader.pixel_shape, DEFAULT_CONTEXT_LENGTH)
                self._dataloader = DataLoader(self.reader, batch_size=None, num_workers=self.num_workers,
                                              persistent_workers=True, prefetch_factor=self.prefetch,
                                              pin_memory=self.pin_memory, worker_init_fn=init_worker)
                self._stop = weakref.finalize(self, stop_workers, self._dataloader)
            source = iter(self._dataloader)
        return self._taken(source)

    def close(self) -> None:
        """Stop the DataLoader workers now (also done when the loader is garbage; a no-op without workers)."""
        if self._stop is not None:
            self._stop()

    def _next_reader(self) -> int:
        """The worker whose batch comes next after the positions' batches: a new DataLoader iteration asks
        worker 0 first, so the workers' roles are rotated to keep the batch order of an uninterrupted epoch
        (round robin over the workers, skipping those that are done)."""
        taken = [p // self.batch_size for p in self.positions]
        totals = self.reader.worker_batches(len(taken))
        if totals is None:
            return sum(taken) % len(taken)
        produced, w, left = [0] * len(taken), 0, sum(taken)
        while True:
            if produced[w] < totals[w]:
                if not left:
                    return w
                produced[w], left = produced[w] + 1, left - 1
            elif produced == totals:
                return 0
            w = (w + 1) % len(taken)

    def _taken(self, source: Iterator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, tokens, geometry, meta in source:
            if meta[4] is not None:  # the batch waits in a ring slot
                images, tokens, geometry = self.reader.ring.receive(*meta[4], len(meta[3]), self.pin_memory)
                images = images.permute(0, 3, 1, 2)
            self.consumed(meta)
            yield (images, tokens, geometry) if self.reader.to_pair.device_resample else (images, tokens)

    def consumed(self, meta: tuple) -> None:
        """Bookkeeping for a batch the caller takes: its worker's position and resume count."""
        worker, position, resumes, _keys, _slot = meta
        self.positions[worker], self.resumes[worker] = position, resumes

    def epochs(self, epoch: int = 0, start: Sequence[int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every epoch from `epoch` on, back to back (the first from `start`): the training stream."""
        while True:
            self.set_epoch(epoch, start)
            yield from self
            epoch, start = epoch + 1, None

    def on_device(self, device: torch.device | str, epoch: int | None = None,
                  start: Sequence[int] | None = None) -> DeviceBatches:
        """One pass (endless when resampling), or with `epoch` every epoch from it on (`epochs`), as normalised
        float batches on ``device``."""
        return DeviceBatches(iter(self) if epoch is None else self.epochs(epoch, start), torch.device(device),
                             self.normalize)


def make_loader(manifest_or_uris: dict | str | Sequence[str], split: str, tokenizer, image_size: int,
                batch_size: int, train: bool = True, resample: bool = False, num_workers: int = 0,
                rank: int = 0, world_size: int = 1, seed: int = 0,
                shuffle_buffer: int = SHUFFLE_BUFFER, prefetch: int = 2, pin_memory: bool = False,
                train_crop: str = "random", grad_accum: int = 1, device_resample: bool | None = None) -> WdsLoader:
    """A reader over ``split``'s shards (a manifest, its URI, or for evaluation a list of shard URIs) for this
    ``rank`` of ``world_size``.

    ``tokenizer``: a ClipTokenizer, the URI of a ``tokenizer.json``, or None (the manifest's). Training
    (``train=True``) reads in epoch mode (`components.train.sampler`: each epoch every sample once across all
    ranks and workers, ``steps_per_epoch x grad_accum`` batches per rank), or with ``resample=True`` an
    endless draw of shards with replacement; samples are shuffled in blocks of ``shuffle_buffer`` and cropped
    with training augmentation. Evaluation (``train=False``) keeps order and partial batches. ``prefetch``:
    batches each DataLoader worker prepares ahead; ``pin_memory``: batches land in page-locked memory (for
    non_blocking copies to a GPU); ``train_crop``: the training crop (`clip_model.transforms`). With
    ``train_crop="random_resized"`` and ``device_resample`` (None: when a GPU is there; resampling on a CPU
    costs ~7x Pillow's) the workers only decode and draw each sample's box: batches are ``(uint8 canvases
    [B, 3, C, C], tokens, geometry [B, 6])`` and `on_device` resamples them all at once where the model runs
    (`ImageTransform.device_finish`)."""
    from clip_model.transforms import image_transform
    from components.train.sampler import steps_per_epoch

    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if batch_size < 1 or grad_accum < 1:
        raise ValueError(f"batch_size={batch_size}, grad_accum={grad_accum}: must be >= 1")
    if prefetch < 1:
        raise ValueError(f"prefetch={prefetch}: must be >= 1 batch per worker")
    if isinstance(manifest_or_uris, str):
        manifest_or_uris = load_manifest(manifest_or_uris)
    mode = ("resampled" if resample else "epochs") if train else "eval"
    if isinstance(manifest_or_uris, dict):
        shard_uris(manifest_or_uris, split)  # a clear error for a missing split
        table = ShardTable.from_manifest(manifest_or_uris, split)
    elif train:
        raise ValueError("a training reader needs a manifest (its per-shard sample counts plan the epochs)")
    else:
        table = ShardTable(list(manifest_or_uris), [0] * len(manifest_or_uris))
    if not table.urls:
        raise ValueError(f"split {split!r} has no shards")
    readers = world_size * max(1, num_workers)
    if mode == "eval" and len(table.urls) < readers:
        raise ValueError(
            f"split {split!r} has {len(table.urls)} shards but world_size={world_size} x num_workers="
            f"{max(1, num_workers)} = {readers} readers each need at least one (an idle reader makes "
            "distributed evaluation hang): write smaller shards or use fewer workers")
    batches_per_rank = None
    if mode == "epochs":
        batches_per_rank = steps_per_epoch(table.num_samples, world_size, batch_size, grad_accum) * grad_accum
        if batches_per_rank < 1:
            raise ValueError(f"split {split!r} has {table.num_samples} samples: fewer than one batch of {batch_size}"
                             f" x grad_accum {grad_accum} for each of {world_size} ranks")
    if tokenizer is None:
        if not isinstance(manifest_or_uris, dict):
            raise ValueError("tokenizer=None needs a manifest (it names the tokenizer); got a list of shard URIs")
        tokenizer = manifest_or_uris["tokenizer"]
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)

    transform = image_transform(image_size, train, train_crop=train_crop)
    if device_resample is None:
        device_resample = torch.cuda.is_available()
    on_device = device_resample and train and train_crop == "random_resized"
    reader = _Reader(table, mode, rank, world_size, num_workers, seed, batch_size, batches_per_rank,
                     shuffle_buffer, _ToPair(transform, on_device), tokenizer)
    finish = transform.device_finish if on_device else transform.normalize
    return WdsLoader(reader, num_workers, table.num_samples, batch_size, finish, prefetch=prefetch,
                     pin_memory=pin_memory and torch.cuda.is_available())

"""Reading the shard stage's output: manifest, training/eval loaders, plain sample iteration.

Shards stream straight from S3 through boto3 (an ``s3://`` handler registered with webdataset's
``gopen``; no AWS CLI, no ``pipe:``); local paths are opened as files.

Splitting is explicit: shards go to ranks by ``rank``/``world_size`` (given by the caller, never
read from torch.distributed), then to DataLoader workers. Without resampling every (rank, worker)
needs at least one shard, otherwise it would yield nothing and a DDP job would hang: that is refused
with a clear ValueError. With ``resample=True`` each reader draws shards with replacement forever
(seeded by seed, rank, worker and epoch): pair it with a fixed number of steps per epoch, which also
keeps every rank's step count identical.
"""

from __future__ import annotations

import importlib
import io
import json
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import webdataset as wds
_gopen = importlib.import_module("webdataset.gopen")  # the module; `webdataset.gopen` is shadowed by the function

from clip_model.transforms import to_rgb
from components import storage

FORMAT = "clip-wds/1"
SHUFFLE_BUFFER = 2000


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **kw: Any):
    if mode != "rb":
        raise ValueError(f"{url}: the s3:// handler only reads (mode {mode!r})")
    return storage.open_read(url)


_gopen.gopen_schemes["s3"] = _gopen_s3


# --------------------------------------------------------------------------- manifest

def load_manifest(uri: str) -> dict:
    """Read and check a ``manifest.json`` (a URI of the file or of the folder holding it)."""
    if not uri.endswith(".json"):
        uri = storage.join(uri, "manifest.json")
    m = storage.read_json(uri)
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{uri}: not a {FORMAT} manifest (format={m.get('format') if isinstance(m, dict) else None!r})")
    for split, info in m.get("splits", {}).items():
        for i, s in enumerate(info.get("shards", [])):
            missing = [k for k in ("uri", "samples", "sha256") if k not in s]
            if missing:
                raise ValueError(f"{uri}: split {split!r} shard #{i} lacks {missing}")
    return m


def shard_uris(manifest_or_uris: dict | str | Sequence[str], split: str) -> list[str]:
    """The shard URIs of ``split``: from a manifest dict, a manifest URI, or a list of URIs as is."""
    if isinstance(manifest_or_uris, str):
        manifest_or_uris = load_manifest(manifest_or_uris)
    if isinstance(manifest_or_uris, dict):
        splits = manifest_or_uris.get("splits", {})
        if split not in splits:
            raise ValueError(f"manifest has no split {split!r} (has {sorted(splits)})")
        return [s["uri"] for s in splits[split]["shards"]]
    return list(manifest_or_uris)


def split_samples(manifest_or_uris: dict | str | Sequence[str], split: str) -> int | None:
    """Number of samples in ``split`` when known from a manifest, else None."""
    if isinstance(manifest_or_uris, str):
        manifest_or_uris = load_manifest(manifest_or_uris)
    if isinstance(manifest_or_uris, dict):
        return int(manifest_or_uris["splits"][split]["samples"])
    return None


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
        self.epoch = 0

    def __iter__(self) -> Iterator[dict]:
        worker, num_workers = _worker()
        if self.resample:
            rng = random.Random(f"{self.seed}:{self.epoch}:{self.rank}:{worker}")
            while True:
                yield {"url": rng.choice(self.urls)}
        urls = list(self.urls)
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(urls)
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


def _decode_image(data: bytes, key: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as e:
        raise ValueError(f"sample {key!r}: cannot decode image ({type(e).__name__}: {e})") from e
    return to_rgb(img)


def _to_pair(transform: Callable) -> Callable[[dict], tuple]:
    def f(sample: dict) -> tuple:
        key = sample.get("__key__", "?")
        if "jpg" not in sample or "txt" not in sample:
            raise ValueError(f"sample {key!r} in {sample.get('__url__')}: needs .jpg and .txt members "
                             f"(has {sorted(k for k in sample if not k.startswith('_'))})")
        return transform(_decode_image(sample["jpg"], key)), sample["txt"].decode("utf-8")
    return f


class _Collate:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([b[0] for b in batch])
        tokens = self.tokenizer([b[1] for b in batch])
        return images, tokens


# --------------------------------------------------------------------------- loader

class WdsLoader:
    """Iterable of ``(images FloatTensor[B,3,S,S], tokens LongTensor[B,77])``.

    ``set_epoch(e)`` changes the shard order / resampling seed (it also advances by itself on each
    new iteration). ``num_samples`` is the split's size when a manifest was given;
    ``batches_per_epoch`` is the number of full batches each rank can take per pass over it."""

    def __init__(self, pipeline: wds.DataPipeline, shards: _ShardList, num_workers: int,
                 num_samples: int | None, batch_size: int, world_size: int):
        self.pipeline, self.shards, self.num_workers = pipeline, shards, num_workers
        self.num_samples, self.batch_size, self.world_size = num_samples, batch_size, world_size
        self._epoch = 0
        self._next_epoch: int | None = None

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
        self.shards.epoch = epoch  # read by the shard list (in the forked workers too)
        if self.num_workers == 0:
            yield from self.pipeline
        else:
            yield from DataLoader(self.pipeline, batch_size=None, num_workers=self.num_workers,
                                  persistent_workers=False)


def make_loader(manifest_or_uris: dict | str | Sequence[str], split: str, tokenizer, image_size: int,
                batch_size: int, train: bool = True, resample: bool = False, num_workers: int = 0,
                rank: int = 0, world_size: int = 1, seed: int = 0,
                shuffle_buffer: int = SHUFFLE_BUFFER) -> WdsLoader:
    """A webdataset pipeline over ``split``'s shards for this ``rank`` of ``world_size``.

    ``tokenizer``: a ClipTokenizer, the URI of a ``tokenizer.json``, or None (the manifest's). Training (``train=True``)
    shuffles shards and samples (buffer ``shuffle_buffer``), uses training augmentation and drops
    each reader's last partial batch; evaluation keeps order and partial batches."""
    from clip_model.transforms import image_transform

    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
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
    stages: list[Any] = [shards, wds.tarfile_to_samples()]
    if train and shuffle_buffer > 1:
        stages.append(_SampleShuffle(shards, shuffle_buffer))
    stages.append(wds.map(_to_pair(image_transform(image_size, train))))
    stages.append(wds.batched(batch_size, collation_fn=_Collate(tokenizer), partial=not train))
    return WdsLoader(wds.DataPipeline(*stages), shards, num_workers, num_samples, batch_size, world_size)


def load_tokenizer(uri: str):
    """A ClipTokenizer from a ``tokenizer.json`` at a local path or s3:// URI."""
    from clip_model.tokenizer import ClipTokenizer

    return ClipTokenizer.from_str(storage.read_text(uri), source=uri)


# --------------------------------------------------------------------------- plain iteration

def iter_samples(manifest_or_uris: dict | str | Sequence[str], split: str
                 ) -> Iterator[tuple[str, Image.Image, str, dict]]:
    """Every sample of ``split`` in shard order: ``(key, PIL RGB image, caption, metadata)``."""
    for url in shard_uris(manifest_or_uris, split):
        for sample in wds.DataPipeline(wds.SimpleShardList([url]), wds.tarfile_to_samples()):
            key = sample["__key__"]
            meta = json.loads(sample["json"].decode("utf-8")) if "json" in sample else {}
            yield key, _decode_image(sample["jpg"], key), sample["txt"].decode("utf-8"), meta

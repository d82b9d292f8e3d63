"""Which samples each reader reads, epoch by epoch, and where it stands: the training data's plan.

Two samplings (`TrainConfig.sampling`):

- ``epochs`` (the default, as the CLIP paper and OpenCLIP's default count them): every epoch the shard list
  is shuffled with a seed shared by all ranks (seed, epoch) and laid end to end as one sequence of the
  split's N samples (the manifest's per-shard counts). Rank r of W takes the samples
  ``[r * (N // W), r * (N // W) + used)`` of it, where ``used = steps_per_epoch * grad_accum * batch_size``
  is the same on every rank, so every rank ends the epoch at the same step (no deadlock). Its DataLoader
  workers split that range in contiguous runs of whole batches. Readers are disjoint: a shard belongs to
  one reader, except where a range boundary falls inside it (then two readers read different samples of
  it). Per epoch ``N - W * used`` samples are left out, always fewer than one global batch (see
  `steps_per_epoch`); the shard shuffle changes which ones every epoch.
- ``resampled`` (OpenCLIP's ``--dataset-resampled``): each reader draws whole shards with replacement,
  endlessly, seeded by (seed, rank, worker).

Either way a reader's samples form one sequence, shuffled in blocks of ``shuffle_buffer`` samples (each
block permuted with its own seed), so that the position "n samples consumed" names an exact place:
resuming skips the whole shards before it by their manifest counts and re-reads at most one block and one
partial shard (`DataPosition`). A checkpoint records the position of every reader, so a resumed run reads
exactly the samples the interrupted one had not consumed.
"""

from __future__ import annotations

import bisect
import functools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

SAMPLINGS = ("epochs", "resampled")
PAPER_EPOCHS = 32  # the CLIP paper's budget: the default when neither steps, epochs nor samples is given


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` (in file order) of one shard."""

    url: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int, grad_accum: int = 1) -> int:
    """Optimizer steps in one epoch: as many whole steps as every rank can fill from its ``N // W``
    samples. The samples left out, ``N - W * steps * grad_accum * batch_size``, are fewer than one global
    batch (``W * grad_accum * batch_size``)."""
    return (num_samples // world_size) // (batch_size * grad_accum)


@dataclass(frozen=True)
class Budget:
    """How long a run trains: the given budget and the others derived from it (all logged)."""

    steps: int  # optimizer steps
    epochs: float  # passes over the training split (nominal for resampled data)
    samples: int  # samples trained on (steps x global batch)
    steps_per_epoch: int  # optimizer steps per epoch
    dropped_per_epoch: int  # samples of each epoch no rank reads (< one global batch)
    given: str  # which one was set: steps | epochs | samples


def resolve_budget(*, steps: int, epochs: float, samples: int, num_samples: int, world_size: int,
                   batch_size: int, grad_accum: int) -> Budget:
    """The run's budget from exactly one of ``steps``, ``epochs`` and ``samples`` (0 = not given; none given:
    the paper's 32 epochs), the split's ``num_samples`` and the batch layout."""
    given = [name for name, value in (("steps", steps), ("epochs", epochs), ("samples", samples)) if value]
    if len(given) > 1:
        raise ValueError(f"the training budget is given twice ({' and '.join(given)}): set exactly one of steps, "
                         "epochs and samples (0 = not given)")
    global_batch = batch_size * grad_accum * world_size
    spe = steps_per_epoch(num_samples, world_size, batch_size, grad_accum)
    if spe < 1:
        raise ValueError(f"the training split has {num_samples} samples, fewer than one global batch of {global_batch} "
                         f"(batch_size {batch_size} x grad_accum {grad_accum} x {world_size} processes): use a "
                         "smaller batch or more data")
    if not given:
        epochs, given = PAPER_EPOCHS, ["epochs"]
    if given[0] == "epochs":
        total = max(1, round(epochs * spe))
    elif given[0] == "samples":
        total = max(1, -(-samples // global_batch))
    else:
        total = steps
    return Budget(steps=total, epochs=total / spe, samples=total * global_batch, steps_per_epoch=spe,
                  dropped_per_epoch=num_samples - spe * global_batch, given=given[0])


@dataclass
class ShardTable:
    """The split's shards (URIs and sample counts, from the manifest): what every rank plans with."""

    urls: list[str]
    counts: list[int]
    _order: tuple = field(default=(None, [], []), repr=False, compare=False)  # (seed, epoch), order, ends: the last

    @classmethod
    def from_manifest(cls, manifest: dict, split: str) -> "ShardTable":
        shards = manifest["splits"][split]["shards"]
        return cls([s["uri"] for s in shards], [int(s["samples"]) for s in shards])

    @functools.cached_property
    def num_samples(self) -> int:
        return sum(self.counts)

    def epoch_segments(self, seed: int, epoch: int, lo: int, hi: int) -> list[Segment]:
        """Samples ``[lo, hi)`` of the epoch's sequence (the shards shuffled by (seed, epoch), end to end)."""
        order, ends = self.epoch_order(seed, epoch)
        out, i = [], bisect.bisect_right(ends, lo)
        while i < len(order) and lo < hi:
            begin = ends[i] - self.counts[order[i]]
            stop = min(ends[i], hi)
            out.append(Segment(self.urls[order[i]], lo - begin, stop - begin))
            lo, i = stop, i + 1
        return out

    def epoch_order(self, seed: int, epoch: int) -> tuple[list[int], list[int]]:
        """The epoch's shard order and the cumulative sample counts along it, kept for the last (seed, epoch)
        asked: a rank plans all its workers from one shuffle (40,000 shards: ~25 ms each, see test_epochs)."""
        if self._order[0] != (seed, epoch):
            order = list(range(len(self.urls)))
            random.Random(f"{seed}:{epoch}:shards").shuffle(order)
            ends = np.cumsum(np.asarray(self.counts, dtype=np.int64)[order]).tolist() if order else []
            self._order = ((seed, epoch), order, ends)
        return self._order[1], self._order[2]

    def reader_segments(self, seed: int, epoch: int, rank: int, world_size: int, worker: int, num_workers: int,
                        batch_size: int, batches_per_rank: int) -> list[Segment]:
        """Reader (rank, worker)'s samples in epoch mode: its rank's range, the worker's run of whole batches."""
        base = rank * (self.num_samples // world_size)
        first, last = worker * batches_per_rank // num_workers, (worker + 1) * batches_per_rank // num_workers
        return self.epoch_segments(seed, epoch, base + first * batch_size, base + last * batch_size)

    def shard_positions(self, seed: int, epoch: int, readers: list[list[int]], batch_size: int,
                        batches_per_rank: int) -> list[list[dict]]:
        """Where every reader stands in shard terms (`where_in_shards`), ``readers[rank][worker]`` being the samples
        it consumed in `epoch`: what a checkpoint records, for all ranks (one shuffle for them all)."""
        world_size = len(readers)
        return [[where_in_shards(self.reader_segments(seed, epoch, rank, world_size, w, len(positions), batch_size,
                                                      batches_per_rank), consumed)
                 for w, consumed in enumerate(positions)]
                for rank, positions in enumerate(readers)]

    def resampled_segments(self, seed: int, rank: int, worker: int) -> Iterator[Segment]:
        """Reader (rank, worker)'s endless draw of whole shards with replacement."""
        rng = random.Random(f"{seed}:{rank}:{worker}:resampled")
        while True:
            i = rng.randrange(len(self.urls))
            yield Segment(self.urls[i], 0, self.counts[i])


def skip_segments(segments: Iterator[Segment], n: int) -> Iterator[Segment]:
    """The segments from sample ``n`` of their sequence on (whole segments skipped by their size)."""
    for seg in segments:
        if n >= seg.size:
            n -= seg.size
            continue
        yield Segment(seg.url, seg.start + n, seg.stop) if n else seg
        n = 0


@dataclass
class DataPosition:
    """Where the training data stands: the epoch, and per rank and DataLoader worker the samples that reader
    has delivered to training steps in this epoch (``readers[rank][worker]``). ``layout`` is what the
    positions are valid for (sampling, world size, loader workers, batch, manifest): a resume under another
    layout cannot continue them."""

    epoch: int = 0
    readers: list[list[int]] = field(default_factory=list)
    layout: dict = field(default_factory=dict)
    shards: list[list[dict]] = field(default_factory=list)  # per reader: shards finished, samples into the current

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "readers": self.readers, "layout": self.layout, "shards": self.shards}

    @classmethod
    def from_dict(cls, d: dict | None) -> "DataPosition":
        d = d or {}
        return cls(int(d.get("epoch", 0)), [list(map(int, r)) for r in d.get("readers", [])],
                   dict(d.get("layout", {})), d.get("shards", []))

    def for_rank(self, rank: int, num_workers: int) -> list[int]:
        """This rank's workers' start positions (zeros at an epoch's start)."""
        if rank < len(self.readers) and len(self.readers[rank]) == num_workers:
            return list(self.readers[rank])
        return [0] * num_workers


def where_in_shards(segments: list[Segment], consumed: int) -> dict:
    """A reader's position in shard terms: shards finished, and samples consumed in the one it is reading."""
    done = 0
    for seg in segments:
        if consumed < seg.size:
            return {"shards_finished": done, "shard": seg.url, "samples_in_shard": seg.start + consumed}
        consumed -= seg.size
        done += 1
    return {"shards_finished": done, "shard": None, "samples_in_shard": 0}

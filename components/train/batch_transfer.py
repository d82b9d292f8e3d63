"""How a batch crosses from a DataLoader worker to the training process: stacked (`Collate`) into a slot of
a shared-memory ring (`BatchRing`) or, when none is free, into a new shared block; workers tokenize on one
thread (`init_worker`). Used by `components.train.loader`; the reasons and the costs are in its docstring."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import get_worker_info


class BatchRing:
    """Shared-memory batch slots, `slots` per DataLoader worker process, made once in the main process before
    the workers start (forked workers share the pages). ``free[w, i]`` is 1 while slot i of worker w may be
    written; a worker takes one (`take`), stacks a batch into it and sends only its number; the main process
    copies the batch out (`copy_out`), which frees the slot. A slot is never written while the main process
    may still read it: only its worker takes it, and only when it is free. Batches a new iteration discards
    unread are never copied out: the worker frees its slots when it starts the next iteration (`reclaim`),
    when the main process reads nothing of the old one any more."""

    def __init__(self, workers: int, slots: int, batch_size: int, pixel_shape: tuple[int, ...]):
        self.pixels = torch.empty((workers, slots, batch_size, *pixel_shape), dtype=torch.uint8).share_memory_()
        self.free = torch.ones((workers, slots), dtype=torch.uint8).share_memory_()
        self.slots = slots
        self._next = 0  # the slot a worker tries first (each worker process has its own copy)

    def reclaim(self, worker_id: int) -> None:
        self.free[worker_id].fill_(1)
        self._next = 0

    def take(self, worker_id: int) -> int | None:
        """A free slot of this worker, now taken; None when every slot still waits to be copied out."""
        free = self.free[worker_id]
        for k in range(self.slots):
            i = (self._next + k) % self.slots
            if free[i]:
                free[i] = 0
                self._next = (i + 1) % self.slots
                return i
        return None

    def copy_out(self, worker_id: int, slot: int, n: int, pin_memory: bool) -> torch.Tensor:
        """The first `n` rows of a slot copied into (pinned) memory of this process; the slot is freed."""
        source = self.pixels[worker_id, slot, :n]
        out = torch.empty(source.shape, dtype=torch.uint8, pin_memory=pin_memory)
        np.copyto(out.numpy(), source.numpy())  # one thread (torch's copy_ would use its thread pool)
        self.free[worker_id, slot] = 1
        return out


class Collate:
    """A batch of (pixels [S, S, 3], caption, key) -> (uint8 images [B, 3, S, S], tokens)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, batch: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        # uint8 [B, 3, S, S] with channels-last strides (one copy of the [S, S, 3] pixels); numpy's stack
        # uses no intra-op thread pool (torch.stack with several threads can spend more time in its
        # thread pool than copying, on a busy machine). In a DataLoader worker the pixels are stacked straight
        # into shared memory, which is how the batch crosses to the training process (else it is copied there)
        first = batch[0][0]
        shape = (len(batch), *first.shape)
        if get_worker_info() is not None:
            storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * first.itemsize)
            images = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
            np.stack([b[0] for b in batch], out=images.numpy())
        else:
            images = torch.from_numpy(np.stack([b[0] for b in batch]))
        tokens = self.tokenizer([b[1] for b in batch])
        return images.permute(0, 3, 1, 2), tokens

    def into(self, batch: list[tuple], pixels: torch.Tensor) -> torch.Tensor:
        """Stack the pixels into `pixels` (a ring slot [>= B, S, S, 3]); -> the tokens."""
        np.stack([b[0] for b in batch], out=pixels[:len(batch)].numpy())
        return self.tokenizer([b[1] for b in batch])


def init_worker(_worker_id: int) -> None:
    """A DataLoader worker tokenizes its own batches on one thread: the workers are the parallelism, and the
    tokenizer's thread pool in each of them costs ~0.25 ms of CPU per sample (a third more than decoding, on
    2 cores) spinning for work."""
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"

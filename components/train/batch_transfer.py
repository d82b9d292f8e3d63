"""How a batch crosses from a DataLoader worker to the training process. A worker writes each sample's pixels
straight into a slot of a shared-memory ring (`BatchRing`), the batch's tokens beside them, and sends only the
slot's number; when no slot is free, into a new shared block (`BatchBuffer`). Workers tokenize on one thread
(`init_worker`), and are stopped while their queues still work (`stop_workers`). `DeviceBatches` takes the batches
to the device. Used by `components.train.loader`; the reasons and the costs are in its docstring."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import get_worker_info

FREE, SENT, HELD = 0, 1, 2  # a ring slot's state: a worker may write it | sent, not yet taken | taken, in use


class BatchRing:
    """Shared-memory batch slots, `slots` per DataLoader worker process, made once in the main process before
    the workers start (forked workers share the pages): pixels [B, *pixel_shape] uint8, tokens [B, L] int64 and
    each sample's crop geometry [B, 6] float64 (`random_resized` resampled on the device; else unused).

    ``state[w, i]`` says who owns slot i of worker w. A worker takes a FREE slot (`take`), writes a batch into it
    and sends its number (SENT); the main process takes the batch (`receive`): into pinned memory (a copy; the
    slot is FREE again at once), or else as a view of the slot itself (HELD) that frees the slot when the last
    tensor using its memory is gone (`_Lease`). A slot is never written while the main process may still read
    it: only its worker takes it, and only when it is FREE. Batches a new iteration discards unread are never
    received: the worker frees its SENT slots when it starts the next iteration (`reclaim`), when the main
    process takes nothing of the old one any more (HELD slots stay held)."""

    def __init__(self, workers: int, slots: int, batch_size: int, pixel_shape: tuple[int, ...], context_length: int):
        self.pixels = torch.empty((workers, slots, batch_size, *pixel_shape), dtype=torch.uint8).share_memory_()
        self.tokens = torch.zeros((workers, slots, batch_size, context_length), dtype=torch.int64).share_memory_()
        self.geometry = torch.zeros((workers, slots, batch_size, 6), dtype=torch.float64).share_memory_()
        self.state = torch.zeros((workers, slots), dtype=torch.uint8).share_memory_()
        self.slots = slots
        self._next = 0  # the slot a worker tries first (each worker process has its own copy)

    def reclaim(self, worker_id: int) -> None:
        state = self.state[worker_id].numpy()
        state[state == SENT] = FREE
        self._next = 0

    def take(self, worker_id: int) -> int | None:
        """A FREE slot of this worker, now SENT (the worker writes it, then sends it); None when none is free."""
        state = self.state[worker_id].numpy()
        for k in range(self.slots):
            i = (self._next + k) % self.slots
            if state[i] == FREE:
                state[i] = SENT
                self._next = (i + 1) % self.slots
                return i
        return None

    def receive(self, worker_id: int, slot: int, n: int,
                pin_memory: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The first `n` rows of a slot in the main process: (pixels [n, *pixel_shape], tokens, geometry). Pinned:
        copied (one thread; torch's copy_ would use its thread pool) and the slot freed; else the pixels are the
        slot's own memory, held until no tensor uses them."""
        tokens, geometry = self.tokens[worker_id, slot, :n].clone(), self.geometry[worker_id, slot, :n].clone()
        source = self.pixels[worker_id, slot, :n]
        if pin_memory:
            images = torch.empty(source.shape, dtype=torch.uint8, pin_memory=True)
            np.copyto(images.numpy(), source.numpy())
            self.state[worker_id, slot] = FREE
            return images, tokens, geometry
        self.state[worker_id, slot] = HELD
        return torch.from_numpy(np.asarray(_Lease(self, worker_id, slot, source))), tokens, geometry


class _Lease:
    """A HELD slot's pixels for numpy (``np.asarray(lease)`` keeps the lease as the array's base, and
    ``torch.from_numpy`` keeps that array for as long as any tensor shares its memory): freed when collected."""

    def __init__(self, ring: BatchRing, worker_id: int, slot: int, pixels: torch.Tensor):
        self.ring, self.worker_id, self.slot = ring, worker_id, slot
        self.__array_interface__ = {"shape": tuple(pixels.shape), "typestr": "|u1", "version": 3,
                                    "data": (pixels.data_ptr(), False)}

    def __del__(self) -> None:
        self.ring.state[self.worker_id, self.slot] = FREE


class BatchBuffer:
    """Where a worker writes one batch: a ring slot when one is free, else a new block of shared memory (which is
    how a tensor crosses to the training process anyway; outside a DataLoader worker, plain memory).
    ``pixels[i]`` and ``geometry[i]`` are sample i's rows; `finish` tokenizes the captions and gives what the
    worker yields: ``(images [n, 3, S, S], tokens, geometry, slot)``, None for the first three when the batch
    waits in a ring slot, None for the slot when not."""

    def __init__(self, ring: BatchRing | None, batch_size: int, pixel_shape: tuple[int, ...]):
        info = get_worker_info()
        self.slot = ring.take(info.id) if ring is not None and info is not None else None
        self.ring, self.worker_id = ring, info.id if info is not None else 0
        if self.slot is not None:
            self.images = None
            self.pixels = ring.pixels[info.id, self.slot].numpy()
            self.geometry = ring.geometry[info.id, self.slot].numpy()
            return
        self.geometry = np.zeros((batch_size, 6), dtype=np.float64)
        shape = (batch_size, *pixel_shape)
        if info is not None:
            storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
            self.images = torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)
        else:
            self.images = torch.empty(shape, dtype=torch.uint8)
        self.pixels = self.images.numpy()

    def finish(self, captions: list[str], tokenizer) -> tuple:
        n = len(captions)
        tokens = tokenizer.encode_np(captions)
        if self.slot is not None:
            self.ring.tokens[self.worker_id, self.slot, :n].numpy()[...] = tokens
            return None, None, None, (self.worker_id, self.slot)
        # uint8 [n, 3, S, S] with channels-last strides: PIL's layout, transposed on the device by Normalize
        return (self.images[:n].permute(0, 3, 1, 2), torch.from_numpy(tokens), torch.from_numpy(self.geometry[:n]),
                None)


def stop_workers(dataloader) -> None:
    """Shut a persistent DataLoader's workers down while its queues still work. Left to the DataLoader's own
    ``__del__``, a loader freed by the cycle collector (any reference cycle through it) loses its index queues'
    feeder threads first (their weakref finalizers run before ``__del__``): the workers never get the stop
    signal and each costs its 5 s join timeout. `WdsLoader` registers this with `weakref.finalize`, which holds
    the DataLoader, so the queues outlive the loader."""
    iterator = getattr(dataloader, "_iterator", None)
    if iterator is not None:
        iterator._shutdown_workers()


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
        images, tokens, *extra = next(self.batches)  # extra: random_resized's crop geometry, to resample here
        if self.stream is None:
            return self.normalize(images.to(self.device), *(t.to(self.device) for t in extra)), tokens.to(self.device)
        with torch.cuda.stream(self.stream):
            images = self.normalize(images.to(self.device, non_blocking=True),
                                    *(t.to(self.device, non_blocking=True) for t in extra))
            tokens = tokens.to(self.device, non_blocking=True)
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self.stream)
        for tensor in (images, tokens):
            tensor.record_stream(main)  # allocated on the side stream, used on the main one
        return images, tokens


def init_worker(_worker_id: int) -> None:
    """A DataLoader worker tokenizes its own batches on one thread: the workers are the parallelism, and the
    tokenizer's thread pool in each of them costs ~0.25 ms of CPU per sample (a third more than decoding, on
    2 cores) spinning for work."""
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"

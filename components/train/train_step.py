"""One optimizer step of CLIP training (`TrainStep`), shared by the Ray Train loop, the GPU check and
the benchmarks. (`task.py` beside it is what the KFP task runs.)

A step takes `grad_accum` micro-batches. With one, it is the plain step: forward, loss over the
features gathered across workers, backward. With k > 1 the contrastive loss still sees the whole
accumulated batch as negatives, as OpenCLIP's ``accum_freq`` does: first every micro-batch's
features are computed without gradients, then each micro-batch is recomputed with gradients and
its loss is taken against the cached features of the others. The loss is then the loss of one
batch of k x B, and the gradients summed over the k backward passes are its gradients (each pass
holds the gradient for its own rows; the temperature's gradient is taken in the last pass only).
That costs one extra forward pass per micro-batch, the price of k x B negatives in memory for B.
BatchNorm (the ResNet towers) still normalises over each micro-batch.

Nothing in a step waits for the device: no `.item()`, no host-side checks; the caller reads the
returned loss tensor when it logs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import nullcontext

import torch
from torch import nn


def autocast(precision: str, device: torch.device):
    """The mixed-precision context of `precision` (fp32: none)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _loss_dtype(t: torch.Tensor) -> torch.Tensor:
    """The loss runs in float32 at least (bf16/fp16 features are promoted, float64 stays)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class TrainStep:
    """One optimizer step: `grad_accum` micro-batches (DDP gradient sync only on the last), autocast
    in bf16/fp16 (fp16 with a GradScaler), loss in fp32 over features gathered across workers,
    gradient clipping, AdamW, the lr schedule, and the logit scale clamped to ln(100).

    `model` may be DDP-wrapped (from `ray.train.torch.prepare_model`) or a plain CLIP; its forward
    gives (image features, text features, logit scale), features L2-normalised. `compile=True`
    compiles each residual block of both towers (`CLIP.compile_blocks`) with `compile_backend`."""

    def __init__(self, model: nn.Module, optimizer, scheduler, scaler, precision: str,
                 device: torch.device, grad_accum: int = 1, grad_clip: float | None = None,
                 compile: bool = False, compile_backend: str = "inductor") -> None:
        from clip_model.loss import ClipLoss

        if grad_accum < 1:
            raise ValueError(f"grad_accum={grad_accum}: must be >= 1")
        self.model = model
        self.raw_model = model.module if hasattr(model, "module") else model
        if compile:
            self.raw_model.compile_blocks(backend=compile_backend)
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.precision, self.device = precision, device
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        self.loss_fn = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True)

    def step(self, batches: Iterator) -> tuple[torch.Tensor, float]:
        """-> (the step's loss as a detached tensor, seconds spent waiting for data)."""
        from components.train.optim import clamp_logit_scale

        t = time.perf_counter()
        micro = [next(batches) for _ in range(self.grad_accum)]
        wait = time.perf_counter() - t
        loss = self.backward(micro)
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        clamp_logit_scale(self.raw_model)
        return loss, wait

    def backward(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Forward and backward over the micro-batches [(images, tokens), ...]: leaves the gradients of
        the loss of their concatenation in `.grad` and returns that loss (detached)."""
        if any(images.dtype == torch.uint8 for images, _ in micro):
            raise TypeError("TrainStep takes normalised float images; the reader's uint8 batches are normalised "
                            "on the device by loader.on_device(device)")
        micro = [(images.to(self.device, non_blocking=True), tokens.to(self.device, non_blocking=True))
                 for images, tokens in micro]
        if len(micro) == 1:
            images, tokens = micro[0]
            with autocast(self.precision, self.device):
                image_f, text_f, scale = self.model(images, tokens)
            loss = self.loss_fn(_loss_dtype(image_f), _loss_dtype(text_f), _loss_dtype(scale))
            self.scaler.scale(loss).backward()
            return loss.detach()

        # 1. every micro-batch's features, without gradients
        cached = []
        with torch.no_grad(), autocast(self.precision, self.device):
            for images, tokens in micro:
                image_f, text_f, _ = self.model(images, tokens)
                cached.append((_loss_dtype(image_f), _loss_dtype(text_f)))
        # 2. each micro-batch again with gradients, against the others' cached features
        last = len(micro) - 1
        for j, (images, tokens) in enumerate(micro):
            inner = j < last and hasattr(self.model, "no_sync")
            with self.model.no_sync() if inner else nullcontext():
                with autocast(self.precision, self.device):
                    image_f, text_f, scale = self.model(images, tokens)
                all_images = torch.cat([f for f, _ in cached[:j]] + [_loss_dtype(image_f)]
                                       + [f for f, _ in cached[j + 1:]])
                all_texts = torch.cat([f for _, f in cached[:j]] + [_loss_dtype(text_f)]
                                      + [f for _, f in cached[j + 1:]])
                # the temperature's gradient once, in the pass where DDP syncs (every parameter gets one there)
                scale = _loss_dtype(scale if j == last else scale.detach())
                loss = self.loss_fn(all_images, all_texts, scale)
                self.scaler.scale(loss).backward()
        return loss.detach()

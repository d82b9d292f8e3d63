"""Image preprocessing for CLIP, with PIL and torch only (no torchvision).

- eval: resize the shorter side to S (bicubic), centre-crop S x S;
- train: random resized crop (area fraction in ``scale``, aspect ratio in ``ratio``) resized to S x S;
- both: convert to RGB (L, LA, P, RGBA, CMYK, I;16, I, F ...), then normalise with CLIP's mean and std.

The work is split in two halves so that the normalisation can run where the model runs:
``transform.pixels(image)`` is the geometric half (a uint8 tensor [3, S, S], what the training reader's
workers send: 4x fewer bytes than float32), and ``Normalize`` (``transform.normalize``) turns a uint8 batch
[..., 3, S, S] into the normalised float tensor on any device. ``transform(image)`` does both and gives
exactly ``normalize(pixels(image))``.

``image_transform(224, train=False)`` returns a picklable callable (safe for DataLoader workers).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from clip_model.image_ops import (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, center_crop, check_size,  # noqa: F401
                                  random_resized_crop_box, resize_shorter_side, to_rgb)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> contiguous float32 [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1).contiguous().div_(255.0)


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> contiguous uint8 [3, H, W] (0..255, no scaling)."""
    # one copy: PIL's read-only buffer, transposed into a fresh (writable) array that torch then shares
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)))


class Normalize:
    """uint8 pixels [..., 3, H, W] (0..255) -> float32 ``(x / 255 - mean) / std``, on the pixels' device.

    Computed as ``x * (1 / (255 std)) - mean / std`` with both constants rounded once to float32, so
    every device and batch layout gives the same numbers as the per-image transform. The constants are
    cached per device (no host-to-device copy per call)."""

    def __init__(self, mean: Sequence[float] = OPENAI_DATASET_MEAN, std: Sequence[float] = OPENAI_DATASET_STD):
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean={tuple(mean)}, std={tuple(std)}: need 3 values each, std > 0")
        std64 = torch.tensor(tuple(std), dtype=torch.float64).view(3, 1, 1)
        self.scale = (1.0 / (255.0 * std64)).float()
        self.shift = (torch.tensor(tuple(mean), dtype=torch.float64).view(3, 1, 1) / std64).float()
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.dtype != torch.uint8 or pixels.dim() < 3 or pixels.shape[-3] != 3:
            raise ValueError(f"Normalize expects uint8 pixels [..., 3, H, W], got {pixels.dtype} "
                             f"{list(pixels.shape)}")
        consts = self._on.get(pixels.device)
        if consts is None:
            consts = self._on[pixels.device] = (self.scale.to(pixels.device), self.shift.to(pixels.device))
        scale, shift = consts
        return pixels.to(torch.float32).mul_(scale).sub_(shift)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_on": {}}  # device copies stay behind


@dataclass
class ImageTransform:
    """PIL image -> normalised float tensor [3, S, S] (``pixels`` then ``normalize``). Build it with
    `image_transform`."""

    image_size: int
    train: bool = False
    mean: tuple[float, float, float] = OPENAI_DATASET_MEAN
    std: tuple[float, float, float] = OPENAI_DATASET_STD
    scale: tuple[float, float] = (0.9, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    seed: int | None = None  # None: draw crops from Python's global `random` (seeded per DataLoader worker)

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size={self.image_size}: must be a positive number of pixels")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"scale={self.scale}: need 0 < low <= high <= 1 (fractions of the image area)")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio={self.ratio}: need 0 < low <= high")
        self._rng: random.Random | None = random.Random(self.seed) if self.seed is not None else None
        self.normalize = Normalize(self.mean, self.std)

    def crop(self, image: Image.Image) -> Image.Image:
        """The geometric part: RGB PIL image -> S x S PIL image."""
        check_size(image)
        size = self.image_size
        if self.train:
            # Without a seed: the `random` module itself (torch seeds it in each DataLoader worker).
            rng = self._rng if self._rng is not None else random
            left, top, w, h = random_resized_crop_box(
                image.width, image.height, self.scale, self.ratio, rng)  # type: ignore[arg-type]
            return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        return center_crop(resize_shorter_side(image, size), size)

    def min_decoded_side(self) -> int:
        """The smallest shorter side a decoded image needs for full-resolution crops: S for the eval
        crop; for the random crop, S / sqrt(scale_low), so that a square crop of the smallest area still
        spans S pixels (crops at the extreme aspect ratios may be upscaled by up to ~1 / sqrt(ratio)
        along their short side, as they would be from an image stored at that size). JPEG draft
        decoding never goes below it."""
        if not self.train:
            return self.image_size
        return math.ceil(self.image_size / math.sqrt(self.scale[0]))

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The geometric half: PIL image (any mode) -> uint8 tensor [3, S, S]."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"image_transform expects a PIL.Image.Image, got {type(image).__name__}")
        return to_uint8_tensor(self.crop(to_rgb(image)))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.pixels(image))


def image_transform(
    image_size: int,
    train: bool,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    seed: int | None = None,
) -> ImageTransform:
    """The CLIP preprocessing for `image_size` x `image_size` inputs (see the module docstring)."""
    return ImageTransform(
        image_size=int(image_size), train=train, mean=tuple(mean), std=tuple(std),  # type: ignore[arg-type]
        scale=tuple(scale), ratio=tuple(ratio), seed=seed,  # type: ignore[arg-type]
    )


def denormalize(tensor: torch.Tensor, mean: Sequence[float] = OPENAI_DATASET_MEAN,
                std: Sequence[float] = OPENAI_DATASET_STD) -> torch.Tensor:
    """Inverse of the normalisation ([..., 3, H, W]), clamped to [0, 1] (for plotting)."""
    m = torch.tensor(mean, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
    return (tensor * s + m).clamp(0, 1)

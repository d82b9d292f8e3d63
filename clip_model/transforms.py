"""Image preprocessing for CLIP, with PIL and torch only (no torchvision).

- eval: resize the shorter side to S (bicubic), centre-crop S x S;
- train: random resized crop (area fraction in ``scale``, aspect ratio in ``ratio``) resized to S x S;
- both: convert to RGB (L, LA, P, RGBA, CMYK, I;16, I, F ...), to a float tensor [3, S, S] in [0, 1],
  normalise with CLIP's mean and std.

``image_transform(224, train=False)`` returns a picklable callable (safe for DataLoader workers).
"""

from __future__ import annotations

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


@dataclass
class ImageTransform:
    """PIL image -> normalised float tensor [3, S, S]. Build it with `image_transform`."""

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
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean={self.mean}, std={self.std}: need 3 values each, std > 0")
        self._rng: random.Random | None = random.Random(self.seed) if self.seed is not None else None
        # (x / 255 - mean) / std  ==  x * scale - shift, in place on a fresh tensor
        std = torch.tensor(self.std, dtype=torch.float64).view(3, 1, 1)
        self._scale = (1.0 / (255.0 * std)).float()
        self._shift = (torch.tensor(self.mean, dtype=torch.float64).view(3, 1, 1) / std).float()

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

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"image_transform expects a PIL.Image.Image, got {type(image).__name__}")
        pixels = np.asarray(self.crop(to_rgb(image)), dtype=np.float32)  # [S, S, 3], 0..255
        tensor = torch.from_numpy(pixels).permute(2, 0, 1).contiguous()
        return tensor.mul_(self._scale).sub_(self._shift)


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

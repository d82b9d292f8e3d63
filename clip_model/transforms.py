"""Image preprocessing for CLIP, with PIL and torch only (no torchvision).

- eval: resize the shorter side to S (bicubic), centre-crop S x S;
- train: random resized crop (area fraction in ``scale``, aspect ratio in ``ratio``) resized to S x S;
- both: convert to RGB (L, LA, P, RGBA, CMYK, I;16, I, F ...), to a float tensor [3, S, S] in [0, 1],
  normalise with CLIP's mean and std.

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

OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels are composited over `background` (white), high bit
    depth greyscale is rescaled to 8 bits."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        image = Image.fromarray(_to_uint8(np.asarray(image)), mode="L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """High bit depth greyscale -> uint8: float images in [0, 1] scaled by 255, values within 0..255
    kept, 16-bit values divided by 257; anything else min-max stretched."""
    values = array.astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if array.dtype.kind == "f" and low >= 0 and high <= 1.0:
        values = values * 255.0
    elif low >= 0 and high <= 255:
        pass
    elif low >= 0 and high <= 65535:
        values = values / 257.0
    else:
        values = (values - low) / (high - low) * 255.0
    return np.clip(values.round(), 0, 255).astype(np.uint8)


def _size_error(image: Image.Image) -> None:
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image of size {image.size}: both sides must be at least 1 pixel")


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so that the shorter side is `size` (aspect ratio kept)."""
    _size_error(image)
    width, height = image.size
    if width <= height:
        new_w, new_h = size, max(1, round(height * size / width))
    else:
        new_w, new_h = max(1, round(width * size / height)), size
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Centre crop to size x size (the image must be at least that large on both sides)."""
    width, height = image.size
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    rng: random.Random,
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """(left, top, w, h) of a crop covering a random fraction in `scale` of the area, with a random
    aspect ratio (log-uniform in `ratio`); falls back to the largest centred crop within `ratio`."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


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
        _size_error(image)
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

"""Image preprocessing for CLIP, with PIL and torch only (no torchvision).

- eval: resize the shorter side to S (bicubic), centre-crop S x S;
- train, ``train_crop="random_resized"`` (the default, OpenCLIP's): random resized crop (area fraction in
  ``scale``, aspect ratio in ``ratio``) resized to S x S;
- train, ``train_crop="random"`` (the CLIP paper's "random square crop from resized images"): the shorter
  side resized to ``resize_factor`` x S (skipped when it already is, as the shard stage stores training
  images), then a random S x S crop: no resampling at all for images stored at that size;
- both: convert to RGB (L, LA, P, RGBA, CMYK, I;16, I, F ...), then normalise with CLIP's mean and std.

The work is split in two halves so that the normalisation can run where the model runs:
``transform.pixels(image)`` is the geometric half (a uint8 tensor [3, S, S]; ``pixels_hwc`` gives it in PIL's
[S, S, 3] layout, which the training reader's workers batch and send: 4x fewer bytes than float32), and
``Normalize`` (``transform.normalize``) turns uint8 pixels [..., 3, S, S] of any memory layout into the
contiguous normalised float tensor, on any device. ``transform(image)`` does both and gives
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

from clip_model.image_ops import (CROPS, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, SHORTER_SIDE_FACTOR,  # noqa: F401
                                  center_crop, check_size, crop_into, random_resized_crop_box, resize_shorter_side,
                                  stored_shorter_side, to_rgb)

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
        # one pass converts the type and, for channels-last pixels, the layout: the result is contiguous
        return pixels.to(torch.float32, memory_format=torch.contiguous_format).mul_(scale).sub_(shift)

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
    train_crop: str = "random_resized"  # random_resized | random
    resize_factor: float = SHORTER_SIDE_FACTOR  # train_crop="random": shorter side resized to this x S first

    def __post_init__(self) -> None:
        if self.train_crop not in CROPS:
            raise ValueError(f"train_crop={self.train_crop!r}: expected one of {CROPS}")
        if self.resize_factor < 1:
            raise ValueError(f"resize_factor={self.resize_factor}: must be >= 1 (the crop must fit)")
        if self.image_size < 1:
            raise ValueError(f"image_size={self.image_size}: must be a positive number of pixels")
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"scale={self.scale}: need 0 < low <= high <= 1 (fractions of the image area)")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"ratio={self.ratio}: need 0 < low <= high")
        self._rng: random.Random | None = random.Random(self.seed) if self.seed is not None else None
        self.normalize = Normalize(self.mean, self.std)

    def crop(self, image: Image.Image, rng: random.Random | None = None) -> Image.Image:
        """The geometric part: RGB PIL image -> S x S PIL image. Random crops draw from `rng` when given (the
        training reader seeds one per sample), else from the transform's seed."""
        check_size(image)
        size = self.image_size
        # Without a seed: the `random` module itself (torch seeds it in each DataLoader worker).
        rng = rng or (self._rng if self._rng is not None else random)
        if self.train and self.train_crop == "random":
            image, box = self._paper_crop(image, rng)
            return image.crop(box)
        if self.train:
            left, top, w, h = random_resized_crop_box(
                image.width, image.height, self.scale, self.ratio, rng)  # type: ignore[arg-type]
            return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        return center_crop(resize_shorter_side(image, size), size)

    def _paper_crop(self, image: Image.Image, rng) -> tuple[Image.Image, tuple[int, int, int, int]]:
        """The "random" crop: the image at the stored shorter side (resized only when it is not), and a random
        S x S box (left, top, right, bottom) in it."""
        side, size = stored_shorter_side(self.image_size, self.resize_factor), self.image_size
        if min(image.size) != side:
            image = resize_shorter_side(image, side)
        left, top = rng.randint(0, image.width - size), rng.randint(0, image.height - size)
        return image, (left, top, left + size, top + size)

    def min_decoded_side(self) -> int:
        """The smallest shorter side a decoded image needs for full-resolution crops: S for the eval
        crop; resize_factor x S for the "random" crop; S / sqrt(scale_low) for the random resized crop,
        so that a square crop of the smallest area still spans S pixels (crops at the extreme aspect
        ratios may be upscaled by up to ~1 / sqrt(ratio) along their short side, as they would be from
        an image stored at that size). JPEG draft decoding never goes below it."""
        if not self.train:
            return self.image_size
        if self.train_crop == "random":
            return stored_shorter_side(self.image_size, self.resize_factor)
        return math.ceil(self.image_size / math.sqrt(self.scale[0]))

    def pixels_hwc(self, image: Image.Image, rng: random.Random | None = None) -> np.ndarray:
        """The geometric half in PIL's layout: PIL image (any mode) -> read-only uint8 array [S, S, 3]
        (what the training reader's workers batch: no transposing copy; `Normalize` transposes)."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"image_transform expects a PIL.Image.Image, got {type(image).__name__}")
        return np.asarray(self.crop(to_rgb(image), rng), dtype=np.uint8)

    def pixels_into(self, image: Image.Image, out: np.ndarray, rng: random.Random | None = None) -> None:
        """`pixels_hwc` written into `out` (uint8 [S, S, 3], C-contiguous: a row of the reader's batch). The
        paper's random crop of an RGB image packs its box straight into `out` (`crop_into`): no crop copy."""
        if self.train and self.train_crop == "random" and isinstance(image, Image.Image) and image.mode == "RGB":
            check_size(image)
            crop_into(*self._paper_crop(image, rng or (self._rng if self._rng is not None else random)), out)
        else:
            out[...] = self.pixels_hwc(image, rng)

    # -- random_resized with its resample on the device ---------------------------------------------------
    def device_layout(self) -> tuple[int, int]:
        """(canvas, margin) of the device-resampled random_resized crop: a worker sends each sample's crop box
        with `margin` pixels around it (what the bicubic filter reads beyond the box) in a canvas x canvas
        uint8 array. The box is drawn on the image at its stored shorter side (`stored_shorter_side`), so its
        longer side is at most max(ratio) x that (+ rounding)."""
        side = stored_shorter_side(self.image_size, self.resize_factor)
        box = math.ceil(max(self.ratio[1], 1 / self.ratio[0]) * side) + 2
        margin = math.ceil(2 * max(box / self.image_size, 1.0)) + 1  # bicubic support: 2 x the downscale
        return box + 2 * margin, margin

    def region_into(self, image: Image.Image, out: np.ndarray, rng: random.Random | None = None) -> np.ndarray:
        """The worker's half of the device-resampled random_resized crop: the box drawn as the CPU crop draws it
        (`random_resized_crop_box`, same `rng` draws), its pixels and margin written into the top-left of `out`
        (uint8 [canvas, canvas, 3]) -> geometry float64 [6]: the box (left, top, width, height) in `out` and the
        written extent (width, height). Images stored larger than the stored shorter side are resized to it
        first (on the CPU: only images the shard stage did not store)."""
        image = to_rgb(image)
        check_size(image)
        side = stored_shorter_side(self.image_size, self.resize_factor)
        if min(image.size) > side:
            image = resize_shorter_side(image, side)
        left, top, w, h = random_resized_crop_box(image.width, image.height, self.scale, self.ratio,
                                                  rng or (self._rng if self._rng is not None else random))
        canvas, margin = self.device_layout()
        x0, y0 = max(0, left - margin), max(0, top - margin)
        x1, y1 = min(image.width, left + w + margin), min(image.height, top + h + margin)
        if x1 - x0 > canvas or y1 - y0 > canvas or out.shape != (canvas, canvas, 3):
            raise ValueError(f"random_resized box {(left, top, w, h)} of a {image.width} x {image.height} image with "
                             f"margin {margin}: does not fit a {canvas} px canvas {list(out.shape)}")
        crop_into(image, (x0, y0, x1, y1), out[:y1 - y0, :x1 - x0])
        return np.array([left - x0, top - y0, w, h, x1 - x0, y1 - y0], dtype=np.float64)

    def device_finish(self, canvas: torch.Tensor, geometry: torch.Tensor) -> torch.Tensor:
        """The device's half: uint8 canvases [B, 3, C, C] and their geometry [B, 6] -> normalised float
        [B, 3, S, S] (`resample_boxes`, then `normalize`), on their device, without a host sync."""
        return self.normalize(resample_boxes(canvas, geometry, self.image_size))

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """The geometric half: PIL image (any mode) -> contiguous uint8 tensor [3, S, S]."""
        return torch.from_numpy(np.ascontiguousarray(self.pixels_hwc(image).transpose(2, 0, 1)))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.pixels(image))


def _bicubic(t: torch.Tensor) -> torch.Tensor:
    """Pillow's bicubic kernel (a = -0.5), support 2."""
    t = t.abs()
    a = -0.5
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = (((t - 5.0) * t + 8.0) * t - 4.0) * a
    return torch.where(t < 1.0, near, torch.where(t < 2.0, far, torch.zeros_like(t)))


def _resample_weights(start: torch.Tensor, length: torch.Tensor, valid: torch.Tensor, size: int,
                      canvas: int) -> torch.Tensor:
    """[B, size, canvas] weights of Pillow's bicubic resample (its `precompute_coeffs`) of the span
    [start, start + length) of each row to `size` pixels: the kernel stretched by the downscale, its window
    cut at the row's valid pixels [0, valid), each output's weights summing to 1."""
    scale = (length / size)[:, None, None]  # [B, 1, 1]
    stretch = scale.clamp(min=1.0)
    center = start[:, None, None] + (torch.arange(size, device=start.device, dtype=start.dtype)[None, :, None] + 0.5) * scale
    x = torch.arange(canvas, device=start.device, dtype=start.dtype)[None, None, :]
    lo = torch.trunc(center - 2.0 * stretch + 0.5).clamp(min=0.0)
    hi = torch.minimum(torch.trunc(center + 2.0 * stretch + 0.5), valid[:, None, None])
    weights = torch.where((x >= lo) & (x < hi), _bicubic((x - center + 0.5) / stretch), torch.zeros_like(x))
    total = weights.sum(dim=2, keepdim=True)
    return weights / torch.where(total == 0, torch.ones_like(total), total)


def resample_boxes(canvas: torch.Tensor, geometry: torch.Tensor, size: int) -> torch.Tensor:
    """Each canvas's box resized to size x size as Pillow's ``resize((size, size), BICUBIC, box=...)`` does it,
    for the whole batch at once on its device: uint8 [B, 3, C, C] (any memory layout) and geometry [B, 6] (box
    left, top, width, height, valid width, valid height; `ImageTransform.region_into`) -> uint8 [B, 3, S, S].
    Two batched matrix products, horizontal first, each rounded and clamped to 0..255 as Pillow's two passes
    are; no host sync, no shape that depends on the data. Pillow itself takes the vertical pass first for some
    images (taller ones, by a rule of its own): those differ by the intermediate rounding, ~0.25 of a level on
    average (tests/test_transforms.py); the others agree to ~0.001."""
    if canvas.dtype != torch.uint8 or canvas.dim() != 4 or canvas.shape[1] != 3 or geometry.shape != (canvas.shape[0], 6):
        raise ValueError(f"resample_boxes expects uint8 [B, 3, C, C] and geometry [B, 6], got {canvas.dtype} "
                         f"{list(canvas.shape)} and {list(geometry.shape)}")
    if canvas.shape[2] != canvas.shape[3]:
        raise ValueError(f"resample_boxes expects square canvases, got {list(canvas.shape)}")
    g = geometry.to(device=canvas.device, dtype=torch.float32)
    pixels = canvas.to(torch.float32, memory_format=torch.contiguous_format)
    side = canvas.shape[2]
    across = _resample_weights(g[:, 0], g[:, 2], g[:, 4], size, side)  # [B, S, C]
    down = _resample_weights(g[:, 1], g[:, 3], g[:, 5], size, side)  # [B, S, C]
    rows = torch.matmul(pixels, across.transpose(1, 2).unsqueeze(1)).round_().clamp_(0, 255)  # [B, 3, C, S]
    out = torch.matmul(down.unsqueeze(1), rows).round_().clamp_(0, 255)  # [B, 3, S, S]
    return out.to(torch.uint8)


def image_transform(
    image_size: int,
    train: bool,
    mean: Sequence[float] = OPENAI_DATASET_MEAN,
    std: Sequence[float] = OPENAI_DATASET_STD,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    seed: int | None = None,
    train_crop: str = "random_resized",
    resize_factor: float = SHORTER_SIDE_FACTOR,
) -> ImageTransform:
    """The CLIP preprocessing for `image_size` x `image_size` inputs (see the module docstring)."""
    return ImageTransform(
        image_size=int(image_size), train=train, mean=tuple(mean), std=tuple(std),  # type: ignore[arg-type]
        scale=tuple(scale), ratio=tuple(ratio), seed=seed, train_crop=train_crop,  # type: ignore[arg-type]
        resize_factor=resize_factor,
    )


def denormalize(tensor: torch.Tensor, mean: Sequence[float] = OPENAI_DATASET_MEAN,
                std: Sequence[float] = OPENAI_DATASET_STD) -> torch.Tensor:
    """Inverse of the normalisation ([..., 3, H, W]), clamped to [0, 1] (for plotting)."""
    m = torch.tensor(mean, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=tensor.dtype, device=tensor.device).view(3, 1, 1)
    return (tensor * s + m).clamp(0, 1)

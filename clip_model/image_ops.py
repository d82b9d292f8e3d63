"""Image operations shared by training/eval transforms and torch-free ONNX serving (PIL + numpy only).

`clip_model.transforms` builds the torch transforms on these; `components.inference.onnx_clip` uses them
without importing torch, so both preprocess an image identically.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image

OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
# Training images are stored (and, for the "random" crop, resized) with their shorter side at this
# multiple of the training resolution: 224 -> 258, the margin img2dataset and OpenCLIP's eval resize use.
SHORTER_SIDE_FACTOR = 1.15
CROPS = ("random_resized", "random")  # the training crops (`clip_model.transforms.ImageTransform`)


def stored_shorter_side(image_size: int, factor: float = SHORTER_SIDE_FACTOR) -> int:
    """The shorter side of a training image sized for `image_size` (round(image_size * factor))."""
    return round(image_size * factor)


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


def check_size(image: Image.Image) -> None:
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image of size {image.size}: both sides must be at least 1 pixel")


def resize_shorter_side(image: Image.Image, size: int,
                        resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Resize (bicubic by default) so that the shorter side is `size`, the longer one scaled in
    proportion and truncated to whole pixels, as torchvision's ``Resize(size)`` (OpenAI's and
    OpenCLIP's preprocessing) does: 640 x 480 -> 298 x 224."""
    check_size(image)
    width, height = image.size
    if width <= height:
        new_w, new_h = size, max(1, int(size * height / width))
    else:
        new_w, new_h = max(1, int(size * width / height)), size
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), resample)


def draft_shorter_side(image: Image.Image, min_side: int) -> Image.Image:
    """Before ``load()``: let a JPEG decoder downscale in the DCT domain (by 1/2, 1/4 or 1/8, far cheaper
    than decoding at full size and resizing) as far as the shorter side stays >= ``min_side``. Other
    formats, and JPEGs smaller than twice ``min_side``, decode as they are. Returns the image."""
    width, height = image.size
    if image.format == "JPEG" and min(width, height) >= 2 * min_side:
        factor = min_side / min(width, height)
        image.draft("RGB", (math.ceil(width * factor), math.ceil(height * factor)))
    return image


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Centre crop to size x size (the image must be at least that large on both sides)."""
    width, height = image.size
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def crop_into(image: Image.Image, box: tuple[int, int, int, int], out: np.ndarray) -> None:
    """Write the pixels of ``box`` = (left, top, right, bottom) of an RGB `image` into `out`, a C-contiguous uint8
    array [bottom - top, right - left, 3] (e.g. a row of a shared-memory batch). Pillow's raw packer reads the
    box straight from the image: one pass, where ``np.asarray(image.crop(box))`` copies the box, packs it in
    64 KiB pieces and joins them (with the batch's stack after it, ~0.2 ms more per 224 px sample)."""
    left, top, right, bottom = box
    if image.mode != "RGB" or out.shape != (bottom - top, right - left, 3) or out.dtype != np.uint8:
        raise ValueError(f"crop_into: an RGB image's box {box} into uint8 [{bottom - top}, {right - left}, 3], got "
                         f"a {image.mode} image and {out.dtype} {list(out.shape)}")
    if not (0 <= left < right <= image.width and 0 <= top < bottom <= image.height):
        raise ValueError(f"crop_into: box {box} is not inside the {image.width} x {image.height} image")
    image.load()
    get_encoder = getattr(Image, "_getencoder", None)  # Pillow's own (tobytes uses it); absent: the slower way
    if get_encoder is None:
        out[...] = np.asarray(image.crop(box))
        return
    encoder = get_encoder("RGB", "raw", ("RGB",))
    encoder.setimage(image.im, box)
    _, status, data = encoder.encode(out.nbytes)  # the whole box in one piece: status 1 (done)
    if status != 1 or len(data) != out.nbytes:
        raise RuntimeError(f"crop_into: Pillow's raw packer returned {len(data)} bytes (status {status}) for box "
                           f"{box}, expected {out.nbytes}")
    out[...] = np.frombuffer(data, dtype=np.uint8).reshape(out.shape)


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

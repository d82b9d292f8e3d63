"""image_transform: shapes, normalisation, determinism, odd modes and aspect ratios."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_model.transforms import (
    OPENAI_DATASET_MEAN,
    OPENAI_DATASET_STD,
    center_crop,
    denormalize,
    image_transform,
    random_resized_crop_box,
    resize_shorter_side,
    to_rgb,
)

torch.set_num_threads(1)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def test_eval_shape_normalisation_and_exact_values():
    size = 32
    colour = (200, 100, 50)
    out = image_transform(size, train=False)(Image.new("RGB", (80, 50), colour))
    assert out.shape == (3, size, size) and out.dtype == torch.float32 and out.is_contiguous()
    for c in range(3):
        expected = (colour[c] / 255 - OPENAI_DATASET_MEAN[c]) / OPENAI_DATASET_STD[c]
        assert torch.allclose(out[c], torch.full((size, size), expected), atol=1e-5)
    # round trip through denormalize
    assert torch.allclose(denormalize(out)[:, 0, 0], torch.tensor(colour) / 255, atol=1e-5)


def test_eval_resizes_shorter_side_then_centre_crops():
    # Left third red, middle third green, right third blue, 300x100: the centre crop sees only green.
    array = np.zeros((100, 300, 3), dtype=np.uint8)
    array[:, :100, 0] = 255
    array[:, 100:200, 1] = 255
    array[:, 200:, 2] = 255
    image = Image.fromarray(array)
    resized = resize_shorter_side(image, 24)
    assert resized.size == (72, 24)
    cropped = center_crop(resized, 24)
    assert cropped.size == (24, 24)
    out = denormalize(image_transform(24, train=False)(image))
    assert out[1, :, 2:-2].min() > 0.95 and out[0, :, 2:-2].max() < 0.05 and out[2, :, 2:-2].max() < 0.05
    tall = image_transform(24, train=False)(noise_image(20, 90))  # upscales too
    assert tall.shape == (3, 24, 24)


def test_eval_is_deterministic_and_train_is_random_but_seedable():
    image = noise_image(120, 90)
    ev = image_transform(64, train=False)
    assert torch.equal(ev(image), ev(image))
    tr = image_transform(64, train=True, scale=(0.3, 1.0))
    outs = [tr(image) for _ in range(4)]
    assert all(o.shape == (3, 64, 64) for o in outs)
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    a, b = image_transform(64, train=True, seed=7), image_transform(64, train=True, seed=7)
    assert all(torch.equal(a(image), b(image)) for _ in range(3))


def test_random_resized_crop_box_respects_scale_and_bounds():
    import random

    rng = random.Random(0)
    for width, height in ((300, 200), (50, 400), (17, 17)):
        for _ in range(200):
            left, top, w, h = random_resized_crop_box(width, height, (0.9, 1.0), (3 / 4, 4 / 3), rng)
            assert 0 <= left and 0 <= top and left + w <= width and top + h <= height and w > 0 and h > 0
    # A very elongated image cannot satisfy the ratio: falls back to a centred crop within the ratio.
    left, top, w, h = random_resized_crop_box(1000, 10, (0.9, 1.0), (3 / 4, 4 / 3), random.Random(0))
    assert (w, h) == (13, 10) and left == (1000 - 13) // 2
    # scale bounds the area fraction when the ratio allows it
    areas = [w * h / 40000 for _, _, w, h in (random_resized_crop_box(200, 200, (0.5, 0.6), (1, 1), rng)
                                              for _ in range(100))]
    assert min(areas) > 0.48 and max(areas) < 0.62


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "I", "F", "1", "YCbCr"])
def test_odd_modes_become_rgb(mode):
    image = noise_image(45, 30).convert(mode)
    for train in (False, True):
        out = image_transform(16, train=train)(image)
        assert out.shape == (3, 16, 16) and torch.isfinite(out).all()
    assert to_rgb(image).mode == "RGB"


def test_transparency_is_composited_on_white():
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))  # fully transparent black
    assert to_rgb(image).getpixel((5, 5)) == (255, 255, 255)
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((5, 5)) == (255, 255, 255)


def test_sixteen_bit_greyscale_keeps_its_brightness():
    image = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16))
    assert to_rgb(image).getpixel((0, 0)) == (156, 156, 156)  # 40000 / 257
    floats = Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32))
    assert to_rgb(floats).getpixel((0, 0)) == (128, 128, 128)


def test_extreme_aspect_ratios_and_tiny_images():
    for width, height in ((1, 500), (500, 1), (1, 1), (3, 2)):
        for train in (False, True):
            assert image_transform(8, train=train)(noise_image(width, height)).shape == (3, 8, 8)


def test_custom_mean_std_and_pickling():
    tf = image_transform(8, train=False, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = tf(Image.new("RGB", (8, 8), (255, 0, 255)))
    assert torch.allclose(out[:, 0, 0], torch.tensor([1.0, -1.0, 1.0]))
    clone = pickle.loads(pickle.dumps(image_transform(8, train=True, seed=3)))
    assert clone(noise_image(20, 20)).shape == (3, 8, 8)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="scale"):
        image_transform(8, train=True, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="image_size"):
        image_transform(0, train=False)
    with pytest.raises(TypeError, match="PIL"):
        image_transform(8, train=False)(np.zeros((8, 8, 3)))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- against the references

REFERENCE = Path(__file__).parent / "data" / "openai_reference"  # made by make_reference.py (torchvision, open_clip)


def test_resize_sizes_equal_torchvision_for_common_photo_shapes():
    """The longer side is truncated as torchvision's Resize does (640 x 480 -> 298 x 224, not 299)."""
    reference = json.loads((REFERENCE / "resize.json").read_text())["sizes"]
    assert len(reference) >= 40
    got = [list(resize_shorter_side(Image.new("L", tuple(r["input"])), r["size"]).size) for r in reference]
    assert got == [r["output"] for r in reference]
    assert resize_shorter_side(Image.new("RGB", (640, 480)), 224).size == (298, 224)


def test_eval_preprocessing_equals_open_clip_pixel_for_pixel():
    """image_transform(train=False) = open_clip's eval transform (Resize, CenterCrop, ToTensor, Normalize)
    on a landscape and a portrait image whose resized long side open_clip truncates."""
    expected = np.load(REFERENCE / "preprocess.npz")
    for name in ("landscape", "portrait"):
        out = image_transform(32, train=False)(Image.open(REFERENCE / f"preprocess_{name}.png"))
        assert np.abs(out.numpy() - expected[name]).max() < 1e-4, name

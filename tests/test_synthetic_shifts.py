"""The shifted synthetic evaluation sets: deterministic, each keeps the label (the shapes' colour) and changes
the style it claims to change."""

from __future__ import annotations

import colorsys
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from components.synthetic.scenes import random_scene, render
from components.synthetic.shifts import SHIFTS, generate_shifted_split, render_shifted
from components.synthetic.vocab import COLOURS, SIZES, UNUSUAL_SIZES

PER_SHIFT = 4  # images per class and shift in the checks below


def _hue_pixels(img: Image.Image, rgb: tuple[int, int, int], tol: float = 20.0) -> int:
    """Pixels of the hue of `rgb` (within `tol` degrees), saturated and bright enough to carry it."""
    target = colorsys.rgb_to_hsv(*[c / 255 for c in rgb])[0] * 360
    hsv = np.asarray(img.convert("HSV"), dtype=float)
    h, s, v = hsv[..., 0] * 360 / 255, hsv[..., 1] / 255, hsv[..., 2] / 255
    d = np.minimum(abs(h - target), 360 - abs(h - target))
    return int(((d < tol) & (s > 0.25) & (v > 0.25)).sum())


def _exact_pixels(img: Image.Image, rgb: tuple[int, int, int]) -> int:
    """Pixels drawn in `rgb` itself (the renderer jitters a scene's colour by at most 12 per channel)."""
    return int((abs(np.asarray(img, dtype=int) - np.array(rgb)).max(axis=2) <= 12).sum())


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def shifted():
    """{shift: [(class, image)]}: PER_SHIFT images of every class in every shift."""
    out = {}
    for shift in SHIFTS:
        rng = np.random.default_rng(11)
        out[shift] = [(c, render_shifted(shift, rng, c)) for c in COLOURS for _ in range(PER_SHIFT)]
    return out


def test_every_shift_keeps_the_label(shifted):
    """The class is the shapes' colour: every shifted image still shows that hue (>= 50 pixels of it)."""
    for shift, images in shifted.items():
        for colour, img in images:
            assert _hue_pixels(img, COLOURS[colour]) >= 50, (shift, colour)


def test_each_shift_changes_what_it_says(shifted):
    paper = np.array([246, 243, 235])
    for _colour, img in shifted["sketch"]:  # outlines on paper: most of the image is blank paper
        near_paper = (abs(np.asarray(img, dtype=int) - paper).max(axis=2) <= 25).mean()
        assert near_paper > 0.85
    for colour, img in shifted["palette"]:  # another shade: the corpus's own colour is absent
        assert _exact_pixels(img, COLOURS[colour]) == 0, colour

    def high_frequency(img: Image.Image) -> float:
        a = np.asarray(img, dtype=float)
        return float(abs(a - np.asarray(img.filter(ImageFilter.MedianFilter(3)), dtype=float)).mean())

    rng = np.random.default_rng(5)
    clean = max(high_frequency(render(random_scene(rng, colour=c))) for c in COLOURS)
    assert min(high_frequency(img) for _c, img in shifted["noise"]) > 3 * clean
    for colour, img in shifted["size"]:  # tiny shapes (< 1 % of the image) or one huge one (> 12 %)
        share = _exact_pixels(img, COLOURS[colour]) / (img.width * img.height)
        assert share < 0.01 or share > 0.12, (colour, share)
    # the corpus never draws the unusual sizes
    assert not set(UNUSUAL_SIZES) & set(SIZES)
    rng = np.random.default_rng(0)
    assert {random_scene(rng).size for _ in range(300)} <= set(SIZES)


def test_shifted_split_layout_and_determinism(tmp_path):
    info = generate_shifted_split(tmp_path / "a", "sketch", per_class=2, seed=1)
    assert info["classnames"] == list(COLOURS) and info["shift"] == "sketch"
    assert (tmp_path / "a" / "classnames.txt").read_text().split() == list(COLOURS)
    assert sorted(p.name for p in (tmp_path / "a" / "red").iterdir()) == ["0000.png", "0001.png"]
    generate_shifted_split(tmp_path / "b", "sketch", per_class=2, seed=1)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    generate_shifted_split(tmp_path / "c", "texture", per_class=2, seed=1)
    generate_shifted_split(tmp_path / "d", "sketch", per_class=2, seed=2)
    assert len({_digest(tmp_path / x) for x in "acd"}) == 3
    with pytest.raises(ValueError, match="choose one of"):
        generate_shifted_split(tmp_path / "e", "upside-down")
    with pytest.raises(ValueError, match="unknown class names"):
        generate_shifted_split(tmp_path / "e", "noise", classnames=["teal"])

"""Shifted variants of the synthetic evaluation split: the same classes, another style.

The classes of the synthetic evaluation split are the colour of the shapes, the attribute every corpus
caption names. Each shift below keeps that label (each shape keeps its class's hue) and changes how the
scene looks, the way ImageNet-Sketch, -R or ObjectNet change ImageNet:

- ``sketch``: outlines only, 4-7 px wide, on paper-white with faint grain: no fills, no patterns;
- ``texture``: backgrounds the corpus never shows (cloudy noise, rings, plaid, wood grain) in tints
  outside its background palette;
- ``palette``: colour is the label here, so the palette moves everything else: each shape gets another
  shade of its hue (darker, lighter or duller) and the background a tint the corpus never uses;
- ``noise``: Gaussian blur, pixel noise and heavy JPEG compression;
- ``size``: tiny shapes (a few pixels once resized for the model) or one huge shape.

    image = render_shifted("sketch", np.random.default_rng(0), "red")
    generate_shifted_split(out_dir, "sketch", per_class=20, seed=1)   # <out_dir>/<class>/<i>.png + classnames.txt
"""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from components.synthetic.scenes import random_scene, render
from components.synthetic.vocab import COLOURS, SYNTHETIC_CLASSNAMES

SHIFTS: dict[str, str] = {
    "sketch": "outlines only, like a sketch",
    "texture": "unseen background textures and tints",
    "palette": "other shades of each hue on unseen background tints",
    "noise": "blur, pixel noise and heavy JPEG",
    "size": "tiny or huge shapes",
}
# Background tints the corpus never uses (its backgrounds are white, grays, black, beige and brown),
# none of them a class colour.
UNSEEN_TINTS: list[tuple[int, int, int]] = [
    (200, 235, 215), (225, 215, 240), (250, 222, 200), (205, 225, 245), (70, 100, 100), (95, 95, 60),
    (45, 50, 75), (235, 235, 200),
]


def _two_tints(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    i, j = rng.choice(len(UNSEEN_TINTS), size=2, replace=False)
    return np.array(UNSEEN_TINTS[i], dtype=np.float64), np.array(UNSEEN_TINTS[j], dtype=np.float64)


def _texture(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One of four background textures, blending two unseen tints by a [0, 1] mask."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    kind = int(rng.integers(4))
    if kind == 0:  # cloudy noise: coarse random values, smoothly upsampled
        coarse = Image.fromarray((rng.random((6, 6)) * 255).astype(np.uint8), "L")
        mask = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float64) / 255
    elif kind == 1:  # concentric rings around a random centre
        cx, cy, period = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(14, 30)
        mask = 0.5 + 0.5 * np.cos(2 * math.pi * np.hypot(xx - cx, yy - cy) / period)
    elif kind == 2:  # plaid: crossing bands of two periods
        px, py = rng.uniform(18, 40, 2)
        mask = ((xx % px < px / 3).astype(float) + (yy % py < py / 3).astype(float)) / 2
    else:  # wood grain: wavy stripes
        period, wobble = rng.uniform(10, 22), rng.uniform(8, 20)
        mask = 0.5 + 0.5 * np.sin(2 * math.pi * (xx + wobble * np.sin(yy / rng.uniform(15, 40))) / period)
    a, b = _two_tints(rng)
    pixels = a[None, None, :] * (1 - mask[..., None]) + b[None, None, :] * mask[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _paper(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    grain = rng.normal(0.0, 4.0, (height, width, 1))
    return Image.fromarray(np.clip(np.array([246, 243, 235]) + grain, 0, 255).astype(np.uint8), "RGB")


def _shade(rgb: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, int, int]:
    """Another shade of the same hue: darker, lighter (towards white) or duller (towards gray)."""
    c = np.array(rgb, dtype=np.float64)
    kind = int(rng.integers(3))
    if kind == 0:
        c = c * 0.62
    elif kind == 1:
        c = c + (255 - c) * 0.35
    else:
        c = c + (128 - c) * 0.45
    return tuple(int(v) for v in np.clip(c, 0, 255))  # type: ignore[return-value]


def _noisy(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.5, 3.0))))
    pixels = np.asarray(img, dtype=np.float64) + rng.normal(0.0, float(rng.uniform(20, 35)), (img.height, img.width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buf, format="JPEG",
                                                                         quality=int(rng.integers(12, 25)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def render_shifted(shift: str, rng: np.random.Generator, colour: str) -> Image.Image:
    """One scene of class `colour` drawn in the style of `shift` (deterministic given `rng`)."""
    if shift not in SHIFTS:
        raise ValueError(f"shift {shift!r}: choose one of {list(SHIFTS)}")
    if colour not in COLOURS:
        raise ValueError(f"class {colour!r}: choose one of {list(COLOURS)}")
    scene = random_scene(rng, colour=colour)
    if shift == "sketch":
        return render(scene, outline=int(rng.integers(4, 8)), backdrop=_paper(rng, scene.width, scene.height))
    if shift == "texture":
        return render(scene, backdrop=_texture(rng, scene.width, scene.height))
    if shift == "palette":
        shade = _shade(COLOURS[colour], rng)
        tints = [t for t in UNSEEN_TINTS if math.dist(t, shade) > 90]  # the shapes stay visible
        backdrop = Image.new("RGB", (scene.width, scene.height), tints[int(rng.integers(len(tints)))])
        return render(scene, backdrop=backdrop, rgb=shade)
    if shift == "noise":
        return _noisy(render(scene), rng)
    tiny = bool(rng.random() < 0.5)
    scene = dataclasses.replace(scene, size="tiny" if tiny else "huge", count=scene.count if tiny else 1)
    return render(scene)


def write_split(out_dir: str | Path, per_class: int, classnames: list[str] | None,
                draw: Callable[[str], Image.Image]) -> dict:
    """`out_dir/<class>/<i>.png` (`per_class` images of each class, `draw(class)` each) and `classnames.txt`."""
    out = Path(out_dir)
    names = list(classnames or SYNTHETIC_CLASSNAMES)
    unknown = sorted(set(names) - set(COLOURS))
    if unknown:
        raise ValueError(f"unknown class names {unknown}; choose from {list(COLOURS)}")
    for name in names:
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw(name).save(out / name / f"{i:04d}.png", compress_level=1)
    (out / "classnames.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    return {"classnames": names, "counts": {n: per_class for n in names}}


def generate_shifted_split(out_dir: str | Path, shift: str, per_class: int = 20, seed: int = 1,
                           classnames: list[str] | None = None) -> dict:
    """The labelled ImageFolder set of one shift (the layout of `corpus.generate_eval_split`); each shift
    draws from its own random stream of `seed`, so no two sets share a scene."""
    if shift not in SHIFTS:
        raise ValueError(f"shift {shift!r}: choose one of {list(SHIFTS)}")
    rng = np.random.default_rng([seed, 1 + list(SHIFTS).index(shift)])
    info = write_split(out_dir, per_class, classnames, lambda name: render_shifted(shift, rng, name))
    return {**info, "shift": shift, "style": SHIFTS[shift], "seed": seed}

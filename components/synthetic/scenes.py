"""Scenes of coloured shapes, rendered deterministically with Pillow: the synthetic corpus's images.

    scene = random_scene(np.random.default_rng(0), colour="red")
    image = render(scene)            # PIL RGB image; the same scene always renders the same pixels
    caption = scene.caption(rng)     # "two large red stars in the top left corner"
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from components.synthetic.vocab import (BACKGROUNDS, COLOURS, COUNT_WORDS, PATTERNS, PLURAL, REGIONS, SHAPES, SIZES,
                                        UNUSUAL_SIZES)


@dataclass
class Scene:
    colour: str
    shape: str
    count: int
    size: str
    region: str
    background: str
    pattern: str
    width: int
    height: int
    seed: int

    def caption(self, rng: np.random.Generator) -> str:
        n = self.count
        shapes = PLURAL[self.shape] if n > 1 else self.shape
        num = COUNT_WORDS[n] if n > 1 else rng.choice(["a", "one", "a single"])
        bg = f"{self.background} {self._pattern_word()}background".replace("  ", " ")
        size = self.size if rng.random() < 0.7 else ""
        things = " ".join(w for w in (num, size, self.colour, shapes) if w)
        templates = [
            "a photo of {things} on a {bg}",
            "{things} {region}",
            "{things} {region} on a {bg}",
            "an image showing {things} {region}",
            "a picture of {things} on a {bg}",
            "{things} drawn {region} of a {bg}",
            "a simple illustration of {things} against a {bg}",
            "{things} placed {region}",
        ]
        text = rng.choice(templates).format(things=things, bg=bg, region=self.region)
        if rng.random() < 0.3:
            text = text[0].upper() + text[1:]
        if rng.random() < 0.3:
            text += "."
        return text

    def _pattern_word(self) -> str:
        return {"plain": "", "gradient": "gradient ", "stripes": "striped ", "checkered": "checkered ",
                "dotted": "dotted "}[self.pattern]


def random_scene(rng: np.random.Generator, colour: str | None = None, width: int | None = None,
                  height: int | None = None) -> Scene:
    w = width or int(rng.integers(240, 289))
    h = height or int(rng.integers(240, 289))
    return Scene(colour=colour or str(rng.choice(list(COLOURS))), shape=str(rng.choice(SHAPES)),
                 count=int(rng.integers(1, 5)), size=str(rng.choice(list(SIZES))),
                 region=str(rng.choice(list(REGIONS))), background=str(rng.choice(list(BACKGROUNDS))),
                 pattern=str(rng.choice(PATTERNS)), width=w, height=h, seed=int(rng.integers(2**31)))


def _shape_points(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def ring(k: int, radii: list[float], offset: float) -> list[tuple[float, float]]:
        pts = []
        for i in range(k * len(radii)):
            a = offset + rot + 2 * math.pi * i / (k * len(radii))
            rr = radii[i % len(radii)]
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    if shape == "square":
        return ring(4, [r], math.pi / 4)
    if shape == "triangle":
        return ring(3, [r], -math.pi / 2)
    if shape == "star":
        return ring(5, [r, r * 0.45], -math.pi / 2)
    if shape == "hexagon":
        return ring(6, [r], 0.0)
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.65, cy), (cx, cy + r), (cx - r * 0.65, cy)]
    if shape == "cross":
        t = r * 0.35
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(shape)


def _background(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """The scene's patterned, lit background."""
    w, h = scene.width, scene.height
    base = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    shade = np.zeros((h, w))
    if scene.pattern == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        proj = (xx - w / 2) * math.cos(angle) + (yy - h / 2) * math.sin(angle)
        shade = proj / max(w, h) * rng.uniform(70, 110)
    elif scene.pattern == "stripes":
        period, angle = rng.uniform(12, 40), rng.uniform(0, math.pi)
        proj = xx * math.cos(angle) + yy * math.sin(angle)
        shade = np.where((proj // period) % 2 == 0, 1.0, -1.0) * rng.uniform(18, 32)
    elif scene.pattern == "checkered":
        cell = rng.uniform(16, 48)
        shade = np.where(((xx // cell) + (yy // cell)) % 2 == 0, 1.0, -1.0) * rng.uniform(18, 32)
    elif scene.pattern == "dotted":
        cell = rng.uniform(14, 30)
        d = np.hypot((xx % cell) - cell / 2, (yy % cell) - cell / 2)
        shade = np.where(d < cell / 5, rng.uniform(30, 50), 0.0)
    for _ in range(3):  # smooth "lighting": low-frequency structure that makes every scene distinct
        fx, fy = rng.integers(0, 3, 2)
        shade += rng.uniform(12, 24) * np.cos(2 * math.pi * (fx * xx / w + fy * yy / h) + rng.uniform(0, 2 * math.pi))
    direction = -1.0 if base.mean() > 128 else 1.0
    pixels = np.clip(base[None, None, :] + direction * (shade - shade.min())[..., None], 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def render(scene: Scene, outline: int = 0, backdrop: Image.Image | None = None,
           rgb: tuple[int, int, int] | None = None) -> Image.Image:
    """Draw `scene` deterministically (its own seed drives jitter, rotation and pattern details).

    The styles of the shifted evaluation sets (`components.synthetic.shifts`): `outline` > 0 draws only
    the shapes' outlines, that many pixels wide; `backdrop` (an image of the scene's size) replaces the
    background; `rgb` replaces the RGB of `scene.colour`; `scene.size` may also be one of `UNUSUAL_SIZES`."""
    rng = np.random.default_rng(scene.seed)
    img = backdrop.convert("RGB").copy() if backdrop is not None else _background(scene, rng)
    draw = ImageDraw.Draw(img)
    w, h = scene.width, scene.height
    fx, fy = REGIONS[scene.region]
    lo, hi = {**SIZES, **UNUSUAL_SIZES}[scene.size]
    base = np.array(rgb if rgb is not None else COLOURS[scene.colour])
    paint = tuple(int(c) for c in np.clip(base + rng.integers(-12, 13, 3), 0, 255))
    fill, line = (None, paint) if outline else (paint, None)
    spread = 0.2 if scene.count > 1 else 0.04
    shrink = 1.0 / math.sqrt(scene.count) ** 0.6
    placed: list[tuple[float, float, float]] = []
    for _ in range(scene.count):
        r = rng.uniform(lo, hi) * min(w, h) / 240 * shrink
        for _try in range(30):  # avoid overlaps so the count in the caption stays visible
            cx = float(np.clip((fx + rng.uniform(-spread, spread)) * w, r, w - r))
            cy = float(np.clip((fy + rng.uniform(-spread, spread)) * h, r, h - r))
            if all(math.hypot(cx - px, cy - py) > 1.05 * (r + pr) for px, py, pr in placed):
                break
        placed.append((cx, cy, r))
        if scene.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=line, width=outline or 1)
        else:
            draw.polygon(_shape_points(scene.shape, cx, cy, r, rng.uniform(-0.3, 0.3)), fill=fill, outline=line,
                         width=outline or 1)
    return img


def encode(img: Image.Image, fmt: str, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        img.save(buf, format="WEBP", quality=quality)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


def bomb_png(width: int = 60000, height: int = 60000) -> bytes:
    """A PNG whose header declares width x height pixels (a decompression bomb for any decoder)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")

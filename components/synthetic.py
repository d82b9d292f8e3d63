"""A deterministic synthetic image-text corpus with the defects real web data has.

`generate_corpus(out_dir, n, seed)` renders scenes of coloured shapes with Pillow and writes them as
a folder of images with same-stem captions (`.txt` or `.json`), then plants corrupt and truncated
files, a decompression bomb header, tiny and extreme-aspect images, empty / one-word / non-English
captions, captions with personal data, exact duplicates and near-duplicates (re-encoded, resized,
cropped). It returns what was planted so tests can check that a filter rejects each defect for the
right reason and keeps every clean pair.

`generate_eval_split(out_dir, per_class, seed)` writes a labelled ImageFolder set whose classes are
the colour of the shapes, the attribute every corpus caption names; `SYNTHETIC_TEMPLATES` are prompt
templates in the captions' style for zero-shot classification.
"""

from __future__ import annotations

import io
import json
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from components.dedup import hamming, phash
from components.progress import Progress

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35), "green": (30, 165, 60), "blue": (35, 70, 225),
    "yellow": (245, 210, 20), "purple": (140, 45, 185), "orange": (250, 130, 10),
}
SHAPES = ["circle", "square", "triangle", "star", "hexagon", "diamond", "cross"]
_PLURAL = {s: s + ("es" if s.endswith("ss") else "s") for s in SHAPES}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 248), "light gray": (200, 200, 200), "gray": (128, 128, 130),
    "dark gray": (60, 60, 62), "black": (12, 12, 12), "beige": (225, 210, 180), "brown": (110, 75, 45),
}
_PATTERNS = ["plain", "gradient", "stripes", "checkered", "dotted"]
_SIZES = {"small": (14, 24), "medium": (26, 40), "large": (44, 64)}
_REGIONS = {
    "in the top left corner": (0.25, 0.25), "in the top right corner": (0.75, 0.25),
    "in the bottom left corner": (0.25, 0.75), "in the bottom right corner": (0.75, 0.75),
    "in the center": (0.5, 0.5), "at the top": (0.5, 0.22), "at the bottom": (0.5, 0.78),
    "on the left": (0.22, 0.5), "on the right": (0.78, 0.5),
}
_COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}

SYNTHETIC_CLASSNAMES = list(COLOURS)
SYNTHETIC_TEMPLATES = [
    "a photo of a {} shape.",
    "a photo of {} shapes.",
    "a picture of a {} shape on a plain background.",
    "an image showing {} shapes.",
    "a drawing of a {} shape.",
    "{} shapes on a background.",
]

# Non-English captions (the colour and shape words are filled in per language).
_FOREIGN = {
    "fr": ("une photo de {n} {shape} {colour} sur un fond uni, dessinée à la main",
           {"red": "rouges", "green": "verts", "blue": "bleus", "yellow": "jaunes",
            "purple": "violets", "orange": "orange"},
           {"circle": "cercles", "square": "carrés", "triangle": "triangles", "star": "étoiles",
            "hexagon": "hexagones", "diamond": "losanges", "cross": "croix"},
           {1: "un", 2: "deux", 3: "trois", 4: "quatre", 5: "cinq"}),
    "de": ("ein Foto von {n} {colour} {shape} auf einem einfarbigen Hintergrund, schön gezeichnet",
           {"red": "roten", "green": "grünen", "blue": "blauen", "yellow": "gelben",
            "purple": "violetten", "orange": "orangen"},
           {"circle": "Kreisen", "square": "Quadraten", "triangle": "Dreiecken", "star": "Sternen",
            "hexagon": "Sechsecken", "diamond": "Rauten", "cross": "Kreuzen"},
           {1: "einem", 2: "zwei", 3: "drei", 4: "vier", 5: "fünf"}),
    "es": ("una foto de {n} {shape} {colour} sobre un fondo liso, dibujados con cuidado",
           {"red": "rojos", "green": "verdes", "blue": "azules", "yellow": "amarillos",
            "purple": "morados", "orange": "naranjas"},
           {"circle": "círculos", "square": "cuadrados", "triangle": "triángulos", "star": "estrellas",
            "hexagon": "hexágonos", "diamond": "rombos", "cross": "cruces"},
           {1: "un", 2: "dos", 3: "tres", 4: "cuatro", 5: "cinco"}),
}
_PRIVATE = {
    "email": "contact me at {name}.{surname}{num}@example.com for the full set",
    "phone": "call me on +1 415-555-{num4} if you want a print",
    "url": "more pictures at https://shapes.example.org/gallery/{num4}",
    "card": "paid with card 4111 1111 1111 1111 by {name}",
}
_NAMES = ["jane", "john", "maria", "lukas", "amelie", "carlos", "yuki", "omar"]
_SURNAMES = ["doe", "smith", "garcia", "muller", "martin", "tanaka", "hassan", "rossi"]

# Defect kinds -> the filter rejection reason each must get.
DEFECT_REASONS = {
    "corrupt": "corrupt_image", "truncated": "corrupt_image", "bomb": "decompression_bomb",
    "tiny": "too_small", "aspect": "aspect_ratio", "missing_caption": "missing_caption",
    "empty_caption": "empty_caption", "one_word": "caption_too_short", "non_english": "language",
    "email": "privacy", "phone": "privacy", "url": "privacy", "card": "privacy",
    "exact_duplicate": "duplicate_exact", "near_requant": "near_duplicate",
    "near_resize": "near_duplicate", "near_crop": "near_duplicate",
}
# Clean images are at least this many phash bits apart (well above any near-duplicate threshold);
# planted near-duplicates are within NEAR_PLANT_MAX bits of their original (pHash is not stable under
# every crop of a flat synthetic scene, so the generator picks originals whose variant stays close).
CLEAN_MIN_DISTANCE = 14
NEAR_PLANT_MAX = 5


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
        shapes = _PLURAL[self.shape] if n > 1 else self.shape
        num = _COUNT_WORDS[n] if n > 1 else rng.choice(["a", "one", "a single"])
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


def _random_scene(rng: np.random.Generator, colour: str | None = None, width: int | None = None,
                  height: int | None = None) -> Scene:
    w = width or int(rng.integers(240, 289))
    h = height or int(rng.integers(240, 289))
    return Scene(colour=colour or str(rng.choice(list(COLOURS))), shape=str(rng.choice(SHAPES)),
                 count=int(rng.integers(1, 5)), size=str(rng.choice(list(_SIZES))),
                 region=str(rng.choice(list(_REGIONS))), background=str(rng.choice(list(BACKGROUNDS))),
                 pattern=str(rng.choice(_PATTERNS)), width=w, height=h, seed=int(rng.integers(2**31)))


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


def render(scene: Scene) -> Image.Image:
    """Draw `scene` deterministically (its own seed drives jitter, rotation and pattern details)."""
    rng = np.random.default_rng(scene.seed)
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
    img = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    fx, fy = _REGIONS[scene.region]
    lo, hi = _SIZES[scene.size]
    colour = tuple(int(c) for c in np.clip(np.array(COLOURS[scene.colour]) + rng.integers(-12, 13, 3), 0, 255))
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
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        else:
            draw.polygon(_shape_points(scene.shape, cx, cy, r, rng.uniform(-0.3, 0.3)), fill=colour)
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


def _foreign_caption(scene: Scene, lang: str) -> str:
    template, colours, shapes, numbers = _FOREIGN[lang]
    n = max(scene.count, 2)
    return template.format(n=numbers[n], colour=colours[scene.colour], shape=shapes[scene.shape])


def _private_caption(clean: str, kind: str, rng: np.random.Generator) -> str:
    extra = _PRIVATE[kind].format(name=rng.choice(_NAMES), surname=rng.choice(_SURNAMES),
                                  num=int(rng.integers(10, 99)), num4=f"{int(rng.integers(1000, 9999))}")
    return f"{clean.rstrip('.')}, {extra}"


def _near_variant(img: Image.Image, kind: str) -> bytes:
    """A re-encoded (JPEG q40), resized (85 %) or slightly cropped (2 % per side) copy of `img`."""
    if kind == "near_requant":
        return encode(img, "jpg", quality=40)
    if kind == "near_resize":
        return encode(img.resize((int(img.width * 0.85), int(img.height * 0.85)), Image.Resampling.BILINEAR),
                      "jpg", quality=85)
    dx, dy = int(img.width * 0.02), int(img.height * 0.02)
    return encode(img.crop((dx, dy, img.width - dx, img.height - dy)), "jpg", quality=85)


def _write_caption(out: Path, key: str, caption: str | None, style: int) -> None:
    if caption is None:
        return
    if style % 2 == 0:
        (out / f"{key}.txt").write_text(caption, encoding="utf-8")
    else:
        field = "caption" if style % 4 == 1 else "text"
        (out / f"{key}.json").write_text(json.dumps({field: caption, "source": "synthetic"}), encoding="utf-8")


def _distinct_scene(rng: np.random.Generator, hashes: list[int], **kw) -> tuple[Scene, Image.Image, int]:
    """Re-roll until the scene's phash is CLEAN_MIN_DISTANCE bits away from every accepted one."""
    for _ in range(200):
        scene = _random_scene(rng, **kw)
        img = render(scene)
        h = phash(img)
        if not hashes or np.bitwise_count(np.array(hashes, dtype=np.int64).view(np.uint64)
                                          ^ np.array(h, dtype=np.int64).view(np.uint64)).min() >= CLEAN_MIN_DISTANCE:
            return scene, img, h
    raise RuntimeError("could not render a scene distinct from the others; lower n")


def _fresh_dir(out_dir: str | Path) -> Path:
    """`out_dir`, empty: a corpus generated there before is removed; any other content is an error."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = [p for p in out.iterdir()]
    if existing:
        if not (out / "_planted.json").is_file():
            raise FileExistsError(f"{out} is not empty and holds no earlier synthetic corpus (_planted.json); "
                                  "choose an empty directory")
        for p in existing:
            if p.is_file():
                p.unlink()
    return out


def generate_corpus(out_dir: str | Path, n: int = 200, seed: int = 0,
                    defect_fraction: float = 0.015) -> dict:
    """Write `n` image-caption pairs to `out_dir`; return what was planted.

    Returns {"n", "seed", "clean": [keys], "defects": {key: kind}, "expected": {key: reason},
    "duplicates_of": {key: original key}, "captions": {key: caption}}."""
    out = _fresh_dir(out_dir)
    rng = np.random.default_rng(seed)
    per_kind = max(1, round(n * defect_fraction))
    kinds = [k for k in DEFECT_REASONS for _ in range(per_kind)]
    n_clean = n - len(kinds)
    if n_clean < per_kind * 4:
        raise ValueError(f"n={n} is too small for {len(kinds)} planted defects; use n >= {len(kinds) * 2}")
    ids = rng.permutation(n)
    keys = [f"{i:06d}" for i in ids]
    clean_keys = keys[:n_clean]
    # duplicates take the largest defect keys so that their original has a smaller key: the filter keeps
    # the largest image of a cluster and, among equal sizes, the smallest key
    dup_kinds = ("exact_duplicate", "near_requant", "near_resize", "near_crop")
    others = [k for k in kinds if k not in dup_kinds]
    dups = [k for k in kinds if k in dup_kinds]
    kinds = [others[i] for i in rng.permutation(len(others))] + [dups[i] for i in rng.permutation(len(dups))]
    defect_keys = sorted(keys[n_clean:])
    hashes: list[int] = []
    clean_hash: dict[str, int] = {}
    clean_images: dict[str, tuple[Scene, Image.Image, str, str]] = {}
    captions: dict[str, str | None] = {}
    files: dict[str, str] = {}

    def put(key: str, data: bytes, ext: str, caption: str | None, style: int) -> None:
        (out / f"{key}.{ext}").write_bytes(data)
        _write_caption(out, key, caption, style)
        captions[key] = caption
        files[key] = ext

    progress = Progress(n, "images", label="synthetic")
    for i, key in enumerate(clean_keys):
        progress.update(1)
        scene, img, h = _distinct_scene(rng, hashes)
        hashes.append(h)
        clean_hash[key] = h
        fmt = str(rng.choice(["jpg", "jpg", "jpg", "png", "webp"]))
        data = encode(img, fmt, quality=int(rng.integers(88, 96)))
        caption = scene.caption(rng)
        put(key, data, fmt, caption, i)
        clean_images[key] = (scene, img, caption, fmt)

    defects: dict[str, str] = {}
    duplicates_of: dict[str, str] = {}
    originals = sorted(clean_images)
    for j, (key, kind) in enumerate(zip(defect_keys, kinds)):
        progress.update(1)
        defects[key] = kind
        style = int(rng.integers(0, 4))
        if kind in ("exact_duplicate", "near_requant", "near_resize", "near_crop"):
            # the original must win the tie-break: a copy gets a larger key than its original
            cands = [o for o in originals if o not in duplicates_of.values() and o < key]
            if not cands:
                raise RuntimeError(f"no original left for {kind} {key}; raise n")
            if kind == "exact_duplicate":
                orig = cands[int(rng.integers(len(cands)))]
                duplicates_of[key] = orig
                _, _, caption, fmt = clean_images[orig]
                put(key, (out / f"{orig}.{fmt}").read_bytes(), fmt, caption, style)
                continue
            for attempt, idx in enumerate(rng.permutation(len(cands))):
                orig = cands[int(idx)]
                scene, img, caption, fmt = clean_images[orig]
                data = _near_variant(img, kind)
                if hamming(phash(Image.open(io.BytesIO(data))), clean_hash[orig]) <= NEAR_PLANT_MAX:
                    break
            else:
                raise RuntimeError(f"no original gives a {kind} variant within {NEAR_PLANT_MAX} bits")
            duplicates_of[key] = orig
            put(key, data, "jpg", scene.caption(rng), style)
            continue
        scene = _random_scene(rng)
        img = render(scene)
        caption = scene.caption(rng)
        if kind == "corrupt":
            put(key, rng.bytes(3000), "jpg", caption, style)
        elif kind == "truncated":
            data = encode(img, "jpg")
            put(key, data[: len(data) * 3 // 5], "jpg", caption, style)
        elif kind == "bomb":
            put(key, bomb_png(), "png", caption, style)
        elif kind == "tiny":
            put(key, encode(render(_random_scene(rng, width=64, height=48)), "jpg"), "jpg", caption, style)
        elif kind == "aspect":
            put(key, encode(render(_random_scene(rng, width=900, height=240)), "jpg"), "jpg", caption, style)
        elif kind == "missing_caption":
            put(key, encode(img, "jpg"), "jpg", None, style)
        elif kind == "empty_caption":
            put(key, encode(img, "jpg"), "jpg", ["", "   ", "\n"][j % 3], style)
        elif kind == "one_word":
            put(key, encode(img, "jpg"), "jpg", [scene.shape, _PLURAL[scene.shape], "image", scene.colour][j % 4],
                style)
        elif kind == "non_english":
            put(key, encode(img, "jpg"), "jpg", _foreign_caption(scene, ["fr", "de", "es"][j % 3]), style)
        elif kind in _PRIVATE:
            put(key, encode(img, "jpg"), "jpg", _private_caption(caption, kind, rng), style)
        else:
            raise AssertionError(kind)
    progress.close()
    manifest = {
        "n": n, "seed": seed, "clean": sorted(clean_keys), "defects": defects,
        "expected": {k: DEFECT_REASONS[v] for k, v in defects.items()},
        "duplicates_of": duplicates_of, "captions": captions, "files": files,
    }
    (out / "_planted.json").write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def generate_eval_split(out_dir: str | Path, per_class: int = 20, seed: int = 0,
                        classnames: list[str] | None = None) -> dict:
    """Write `out_dir/<colour>/<i>.png` (shapes of one colour each) and `classnames.txt`."""
    out = Path(out_dir)
    names = classnames or SYNTHETIC_CLASSNAMES
    unknown = set(names) - set(COLOURS)
    if unknown:
        raise ValueError(f"unknown class names {sorted(unknown)}; choose from {list(COLOURS)}")
    rng = np.random.default_rng(seed + 7919)
    counts = {}
    for name in names:
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            render(_random_scene(rng, colour=name)).save(out / name / f"{i:04d}.png")
        counts[name] = per_class
    (out / "classnames.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    return {"classnames": names, "counts": counts, "templates": SYNTHETIC_TEMPLATES}

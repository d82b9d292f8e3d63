"""A deterministic synthetic image-text corpus with the defects real web data has.

`generate_corpus(out_dir, n, seed)` renders scenes of coloured shapes with Pillow and writes them as
a folder of images with same-stem captions (`.txt` or `.json`), then plants corrupt and truncated
files, a decompression bomb header, tiny and extreme-aspect images, empty / one-word / non-English
captions, captions with personal data, exact duplicates and near-duplicates (re-encoded, resized,
cropped). Half the clean pairs get terse alt-text captions with varied endings (captions.py), the
kind language identifiers mistake for other languages. It returns what was planted so tests can check
that a filter rejects each defect for the right reason and keeps every clean pair.

`generate_eval_split(out_dir, per_class, seed)` writes a labelled ImageFolder set whose classes are
the colour of the shapes, the attribute every corpus caption names; `SYNTHETIC_TEMPLATES` are prompt
templates in the captions' style for zero-shot classification.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from components.common.progress import Progress
from components.common.image_hash import hamming, phash
from components.synthetic.captions import short_caption
from components.synthetic.scenes import Scene, bomb_png, encode, random_scene, render
from components.synthetic.vocab import PLURAL, SYNTHETIC_TEMPLATES


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
ENCODE_MARGIN = 3  # bits of pHash that encoding the rendered scene may move
SHORT_CAPTION_SHARE = 0.5  # clean pairs captioned like terse alt-text (captions.py), the rest by the scene
NEAR_PLANT_MAX = 5


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
    """Re-roll until the scene's phash is CLEAN_MIN_DISTANCE (+ ENCODE_MARGIN for the JPEG / WebP encoding
    that follows) bits away from every accepted one."""
    for _ in range(200):
        scene = random_scene(rng, **kw)
        img = render(scene)
        h = phash(img)
        if not hashes or np.bitwise_count(np.array(hashes, dtype=np.int64).view(np.uint64)
                                          ^ np.array(h, dtype=np.int64).view(np.uint64)).min() \
                >= CLEAN_MIN_DISTANCE + ENCODE_MARGIN:
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
        caption = short_caption(scene, rng) if rng.random() < SHORT_CAPTION_SHARE else scene.caption(rng)
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
        scene = random_scene(rng)
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
            put(key, encode(render(random_scene(rng, width=64, height=48)), "jpg"), "jpg", caption, style)
        elif kind == "aspect":
            put(key, encode(render(random_scene(rng, width=900, height=240)), "jpg"), "jpg", caption, style)
        elif kind == "missing_caption":
            put(key, encode(img, "jpg"), "jpg", None, style)
        elif kind == "empty_caption":
            put(key, encode(img, "jpg"), "jpg", ["", "   ", "\n"][j % 3], style)
        elif kind == "one_word":
            put(key, encode(img, "jpg"), "jpg", [scene.shape, PLURAL[scene.shape], "image", scene.colour][j % 4],
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
    from components.synthetic.shifts import write_split

    rng = np.random.default_rng(seed + 7919)
    info = write_split(out_dir, per_class, classnames, lambda name: render(random_scene(rng, colour=name)))
    return {**info, "templates": SYNTHETIC_TEMPLATES}


EVAL_SEED = 1  # the evaluation split never shares its seed with the training corpus (seed 0)


def write_to(uri: str, make: Callable[[str], Any]) -> str:
    """Run `make(local_dir)` so that its files end up at `uri`: in place for a local path, through a
    temporary folder and an upload for s3://. Returns `uri`."""
    import tempfile

    from components.common import storage

    if not storage.is_s3(uri):
        make(uri)
        return uri
    with tempfile.TemporaryDirectory(prefix="synthetic-") as tmp:
        make(tmp)
        storage.upload_dir(tmp, uri)
    return uri

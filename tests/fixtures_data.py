"""Synthetic training shards for the training tests (import the fixture into a test module).

Coloured shapes on a plain background, captioned with their colour and shape ("a red circle"), so a
tiny CLIP can learn the pairing in a few dozen steps. The pairs are written in the filter stage's
output format (``kept/*.parquet`` + ``stats.json``) and turned into webdataset shards with the real
shard stage (``components.shard.stage.shard``), so the training tests read exactly what the pipeline writes.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

try:  # the builders are also used by benchmarks/ and the GPU check, where pytest may be missing
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 30),
           "purple": (140, 40, 170), "orange": (250, 140, 20)}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"white": (250, 250, 250), "black": (15, 15, 15)}


def shape_image(colour: str, shape: str, background: str, rng: random.Random, size: int = 72) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUNDS[background])
    draw = ImageDraw.Draw(img)
    r = rng.randint(size // 4, size // 2 - 4)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    fill = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLOURS[colour])
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def write_filter_output(out_dir: Path, pairs: list[dict], parts: int = 1) -> Path:
    """The filter stage's output (kept/part-*.parquet + stats.json) for already-clean pairs, each a dict
    with image (encoded bytes), ext, caption, width, height and phash; keys are the pairs' indices."""
    rows = [{"key": f"{i:06d}", "source_uri": f"synthetic://{i:06d}.{p['ext']}",
             "sha256": hashlib.sha256(p["image"]).hexdigest(), "phash": p["phash"], "caption": p["caption"],
             "width": p["width"], "height": p["height"], "language": "en", "image": p["image"]}
            for i, p in enumerate(pairs)]
    return write_kept_rows(out_dir, [rows[part::parts] for part in range(parts)],
                           {"input": len(rows), "kept": len(rows), "rejected": {}})


def write_kept_rows(out_dir: Path, parts: list[list[dict]], stats: dict, schema=None) -> Path:
    """kept/part-<i>.parquet, one per list of rows (KEPT_COLUMNS), and stats.json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kept = out_dir / "kept"
    kept.mkdir(parents=True, exist_ok=True)
    for part, rows in enumerate(parts):
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), kept / f"part-{part:05d}.parquet")
    (out_dir / "stats.json").write_text(json.dumps(stats))
    return out_dir


def fake_kept_rows(n: int = 60, seed: int = 0) -> list[dict]:
    """What the filter stage keeps: varied sizes, PNG and JPEG, some larger than image_max_side."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        color, shape = rng.choice(list(COLOURS)), rng.choice(("circle", "square", "triangle", "star", "ring"))
        w, h = rng.choice([(64, 48), (120, 90), (200, 160), (80, 80)])
        img = Image.new("RGB", (w, h), color)
        img.paste((rng.randrange(256), rng.randrange(256), rng.randrange(256)),
                  (w // 4, h // 4, w // 2 + rng.randrange(w // 4), h // 2 + rng.randrange(h // 4)))
        buf = io.BytesIO()
        img.save(buf, format="PNG" if i % 2 else "JPEG")
        data = buf.getvalue()
        rows.append({"key": f"{i:09d}", "source_uri": f"raw/{i}.img", "sha256": hashlib.sha256(data).hexdigest(),
                     "phash": rng.getrandbits(63), "caption": f"a {color} {shape} photo number {i}",
                     "width": w, "height": h, "language": "en", "image": data})
    return rows


def write_kept_parts(root: str, rows: list[dict]) -> None:
    """kept/part-*.parquet + stats.json, in the filter stage's layout."""
    import pyarrow as pa

    schema = pa.schema([("key", pa.string()), ("source_uri", pa.string()), ("sha256", pa.string()),
                        ("phash", pa.int64()), ("caption", pa.string()), ("width", pa.int32()),
                        ("height", pa.int32()), ("language", pa.string()), ("image", pa.binary())])
    half = len(rows) // 2
    write_kept_rows(Path(root), [rows[half:], rows[:half]],  # unsorted parts on purpose
                    {"input": len(rows) + 7, "kept": len(rows), "rejected": {"too_small": 7}}, schema)


def write_kept(out_dir: Path, n: int = 480, seed: int = 0, parts: int = 2, size: int = 72, fmt: str = "PNG") -> Path:
    """The filter stage's output for `n` shape images."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        colour, shape, bg = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(BACKGROUNDS))
        buf = io.BytesIO()
        shape_image(colour, shape, bg, rng, size).save(buf, format=fmt)
        pairs.append({"image": buf.getvalue(), "ext": fmt.lower(), "phash": f"{rng.getrandbits(64):016x}",
                      "caption": f"a photo of a {colour} {shape} on a {bg} background",
                      "width": size, "height": size})
    return write_filter_output(out_dir, pairs, parts)


def make_shards(root: Path, n: int = 480, samples_per_shard: int = 64, size: int = 72, num_cpus: int = 1,
                fmt: str = "PNG") -> str:
    """Shards + tokenizer + manifest under root/shards; returns the manifest path. PNG sources are
    re-encoded to JPEG by the shard stage; JPEG sources (faster to build) are kept as they are."""
    from components.shard.config import ShardConfig
    from components.shard.stage import shard

    filtered = write_kept(Path(root) / "filtered", n=n, size=size, fmt=fmt)
    out = Path(root) / "shards"
    shard(str(filtered), str(out), ShardConfig(samples_per_shard=samples_per_shard, image_max_side=size,
                                               val_fraction=0.1, vocab_size=600, num_cpus=num_cpus))
    return str(out / "manifest.json")


if pytest is not None:
    @pytest.fixture(scope="session")
    def shape_shards(tmp_path_factory) -> str:
        """Path of the manifest of ~430 training / ~50 validation shape pairs in 64-sample shards."""
        return make_shards(tmp_path_factory.mktemp("shape-shards"))

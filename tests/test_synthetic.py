"""The synthetic corpus: deterministic, clean pairs pass the per-record rules, defects are what they claim."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image

from components.filter.config import FilterConfig
from components.common.image_hash import hamming, phash
from components.filter.langid import identifier
from components.filter.readers import iter_records
from components.filter.rules import analyse, find_private
from components.synthetic.captions import short_caption
from components.synthetic.corpus import (CLEAN_MIN_DISTANCE, DEFECT_REASONS, NEAR_PLANT_MAX, generate_corpus,
                                         generate_eval_split)
from components.synthetic.scenes import random_scene
from components.synthetic.vocab import COLOURS, SYNTHETIC_TEMPLATES

N = 150


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    return out, generate_corpus(out, n=N, seed=0)


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def _image(folder: Path, planted: dict, key: str) -> Image.Image:
    return Image.open(folder / f"{key}.{planted['files'][key]}")


def test_deterministic_by_seed(tmp_path):
    first = generate_corpus(tmp_path / "a", n=60, seed=0)
    again = generate_corpus(tmp_path / "b", n=60, seed=0)
    assert again == first
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    generate_corpus(tmp_path / "c", n=60, seed=1)
    assert _digest(tmp_path / "c") != _digest(tmp_path / "a")
    # regenerating over an earlier corpus leaves no stale files; foreign content is never deleted
    generate_corpus(tmp_path / "a", n=60, seed=1)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "c")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate_corpus(tmp_path / "mine", n=60)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_layout_and_every_defect_kind_planted(corpus):
    folder, planted = corpus
    assert len(planted["clean"]) + len(planted["defects"]) == N
    assert set(planted["defects"].values()) == set(DEFECT_REASONS)
    suffixes = {p.suffix for p in folder.iterdir()}
    assert {".txt", ".json", ".jpg", ".png"} <= suffixes
    records = list(iter_records(str(folder)))
    assert len(records) == N and len({r.key for r in records}) == N
    assert all("." not in r.key for r in records)


def test_clean_pairs_pass_every_per_record_rule(corpus):
    folder, planted = corpus
    cfg = FilterConfig()
    by_key = {r.key: r for r in iter_records(str(folder))}
    for key in planted["clean"]:
        row = analyse(by_key[key], 0, cfg)
        assert row["reason"] == "", (key, row["reason"], row["detail"], by_key[key].caption)
        assert min(row["width"], row["height"]) >= 200 and row["language"] == "en"
        assert find_private(by_key[key].caption) == []
        colours = [c for c in COLOURS if c in by_key[key].caption.lower().split()]
        assert len(colours) == 1, by_key[key].caption  # the eval classes are named in the caption


def test_short_alt_text_captions_are_kept():
    """At least 100 clean short English captions with varied endings; the language rule loses at most one."""
    import numpy as np

    rng = np.random.default_rng(3)
    captions = [short_caption(random_scene(rng), rng) for _ in range(200)]
    assert len(set(captions)) >= 150 and all(3 <= len(c.split()) <= 12 for c in captions)
    assert len({" ".join(c.split()[-2:]) for c in captions}) >= 25  # varied endings
    ident = identifier(allowed=("en",))
    lost = [c for c in captions if ident.identify(c)[0] != "en"]
    assert len(lost) <= 1, lost


def test_corpus_carries_short_captions(corpus):
    _, planted = corpus
    short = [planted["captions"][k] for k in planted["clean"]
             if any(planted["captions"][k].endswith(e) for e in ("art", "drawn", "sticker", "icon", "logo", "pattern",
                                                                 "wallpaper", "poster", "illustration", "paper",
                                                                 "wall", "street", "snow", "window", "page",
                                                                 "project", "drawing", "wood", "card", "style",
                                                                 "felt", "t-shirt", "light", "above", "door",
                                                                 "notebook", "canvas", "header"))]
    assert len(short) >= len(planted["clean"]) // 4


def test_clean_images_are_not_near_duplicates(corpus):
    folder, planted = corpus
    hashes = [phash(_image(folder, planted, k)) for k in planted["clean"]]
    closest = min(hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:])
    assert closest >= CLEAN_MIN_DISTANCE > 2 * FilterConfig().near_dup_max_distance


def test_duplicates_are_close_to_their_original(corpus):
    folder, planted = corpus
    assert planted["duplicates_of"]
    for copy, orig in planted["duplicates_of"].items():
        kind = planted["defects"][copy]
        d = hamming(phash(_image(folder, planted, copy)), phash(_image(folder, planted, orig)))
        assert d <= NEAR_PLANT_MAX, (kind, d)
        a, b = _image(folder, planted, copy), _image(folder, planted, orig)
        if kind == "exact_duplicate":
            assert (folder / f"{copy}.{planted['files'][copy]}").read_bytes() == \
                (folder / f"{orig}.{planted['files'][orig]}").read_bytes()
        elif kind == "near_requant":
            assert a.size == b.size
        else:
            assert a.width < b.width and a.height < b.height


def test_defects_are_what_they_claim(corpus):
    folder, planted = corpus
    by_kind: dict[str, list[str]] = {}
    for k, kind in planted["defects"].items():
        by_kind.setdefault(kind, []).append(k)
    for k in by_kind["bomb"]:
        with pytest.raises(Image.DecompressionBombError):
            Image.open(folder / f"{k}.png")
    for k in by_kind["truncated"]:
        with pytest.raises(OSError):
            Image.open(io.BytesIO((folder / f"{k}.jpg").read_bytes())).load()
    for k in by_kind["non_english"]:
        assert identifier(allowed=("en",)).identify(planted["captions"][k])[0] in ("fr", "de", "es")
    for kind in ("email", "phone", "url", "card"):
        for k in by_kind[kind]:
            assert [s[0] for s in find_private(planted["captions"][k])] == [kind], planted["captions"][k]
    for k in by_kind["missing_caption"]:
        assert not (folder / f"{k}.txt").exists() and not (folder / f"{k}.json").exists()


def test_eval_split(tmp_path):
    info = generate_eval_split(tmp_path / "eval", per_class=3, seed=0)
    names = (tmp_path / "eval" / "classnames.txt").read_text().split("\n")[:-1]
    assert names == info["classnames"] == list(COLOURS)
    for name in names:
        files = sorted((tmp_path / "eval" / name).glob("*.png"))
        assert len(files) == 3
        assert min(Image.open(files[0]).size) >= 200
    assert all("{}" in t for t in SYNTHETIC_TEMPLATES)
    with pytest.raises(ValueError, match="unknown class"):
        generate_eval_split(tmp_path / "bad", per_class=1, classnames=["teal"])

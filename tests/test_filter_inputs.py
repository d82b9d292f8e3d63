"""The filter on messy inputs: malformed lines, tables beside their images, odd file names, encodings,
img2dataset output, missing and empty sources; every record accounted for in the decisions dataset.

These run the stage in this process (runner="local"); tests/test_filter.py runs it on Ray and checks that
both runners decide the same."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.common import config
from components.filter.config import FilterConfig
from components.filter.stage import filter_pairs
from tests.filter_helpers import CAPTIONS, check_accounting, decisions, jpeg, write_tar

def run(src, out, **settings) -> dict:
    return filter_pairs(str(out), config.from_dict(FilterConfig, {"source_uri": str(src), "runner": "local",
                                                                  **settings}))


def rows(out) -> dict[str, dict]:
    return {r["key"]: r for r in decisions(str(out)).to_pylist()}


def test_malformed_jsonl_and_csv_lines_are_single_records(tmp_path):
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    for i in range(5):
        (src / "img" / f"{i}.jpg").write_bytes(jpeg(i))
    lines = [json.dumps({"key": f"j{i}", "image_path": f"img/{i}.jpg", "caption": CAPTIONS[i]}) for i in range(5)]
    lines.insert(3, '{"key": "j9", "image_path": "img/5.jpg", "caption": "unterminated')  # line 4
    lines.insert(1, "")  # a blank line still counts as a line
    (src / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    stats = run(src, tmp_path / "out")
    check_accounting(stats, str(tmp_path / "out"))
    assert stats["total"] == 6 and stats["kept"] == 5 and stats["rejected"] == {"unreadable": 1}
    bad = [r for r in rows(tmp_path / "out").values() if r["reason"] == "unreadable"][0]
    assert bad["source_uri"].endswith("pairs.jsonl#L5") and "line 5" in bad["detail"]  # 1 blank line above it

    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    for i in (0, 2):  # the malformed line's image would otherwise be an image-only record
        (csv_dir / f"{i}.jpg").write_bytes(jpeg(10 + i))
    (csv_dir / "pairs.csv").write_text("file,caption\n0.jpg,a photo of a red bicycle on a quiet street\n"
                                       "1.jpg,two dogs playing,in the park,extra\n"
                                       "2.jpg,\"a wooden boat on the lake\"\n")
    stats = run(csv_dir, tmp_path / "out_csv")
    check_accounting(stats, str(tmp_path / "out_csv"))
    assert stats["total"] == 3 and stats["kept"] == 2 and stats["rejected"] == {"unreadable": 1}
    bad = [r for r in rows(tmp_path / "out_csv").values() if r["reason"] == "unreadable"][0]
    assert "line 3" in bad["detail"] and "4 fields, the header has 2" in bad["detail"]


def test_a_table_naming_images_does_not_list_them_again(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    for i in range(4):
        (src / "images" / f"{i}.jpg").write_bytes(jpeg(20 + i))
    (src / "pairs.csv").write_text("image_path,caption\n" + "".join(f"./images/{i}.jpg,{CAPTIONS[i]}\n"
                                                                    for i in range(3)))
    (src / "own.jpg").write_bytes(jpeg(30))  # a folder pair beside the table
    (src / "own.txt").write_text(CAPTIONS[5])
    stats = run(src, tmp_path / "out")
    check_accounting(stats, str(tmp_path / "out"))
    # 3 table rows + 1 folder pair + images/3.jpg, which no table names and has no caption
    assert stats["total"] == 5 and stats["kept"] == 4 and stats["rejected"] == {"missing_caption": 1}


def test_keys_are_unique_and_stable_for_any_file_name(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    names = ["photo ü", "photo ö", "photo_ü", "a.b", "a b", "a_b", "日本の写真", "x" * 3]
    for i, name in enumerate(names):
        (src / f"{name}.jpg").write_bytes(jpeg(40 + i))
        (src / f"{name}.txt").write_text(CAPTIONS[i])
    stats = run(src, tmp_path / "out")
    check_accounting(stats, str(tmp_path / "out"))
    assert stats["kept"] == len(names), stats["rejected"]  # no two names merged, nothing lost as duplicate_key
    keys = sorted(rows(tmp_path / "out"))
    assert len(set(keys)) == len(names) and not any(c in k for k in keys for c in ". /")
    assert {"photo_ü", "a_b", "xxx"} <= set(keys)  # names that are already keys stay as they are
    assert any(k.startswith("photo_ü-") for k in keys) and any(k.startswith("日本の写真") for k in keys)
    run(src, tmp_path / "again")
    assert sorted(rows(tmp_path / "again")) == keys  # stable: the same names give the same keys


def test_captions_that_are_not_utf8_are_never_kept_garbled(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    captions = {"cp1252": "a photo of a small café on a quiet street".encode("cp1252"),
                "utf16": "a photo of a small café by the sea".encode("utf-16"),  # with its byte-order mark
                "replaced": "a photo of a small caf\ufffd by the lake".encode(),
                "clean": "a photo of a small café in the city".encode()}
    for i, (key, data) in enumerate(captions.items()):
        (src / f"{key}.jpg").write_bytes(jpeg(60 + i))
        (src / f"{key}.txt").write_bytes(data)
    (src / "table.jsonl").write_bytes(b'{"key": "jsonl", "caption": "a photo of a small caf\xe9 at night", '
                                      b'"image_path": "clean.jpg"}\n')
    stats = run(src, tmp_path / "out", near_dedup=False, exact_dedup=False)
    check_accounting(stats, str(tmp_path / "out"))
    assert stats["total"] == 5  # clean.jpg is a folder pair (it has clean.txt) and also the table's image
    decided = rows(tmp_path / "out")
    assert {k for k, r in decided.items() if r["reason"] == "caption_encoding"} == {"cp1252", "replaced", "jsonl"}
    assert "byte 0xe9" in decided["cp1252"]["detail"] and "U+FFFD" in decided["replaced"]["detail"]
    assert decided["utf16"]["kept"] and decided["utf16"]["caption"] == "a photo of a small café by the sea"
    # a configured fallback decodes what it can; U+FFFD stays rejected
    stats = run(src, tmp_path / "fallback", near_dedup=False, exact_dedup=False, caption_encodings=("cp1252",))
    decided = rows(tmp_path / "fallback")
    assert decided["cp1252"]["kept"] and decided["cp1252"]["caption"] == "a photo of a small café on a quiet street"
    assert decided["jsonl"]["caption"] == "a photo of a small café at night"
    assert stats["rejected"] == {"caption_encoding": 1}
    assert all("\ufffd" not in (r["caption"] or "") for r in decided.values() if r["kept"])


def test_missing_and_empty_sources_fail_with_different_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        run(tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="the directory is empty"):
        run(tmp_path / "empty", tmp_path / "out")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("nothing to filter")
    with pytest.raises(FileNotFoundError, match=r"no images, tables or tars among its 1 files \(extensions: md"):
        run(tmp_path / "notes", tmp_path / "out")


def test_img2dataset_output_is_a_source(tmp_path):
    """img2dataset's layout: NNNNN.tar (KEY.jpg/.txt/.json), NNNNN.parquet (every url tried, with its status),
    NNNNN_stats.json; the failed downloads are on record as missing_image, the stats file is not a record."""
    src = tmp_path / "i2d"
    src.mkdir()
    keys = [f"{i:09d}" for i in range(4)]
    members = []
    for i, key in enumerate(keys[:3]):
        meta = {"url": f"http://example.com/{i}.jpg", "key": key, "status": "success", "caption": CAPTIONS[i]}
        members += [(f"{key}.jpg", jpeg(80 + i)), (f"{key}.txt", CAPTIONS[i].encode()),
                    (f"{key}.json", json.dumps(meta).encode())]
    write_tar(src / "00000.tar", members)
    pq.write_table(pa.table({
        "url": [f"http://example.com/{i}.jpg" for i in range(4)], "caption": CAPTIONS[:4], "key": keys,
        "status": ["success"] * 3 + ["failed_to_download"], "error_message": [None] * 3 + ["HTTP 404"],
        "width": [256] * 3 + [None], "height": [256] * 3 + [None]}), src / "00000.parquet")
    (src / "00000_stats.json").write_text(json.dumps({"count": 4, "successes": 3}))
    stats = run(src, tmp_path / "out")
    check_accounting(stats, str(tmp_path / "out"))
    assert stats["total"] == 4 and stats["kept"] == 3 and stats["rejected"] == {"missing_image": 1}
    failed = rows(tmp_path / "out")[keys[3]]
    assert "failed_to_download" in failed["detail"] and "HTTP 404" in failed["detail"]


def test_language_quota_as_count_and_share(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    captions = CAPTIONS[:4] + ["une photo d'un vieux vélo dans une rue enneigée", "deux chiens qui jouent au parc",
                               "un bateau en bois sur le lac le matin",
                               "ein altes Fahrrad auf einer verschneiten Straße", "zwei Hunde spielen im Park"]
    for i, caption in enumerate(captions):
        (src / f"p{i}.jpg").write_bytes(jpeg(100 + i))
        (src / f"p{i}.txt").write_text(caption)
    stats = run(src, tmp_path / "count", languages=(), language_quota=("en=2", "*=1"))
    check_accounting(stats, str(tmp_path / "count"))
    assert stats["kept"] == 4 and stats["rejected"] == {"language_quota": 5}
    assert stats["language_quota"] == {"en": {"limit": 2, "kept": 2, "dropped": 2},
                                       "fr": {"limit": 1, "kept": 1, "dropped": 2},
                                       "de": {"limit": 1, "kept": 1, "dropped": 1}}
    assert stats["languages"] == {"en": 2, "fr": 1, "de": 1}
    stats = run(src, tmp_path / "share", languages=(), language_quota=("fr=0.2",))  # 20 % of 9 -> at most 1
    assert stats["rejected"] == {"language_quota": 2} and stats["languages"]["fr"] == 1
    with pytest.raises(config.ConfigError, match="language_quota"):
        config.from_dict(FilterConfig, language_quota=("en=1.5",))


def _decide(alive: pa.Table, work, cfg: FilterConfig, splits: int) -> list[dict]:
    """decide() in this process on `alive` cut into `splits` parts; the rejections it sent to unit 0."""
    from components.filter.decide import decide
    from components.filter.shuffle import REJECT_SCHEMA
    from components.common.shuffle import gather, write_table

    inputs = []
    for i in range(splits):
        inputs.append(str(work / f"alive-{i}.parquet"))
        write_table(inputs[-1], alive.slice(i * alive.num_rows // splits,
                                            (i + 1) * alive.num_rows // splits - i * alive.num_rows // splits))
    decide(lambda fn, items: (fn(**kw) for kw in items), str(work), inputs, alive.num_rows, cfg)
    return sorted(gather(str(work / "rejects"), 0, REJECT_SCHEMA).to_pylist(), key=lambda r: r["uid"])


def test_whole_dataset_rules_on_compact_columns(tmp_path):
    """decide() on hand-made columns: source order wins duplicate keys, the smallest key an exact
    duplicate, the largest image a near duplicate (through a chain); the result does not depend on the
    order of the parts or the number of shuffle partitions."""
    from components.filter.shuffle import ALIVE_SCHEMA

    far = [0, 0x0F0F0F0F0F0F0F0F, 0x3333333333333333, 0x5555555555555555]
    alive = pa.Table.from_pylist([
        {"uid": 5, "key": "b", "key_hash": 2, "phash": far[1], "pixels": 100, "exact": 1, "language": "en"},
        {"uid": 1, "key": "b", "key_hash": 2, "phash": far[2], "pixels": 100, "exact": 2, "language": "en"},
        {"uid": 2, "key": "a", "key_hash": 1, "phash": far[3], "pixels": 100, "exact": 2, "language": "en"},
        {"uid": 3, "key": "c", "key_hash": 3, "phash": 0b111, "pixels": 400, "exact": 3, "language": "en"},
        {"uid": 4, "key": "d", "key_hash": 4, "phash": 0, "pixels": 100, "exact": 4, "language": "en"},
        {"uid": 6, "key": "e", "key_hash": 5, "phash": 0b1111111, "pixels": 100, "exact": 5, "language": "en"},
    ], schema=ALIVE_SCHEMA)  # uid 6 is 4 bits from uid 3 but 7 from uid 4: a chain 4 - 3 - 6
    want = [
        {"uid": 1, "reason": "duplicate_exact", "detail": "same image and caption as a", "duplicate_of": "a"},
        {"uid": 4, "reason": "near_duplicate", "detail": "pHash within 6 bits of c", "duplicate_of": "c"},
        {"uid": 5, "reason": "duplicate_key", "detail": "another record has this key (the first in source order "
                                                        "stays)", "duplicate_of": "b"},
        {"uid": 6, "reason": "near_duplicate", "detail": "pHash within 6 bits of c", "duplicate_of": "c"}]
    assert _decide(alive, tmp_path / "a", FilterConfig(shuffle_partitions=1), 1) == want
    assert _decide(alive.take([4, 2, 0, 5, 3, 1]), tmp_path / "b", FilterConfig(shuffle_partitions=3), 3) == want

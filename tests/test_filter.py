"""The filter stage on the synthetic corpus and on every input format, local and s3://."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.common import config, storage
from components.common.image_hash import phash
from components.filter.config import FilterConfig
from components.filter.rules import decode_image, find_private, luhn_valid, scrub
from components.filter.stage import KEPT_COLUMNS
from components.synthetic.corpus import generate_corpus
from components.synthetic.scenes import bomb_png, encode
from tests.filter_helpers import (CAPTIONS, check_accounting, content_hash, decisions, jpeg, kept_table, rejected,
                                  run_filter, tar_bytes, tiny_clip_bundle, write_folder, write_tar)

N = 160


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    import ray

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        started = True
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("raw")
    return out, generate_corpus(out, n=N, seed=0)


@pytest.fixture(scope="module")
def filtered(corpus, tmp_path_factory):
    folder, planted = corpus
    out = tmp_path_factory.mktemp("filtered")
    stats = run_filter(str(folder), str(out), files_per_unit=64)
    return out, stats


def test_every_planted_defect_rejected_for_its_reason(corpus, filtered):
    _, planted = corpus
    out, stats = filtered
    reasons = rejected(str(out))
    wrong = {k: (want, reasons.get(k)) for k, want in planted["expected"].items() if reasons.get(k) != want}
    assert not wrong
    assert set(reasons) == set(planted["expected"])  # nothing else rejected


def test_no_clean_pair_lost_and_accounting(corpus, filtered):
    folder, planted = corpus
    out, stats = filtered
    assert stats["total"] == N
    table = check_accounting(stats, str(out))
    assert sorted(table.column("key").to_pylist()) == planted["clean"]
    assert table.column_names == list(KEPT_COLUMNS)
    assert [str(t) for t in table.schema.types] == ["string", "string", "string", "int64", "string", "int64",
                                                    "int64", "string", "binary"]
    for row in table.slice(0, 20).to_pylist():
        original = (folder / f"{row['key']}.{planted['files'][row['key']]}").read_bytes()
        assert row["image"] == original and hashlib.sha256(original).hexdigest() == row["sha256"]
        img = Image.open(io.BytesIO(original))
        assert (row["width"], row["height"]) == img.size and row["phash"] == phash(img)
        assert row["caption"] == planted["captions"][row["key"]].strip() and row["language"] == "en"
    assert stats["config"]["min_side"] == 200 and stats["timing"]["total_s"] > 0


def test_near_duplicates_keep_the_original(corpus, filtered):
    _, planted = corpus
    out, _ = filtered
    reasons = rejected(str(out))
    kept = set(kept_table(str(out)).column("key").to_pylist())
    kinds = {planted["defects"][k] for k in planted["duplicates_of"]}
    assert kinds == {"exact_duplicate", "near_requant", "near_resize", "near_crop"}
    duplicate_of = dict(zip(*decisions(str(out)).select(["key", "duplicate_of"]).to_pydict().values()))
    for copy, orig in planted["duplicates_of"].items():
        assert orig in kept and copy not in kept
        assert reasons[copy] == ("duplicate_exact" if planted["defects"][copy] == "exact_duplicate"
                                 else "near_duplicate")
        assert duplicate_of[copy] == orig  # the decision names the original it duplicates


def test_privacy_patterns_and_scrub():
    text = ("two red circles, mail jane.doe42@example.com or call +1 (415) 555-0132, see "
            "https://shapes.example.org/x?id=3 and www.foo.net, card 4111 1111 1111 1111")
    kinds = [s[0] for s in find_private(text)]
    assert kinds == ["email", "phone", "url", "url", "card"]
    assert scrub(text, find_private(text)) == ("two red circles, mail <email> or call <phone>, see <url> and "
                                              "<url>, card <card>")
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    assert [s[0] for s in find_private("number 4111 1111 1111 1112 here")] == []  # not Luhn, too long for a phone
    for clean in ("three small blue squares in the top left corner", "a photo of 2 cats on a sofa",
                  "an image showing four orange crosses at the top."):
        assert find_private(clean) == []


def test_decode_image_limits():
    assert decode_image(bomb_png())[1] == "decompression_bomb"
    good = encode(Image.new("RGB", (300, 300), (200, 10, 10)), "jpg")
    assert decode_image(good)[1] == ""
    assert decode_image(good, max_pixels=300 * 299)[1] == "decompression_bomb"
    assert decode_image(good[: len(good) // 2])[1] == "corrupt_image"
    assert decode_image(b"not an image")[1] == "corrupt_image"


# --------------------------------------------------------------------------- other input formats

def _subset(corpus, clean: int, defect_kinds: tuple[str, ...]) -> list[str]:
    _, planted = corpus
    by_kind = {}
    for k, kind in sorted(planted["defects"].items()):
        by_kind.setdefault(kind, k)
    return planted["clean"][:clean] + [by_kind[k] for k in defect_kinds]


def _bytes(corpus, key: str) -> bytes:
    folder, planted = corpus
    return (folder / f"{key}.{planted['files'][key]}").read_bytes()


def test_tables_parquet_jsonl_csv(corpus, tmp_path):
    _, planted = corpus
    keys = _subset(corpus, 12, ("corrupt", "tiny", "non_english", "email", "one_word"))
    src = tmp_path / "tables"
    (src / "images").mkdir(parents=True)
    a, b, c = keys[0::3], keys[1::3], keys[2::3]
    pq.write_table(pa.table({"key": a, "image": [_bytes(corpus, k) for k in a],
                             "caption": [planted["captions"][k] for k in a]}), src / "part-a.parquet")
    lines = []
    for k in b:
        (src / "images" / f"{k}.img").write_bytes(_bytes(corpus, k))
        lines.append(json.dumps({"id": k, "image_path": f"images/{k}.img", "text": planted["captions"][k]}))
    lines.append(json.dumps({"id": "nopic", "image_path": "images/missing.jpg", "text": "a photo of a missing file"}))
    (src / "part-b.jsonl").write_text("\n".join(lines) + "\n")
    stats = run_filter(str(src), str(tmp_path / "out"))
    table = check_accounting(stats, str(tmp_path / "out"))
    assert stats["total"] == len(a) + len(b) + 1
    expected_kept = {k for k in a + b if k in planted["clean"]}
    assert set(table.column("key").to_pylist()) == expected_kept
    reasons = rejected(str(tmp_path / "out"))
    assert reasons["nopic"] == "unreadable"
    assert all(reasons[k] == planted["expected"][k] for k in a + b if k in planted["expected"])

    csv_dir = tmp_path / "csv"
    (csv_dir / "pics").mkdir(parents=True)
    for k in c:
        (csv_dir / "pics" / f"{k}.bin").write_bytes(_bytes(corpus, k))
    pacsv.write_csv(pa.table({"file": [f"pics/{k}.bin" for k in c], "description": [planted["captions"][k] for k in c],
                              "name": c}), csv_dir / "pairs.csv")
    cfg = dict(caption_column="description", image_path_column="file", key_column="name")
    stats = run_filter(csv_dir / "pairs.csv", tmp_path / "out_csv", **cfg)
    table = check_accounting(stats, str(tmp_path / "out_csv"))
    assert set(table.column("key").to_pylist()) == {k for k in c if k in planted["clean"]}
    with pytest.raises(ValueError, match="no caption column 'nope'"):
        run_filter(str(csv_dir / "pairs.csv"), str(tmp_path / "bad"), caption_column="nope")


def _wds_members(corpus, keys: list[str]) -> list[tuple[str, bytes]]:
    _, planted = corpus
    members = []
    for i, k in enumerate(keys):
        ext = planted["files"][k]
        members.append((f"{k}.{ext}", _bytes(corpus, k)))
        cap = planted["captions"][k]
        if cap is not None:
            if i % 2:
                members.append((f"{k}.txt", cap.encode()))
            members.append((f"{k}.json", json.dumps({"caption": cap, "key": k}).encode()))
    return members


def test_webdataset_tars_with_broken_members(corpus, tmp_path):
    _, planted = corpus
    keys = _subset(corpus, 10, ("truncated", "aspect", "missing_caption", "url"))
    dup = next(k for k, kind in sorted(planted["defects"].items()) if kind == "exact_duplicate")
    keys += ([] if planted["duplicates_of"][dup] in keys else [planted["duplicates_of"][dup]]) + [dup]
    src = tmp_path / "wds"
    src.mkdir()
    write_tar(src / "00000.tar", _wds_members(corpus, keys[:8]))
    write_tar(src / "00001.tar", _wds_members(corpus, keys[8:]) + [("zz_lonely.txt", b"a caption without image")])
    (src / "00002.tar").write_bytes(tar_bytes(_wds_members(corpus, [planted["clean"][40]]))[:700])  # truncated
    stats = run_filter(str(src), str(tmp_path / "out"))
    table = check_accounting(stats, str(tmp_path / "out"))
    assert set(table.column("key").to_pylist()) == {k for k in keys if k in planted["clean"]}
    reasons = rejected(str(tmp_path / "out"))
    assert reasons["zz_lonely"] == "missing_image"
    assert reasons[dup] == "duplicate_exact"
    assert [reasons[k] for k in keys[10:14]] == ["corrupt_image", "aspect_ratio", "missing_caption", "privacy"]
    assert any(r == "unreadable" for r in reasons.values())  # the truncated tar
    assert all(table.column("source_uri")[i].as_py().split("#")[1].startswith(table.column("key")[i].as_py())
               for i in range(table.num_rows))



def test_s3_source_and_output(corpus, bucket, tmp_path):
    _, planted = corpus
    keys = _subset(corpus, 8, ("tiny", "phone"))
    storage.write_bytes(f"s3://{bucket}/raw/shards/00000.tar", tar_bytes(_wds_members(corpus, keys[:5])))
    pq_buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"key": keys[5:], "image": [_bytes(corpus, k) for k in keys[5:]],
                             "caption": [planted["captions"][k] for k in keys[5:]]}), pq_buf)
    storage.write_bytes(f"s3://{bucket}/raw/table.parquet", pq_buf.getvalue().to_pybytes())
    out = f"s3://{bucket}/filtered"
    stats = run_filter(f"s3://{bucket}/raw", out)
    table = check_accounting(stats, out)
    assert stats["total"] == len(keys)
    assert set(table.column("key").to_pylist()) == set(planted["clean"][:8])
    assert rejected(out) == {keys[-2]: "too_small", keys[-1]: "privacy"}
    assert table.column("source_uri")[0].as_py().startswith(f"s3://{bucket}/raw/")


# --------------------------------------------------------------------------- optional rules

def test_privacy_scrub_vs_drop(corpus, tmp_path):
    _, planted = corpus
    keys = _subset(corpus, 4, ("email", "phone", "url", "card"))
    src = write_folder(tmp_path, [(k, _bytes(corpus, k), planted["captions"][k]) for k in keys])
    drop = run_filter(str(src), str(tmp_path / "drop"), privacy="drop")
    assert drop["kept"] == 4 and drop["rejected"] == {"privacy": 4}
    scrubbed = run_filter(str(src), str(tmp_path / "scrub"), privacy="scrub")
    table = check_accounting(scrubbed, str(tmp_path / "scrub"))
    assert scrubbed["kept"] == 8
    captions = dict(zip(table.column("key").to_pylist(), table.column("caption").to_pylist()))
    for k, placeholder in zip(keys[4:], ("<email>", "<phone>", "<url>", "<card>")):
        assert placeholder in captions[k] and find_private(captions[k]) == []
        assert captions[k].split(",")[0] == planted["captions"][k].split(",")[0]


def test_concept_cap(corpus, tmp_path):
    _, planted = corpus
    keys = planted["clean"][:40]
    src = write_folder(tmp_path, [(k, _bytes(corpus, k), planted["captions"][k]) for k in keys])
    stats = run_filter(src, tmp_path / "out", concept_queries=("circle", "circles", "red"), concept_cap=2)
    table = check_accounting(stats, str(tmp_path / "out"))
    captions = table.column("caption").to_pylist()
    for q in ("circle", "circles", "red"):
        assert sum(q in c.lower().replace(",", " ").replace(".", " ").split() for c in captions) <= 2
    unmatched = [k for k in keys if not {"circle", "circles", "red"} & set(
        planted["captions"][k].lower().replace(".", " ").replace(",", " ").split())]
    assert set(unmatched) <= set(table.column("key").to_pylist())
    assert stats["rejected"].get("concept_cap", 0) == len(keys) - stats["kept"] > 0


def test_clip_score_filter(tmp_path):
    rng = np.random.default_rng(0)
    rgb = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    pairs = []
    for i in range(12):
        colour = list(rgb)[i % 3]
        said = list(rgb)[(i + 1) % 3] if i >= 9 else colour  # the last three captions are wrong
        noise = rng.integers(-20, 20, (240, 240, 3))
        img = Image.fromarray(np.clip(np.array(rgb[colour]) + noise, 0, 255).astype(np.uint8))
        pairs.append((f"p{i:02d}", encode(img, "jpg"), f"a photo of a {said} shape on a plain background"))
    src = write_folder(tmp_path, pairs)
    bundle = tmp_path / "bundle"
    tiny_clip_bundle(bundle, [p[2] for p in pairs])
    base = dict(near_dedup=False, clip_bundle=str(bundle))
    stats = run_filter(str(src), str(tmp_path / "thr"), clip_min_score=0.0, **base)
    table = check_accounting(stats, str(tmp_path / "thr"))
    assert sorted(table.column("key").to_pylist()) == [f"p{i:02d}" for i in range(9)]
    assert stats["rejected"] == {"clip_score": 3} and stats["clip_score"]["scored"] == 12
    top = run_filter(str(src), str(tmp_path / "top"), clip_top_fraction=0.5, **base)
    kept = check_accounting(top, str(tmp_path / "top")).column("key").to_pylist()
    assert len(kept) == 6 and all(int(k[1:]) < 9 for k in kept)


def test_permissive_preset_drops_only_unusable_records(corpus, tmp_path):
    folder, planted = corpus
    stats = run_filter(folder, tmp_path / "out", preset="none")
    check_accounting(stats, str(tmp_path / "out"))
    unusable = {"corrupt", "truncated", "bomb", "missing_caption", "empty_caption"}
    assert set(rejected(str(tmp_path / "out"))) == {k for k, kind in planted["defects"].items() if kind in unusable}
    assert config.from_dict(FilterConfig, preset="datacomp_basic") == FilterConfig()
    with pytest.raises(config.ConfigError, match="unknown preset 'strictest'"):
        config.from_dict(FilterConfig, preset="strictest")
    with pytest.raises(ValueError, match="privacy"):
        FilterConfig(privacy="hide")


def test_filter_command_on_its_own(corpus, tmp_path, capsys):
    """`clipflow filter SRC OUT --preset NAME --set k=v` writes the stage's outputs; bad settings fail
    before any work, naming the setting."""
    from pipelines.cli import main

    folder, planted = corpus
    out = tmp_path / "cli"
    assert main(["filter", str(folder), str(out), "--preset", "none", "--set", "reject_samples=2",
                 "--files-per-unit", "50"]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["config"]["preset"] == "none" and stats["config"]["reject_samples"] == 2
    assert stats["config"]["source"]["files_per_unit"] == 50 and stats["source_uri"] == str(folder)
    assert stats["total"] == planted["n"] and "[filter] kept" in capsys.readouterr().out
    check_accounting(stats, str(out))  # the decisions dataset beside kept/ and stats.json
    assert main(["filter", str(folder), str(tmp_path / "bad"), "--set", "privacy=maybe"]) == 2
    assert "privacy='maybe'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["filter", str(tmp_path / "nowhere"), str(tmp_path / "bad")]) == 1  # the run cannot proceed
    assert "no such file or directory" in capsys.readouterr().err


def test_ray_session_joins_a_running_cluster():
    """With RAY_ADDRESS set (or a cluster `ray start` recorded), a new process joins that Ray instead of
    starting its own, and sizes passed for a local Ray are not forced on the cluster."""
    import os
    import subprocess
    import sys

    import ray

    address = ray.get_runtime_context().gcs_address
    code = ("import ray\nfrom components.common.ray_runtime import ray_session\n"
            "with ray_session(num_cpus=1) as started:\n"
            "    print(started, ray.get_runtime_context().gcs_address, ray.cluster_resources()['CPU'])\n")
    env = {**os.environ, "RAY_ADDRESS": address,
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    started, joined, cpus = done.stdout.split()[-3:]
    assert (started, joined, float(cpus)) == ("False", address, ray.cluster_resources()["CPU"])


def test_local_and_ray_runners_decide_the_same(tmp_path):
    """The same decisions whether units run in this process or as Ray tasks (this module's Ray), with the
    language model in an actor."""
    src = tmp_path / "src"
    src.mkdir()
    for i, caption in enumerate(CAPTIONS + ["ok", "une photo d'un vieux vélo dans une rue enneigée"]):
        (src / f"k{i}.jpg").write_bytes(jpeg(200 + i % 9))  # k9 repeats k0's image with another caption
        (src / f"k{i}.txt").write_text(caption)
    local = run_filter(src, tmp_path / "local", files_per_unit=3, runner="local")
    on_ray = run_filter(src, tmp_path / "ray", files_per_unit=3, model_actors_per_node=1)
    assert content_hash(tmp_path / "local") == content_hash(tmp_path / "ray")  # the same bytes, scores included
    assert on_ray["execution"]["model_actors"] == 1 and local["execution"]["model_actors"] == 0
    assert local["rejected"] == on_ray["rejected"] == {"caption_too_short": 1, "language": 1}

def test_rerun_after_a_crash_skips_finished_units_and_gives_the_same_bytes(corpus, tmp_path, monkeypatch):
    """A run that dies half way through the units leaves its finished units behind; the rerun analyses only
    the others and writes byte for byte what an uninterrupted run writes."""
    from components.filter import units

    folder, _ = corpus
    settings = {"runner": "local", "files_per_unit": 24}
    run_filter(folder, tmp_path / "whole", **settings)
    analysed: list[int] = []
    real = units.analyse_unit

    def crash_at_unit_3(idx, **kw):
        if idx == 3:
            raise RuntimeError("the node went away")
        analysed.append(idx)
        return real(idx=idx, **kw)

    monkeypatch.setattr("components.filter.stage.analyse_unit", crash_at_unit_3)
    with pytest.raises(RuntimeError, match="went away"):
        run_filter(folder, tmp_path / "crashed", **settings)
    assert analysed == [0, 1, 2]
    analysed.clear()

    def spy(idx, **kw):
        result = real(idx=idx, **kw)
        if not result["resumed"]:
            analysed.append(idx)
        return result

    monkeypatch.setattr("components.filter.stage.analyse_unit", spy)
    stats = run_filter(folder, tmp_path / "crashed", **settings)
    assert stats["execution"]["units_resumed"] == 3 and 3 in analysed and not {0, 1, 2} & set(analysed)
    assert content_hash(tmp_path / "crashed") == content_hash(tmp_path / "whole")



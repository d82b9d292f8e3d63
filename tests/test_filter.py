"""The filter stage on the synthetic corpus and on every input format, local and s3://."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from components.common import storage
from components.common import config
from components.filter.config import FilterConfig
from components.common.image_hash import phash
from components.filter.dedup import naive_near_duplicate_pairs, near_duplicate_pairs
from components.filter.stats import read_decisions
from components.filter.rules import decode_image, find_private, luhn_valid, scrub
from components.filter.stage import KEPT_COLUMNS, filter_pairs
from components.synthetic.corpus import generate_corpus
from components.synthetic.scenes import bomb_png, encode

N = 160

CAPTIONS = ["a photo of a red bicycle on a quiet street", "two dogs playing in the park at sunset",
            "a wooden boat on the lake in the morning", "close-up of fresh strawberries in a bowl",
            "an old lighthouse by the sea in winter", "a cup of coffee on a wooden table",
            "children riding bikes on a country road", "a vintage poster of a jazz festival"]


def jpeg(seed: int, size: int = 256) -> bytes:
    """A distinct 256-px JPEG (smooth random colour field: far apart in pHash for different seeds)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((size, size), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def run_filter(source_uri, output_uri, **settings) -> dict:
    """The filter stage on `source_uri` with FilterConfig settings given by name (presets applied)."""
    return filter_pairs(str(output_uri), config.from_dict(FilterConfig, {"source_uri": str(source_uri), **settings}))


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


def _kept(out: str) -> pa.Table:
    parts = [p for p in storage.list_files(storage.join(out, "kept")) if p.endswith(".parquet")]
    return pa.concat_tables([pq.read_table(pa.BufferReader(storage.read_bytes(p))) for p in parts])


def decisions(out: str) -> pa.Table:
    """The decisions dataset (OUT/decisions/part-*.parquet), every part in source order."""
    return read_decisions(out)


def _rejected(out: str) -> dict[str, str]:
    """{key: reason} of every rejected record, from the decisions dataset."""
    rows = decisions(out).filter(pc.invert(pc.field("kept"))).select(["key", "reason"]).to_pylist()
    return {r["key"]: r["reason"] for r in rows}


def check_accounting(stats: dict, out: str) -> pa.Table:
    """stats.json == the counts of the decisions dataset, one decision row per record, kept rows == kept/."""
    assert stats["kept"] + sum(stats["rejected"].values()) == stats["total"]
    on_disk = storage.read_json(storage.join(out, "stats.json"))
    assert on_disk["total"] == stats["total"] and on_disk["rejected"] == stats["rejected"]
    dec = decisions(out)
    assert dec.num_rows == stats["total"]
    reasons = Counter(dec.column("reason").to_pylist())
    assert reasons.pop("") == stats["kept"] == sum(dec.column("kept").to_pylist())
    assert dict(reasons) == stats["rejected"]
    table = _kept(out)
    assert table.num_rows == stats["kept"]
    assert sorted(table.column("key").to_pylist()) == sorted(dec.filter(pc.field("kept")).column("key").to_pylist())
    assert not storage.list_files(storage.join(out, "_work")), "no work files left behind"
    for sample in storage.list_files(storage.join(out, "rejects")):  # the quick-review samples agree
        reason = sample.rsplit("/", 1)[-1].removesuffix(".jsonl")
        assert all(_rejected(out)[json.loads(line)["key"]] == reason for line in storage.read_text(sample).splitlines())
    assert storage.read_bytes(storage.join(out, "stats.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    return table


# --------------------------------------------------------------------------- the synthetic corpus

def test_every_planted_defect_rejected_for_its_reason(corpus, filtered):
    _, planted = corpus
    out, stats = filtered
    reasons = _rejected(str(out))
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
    reasons = _rejected(str(out))
    kept = set(_kept(str(out)).column("key").to_pylist())
    kinds = {planted["defects"][k] for k in planted["duplicates_of"]}
    assert kinds == {"exact_duplicate", "near_requant", "near_resize", "near_crop"}
    duplicate_of = dict(zip(*decisions(str(out)).select(["key", "duplicate_of"]).to_pydict().values()))
    for copy, orig in planted["duplicates_of"].items():
        assert orig in kept and copy not in kept
        assert reasons[copy] == ("duplicate_exact" if planted["defects"][copy] == "exact_duplicate"
                                 else "near_duplicate")
        assert duplicate_of[copy] == orig  # the decision names the original it duplicates


# --------------------------------------------------------------------------- rules without Ray

def test_banded_search_equals_all_pairs():
    rng = np.random.default_rng(0)
    base = rng.integers(-2**63, 2**63 - 1, size=3000, dtype=np.int64)
    for i, d in enumerate((1, 3, 6, 7, 9)):
        mask = np.uint64(0)
        for b in rng.choice(64, size=d, replace=False):
            mask |= np.uint64(1) << np.uint64(b)
        base[10 * i + 1] = (base[10 * i:10 * i + 1].view(np.uint64) ^ mask).view(np.int64)[0]
    for k in (0, 3, 6, 8):
        assert np.array_equal(near_duplicate_pairs(base, k), naive_near_duplicate_pairs(base, k))
    found = {tuple(p) for p in near_duplicate_pairs(base, 6).tolist()}
    assert {(0, 1), (10, 11), (20, 21)} <= found and (30, 31) not in found


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
    reasons = _rejected(str(tmp_path / "out"))
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


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


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
    (src / "00002.tar").write_bytes(_tar_bytes(_wds_members(corpus, [planted["clean"][40]]))[:700])  # truncated
    stats = run_filter(str(src), str(tmp_path / "out"))
    table = check_accounting(stats, str(tmp_path / "out"))
    assert set(table.column("key").to_pylist()) == {k for k in keys if k in planted["clean"]}
    reasons = _rejected(str(tmp_path / "out"))
    assert reasons["zz_lonely"] == "missing_image"
    assert reasons[dup] == "duplicate_exact"
    assert [reasons[k] for k in keys[10:14]] == ["corrupt_image", "aspect_ratio", "missing_caption", "privacy"]
    assert any(r == "unreadable" for r in reasons.values())  # the truncated tar
    assert all(table.column("source_uri")[i].as_py().split("#")[1].startswith(table.column("key")[i].as_py())
               for i in range(table.num_rows))


def _tar_bytes(members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_s3_source_and_output(corpus, bucket, tmp_path):
    _, planted = corpus
    keys = _subset(corpus, 8, ("tiny", "phone"))
    storage.write_bytes(f"s3://{bucket}/raw/shards/00000.tar", _tar_bytes(_wds_members(corpus, keys[:5])))
    pq_buf = pa.BufferOutputStream()
    pq.write_table(pa.table({"key": keys[5:], "image": [_bytes(corpus, k) for k in keys[5:]],
                             "caption": [planted["captions"][k] for k in keys[5:]]}), pq_buf)
    storage.write_bytes(f"s3://{bucket}/raw/table.parquet", pq_buf.getvalue().to_pybytes())
    out = f"s3://{bucket}/filtered"
    stats = run_filter(f"s3://{bucket}/raw", out)
    table = check_accounting(stats, out)
    assert stats["total"] == len(keys)
    assert set(table.column("key").to_pylist()) == set(planted["clean"][:8])
    assert _rejected(out) == {keys[-2]: "too_small", keys[-1]: "privacy"}
    assert table.column("source_uri")[0].as_py().startswith(f"s3://{bucket}/raw/")


# --------------------------------------------------------------------------- optional rules

def _folder(tmp_path: Path, pairs: list[tuple[str, bytes, str]]) -> Path:
    d = tmp_path / "pairs"
    d.mkdir(exist_ok=True)
    for key, data, caption in pairs:
        (d / f"{key}.jpg").write_bytes(data)
        (d / f"{key}.txt").write_text(caption)
    return d


def test_privacy_scrub_vs_drop(corpus, tmp_path):
    _, planted = corpus
    keys = _subset(corpus, 4, ("email", "phone", "url", "card"))
    src = _folder(tmp_path, [(k, _bytes(corpus, k), planted["captions"][k]) for k in keys])
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
    src = _folder(tmp_path, [(k, _bytes(corpus, k), planted["captions"][k]) for k in keys])
    stats = run_filter(src, tmp_path / "out", concept_queries=("circle", "circles", "red"), concept_cap=2)
    table = check_accounting(stats, str(tmp_path / "out"))
    captions = table.column("caption").to_pylist()
    for q in ("circle", "circles", "red"):
        assert sum(q in c.lower().replace(",", " ").replace(".", " ").split() for c in captions) <= 2
    unmatched = [k for k in keys if not {"circle", "circles", "red"} & set(
        planted["captions"][k].lower().replace(".", " ").replace(",", " ").split())]
    assert set(unmatched) <= set(table.column("key").to_pylist())
    assert stats["rejected"].get("concept_cap", 0) == len(keys) - stats["kept"] > 0


def _tiny_bundle(path: Path, captions: list[str]) -> None:
    """An ONNX bundle whose image embedding is the mean colour and whose text embedding adds a colour
    direction per colour word, so CLIP scores are +1 for matching and negative for swapped captions."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from clip_model.tokenizer import ClipTokenizer

    path.mkdir(parents=True)
    tok = ClipTokenizer.train(captions * 3, vocab_size=400, min_frequency=1)
    tok.save(path / "tokenizer.json")
    directions = {"red": [1, -1, -1], "green": [-1, 1, -1], "blue": [-1, -1, 1]}
    emb = np.zeros((tok.vocab_size, 3), np.float32) + 1e-3
    base = set(tok.encode("a shape"))
    for colour, d in directions.items():
        for t in set(tok.encode(f"a {colour} shape")) - base:
            emb[t] = d
    g_img = helper.make_graph(
        [helper.make_node("ReduceMean", ["pixel_values"], ["m"], axes=[2, 3], keepdims=0),
         helper.make_node("Identity", ["m"], ["image_embeds"])], "img",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["B", 3, 32, 32])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["B", 3])])
    g_txt = helper.make_graph(
        [helper.make_node("Gather", ["E", "input_ids"], ["e"]),
         helper.make_node("ReduceSum", ["e", "axis"], ["text_embeds"], keepdims=0)], "txt",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["B", 77])],
        [helper.make_tensor_value_info("text_embeds", TensorProto.FLOAT, ["B", 3])],
        [numpy_helper.from_array(emb, "E"), numpy_helper.from_array(np.array([1], np.int64), "axis")])
    opset = [helper.make_opsetid("", 17)]
    onnx.save(helper.make_model(g_img, opset_imports=opset), path / "image_encoder.onnx")
    onnx.save(helper.make_model(g_txt, opset_imports=opset), path / "text_encoder.onnx")
    (path / "preprocess.json").write_text(json.dumps({
        "image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "resize_mode": "shortest",
        "interpolation": "bilinear", "context_length": 77, "sot_token_id": tok.sot_token_id,
        "eot_token_id": tok.eot_token_id, "logit_scale": 100.0}))


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
    src = _folder(tmp_path, pairs)
    bundle = tmp_path / "bundle"
    _tiny_bundle(bundle, [p[2] for p in pairs])
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
    assert set(_rejected(str(tmp_path / "out"))) == {k for k, kind in planted["defects"].items() if kind in unusable}
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


# --------------------------------------------------------------------------- at scale

def test_near_duplicate_recall_among_100k_hashes():
    """Planted pairs at every distance 0..near_dup_max_distance among 100k random pHashes: the multi-index
    search finds >= 99 % of them (it is exact by pigeonhole, so all), finds every pair an exhaustive search
    finds for a sample of records, and compares a bounded number of candidates per record."""
    from components.filter.dedup import BandPlan, auto_key_bits, band_rows, bucket_pairs

    rng = np.random.default_rng(7)
    n, d, per_distance = 100_000, FilterConfig().near_dup_max_distance, 60
    h = rng.integers(-2**63, 2**63 - 1, size=n, dtype=np.int64)
    slots = rng.permutation(n)[:2 * per_distance * (d + 1)].reshape(-1, 2)
    planted = set()
    for i, (a, b) in enumerate(slots):
        mask = np.uint64(0)
        for bit in rng.choice(64, size=i // per_distance, replace=False):
            mask |= np.uint64(1) << np.uint64(bit)
        h[b] = (h[a:a + 1].view(np.uint64) ^ mask).view(np.int64)[0]
        planted.add((min(a, b), max(a, b)))
    found = {tuple(p) for p in near_duplicate_pairs(h, d).tolist()}
    assert len(planted & found) / len(planted) >= 0.99

    sample = rng.choice(n, size=200, replace=False)  # exhaustive for these records against all
    dist = np.bitwise_count(h[sample][:, None].view(np.uint64) ^ h[None, :].view(np.uint64))
    rows, cols = np.nonzero(dist <= d)
    truth = {(min(int(sample[r]), int(c)), max(int(sample[r]), int(c))) for r, c in zip(rows, cols) if sample[r] != c}
    assert truth <= found

    plan = BandPlan.for_distance(d, auto_key_bits(n))
    _, stats = bucket_pairs(*band_rows(np.unique(h), plan), plan)
    assert stats["candidates"] / n <= len(plan.tables)  # about 4 per bucket, half of them compared
    print(f"recall {len(planted & found) / len(planted):.3f}, {len(plan.tables)} tables, "
          f"{stats['candidates'] / n:.1f} candidate comparisons per record")


def test_band_plan_keeps_comparisons_bounded_on_skewed_hashes():
    """pHashes are far from uniform: with bits set with probabilities between 0.25 and 0.75, 16-bit keys
    would crowd the buckets as n grows; the plan chosen on a sample keeps the comparisons per hash under
    its target at 20k and at 80k, and still finds every pair within the distance of a sample."""
    from components.filter.dedup import BandPlan, band_rows, bucket_pairs, choose_plan
    from components.filter.shuffle import mix64

    rng = np.random.default_rng(3)
    p = rng.uniform(0.25, 0.75, 64)
    per_hash, fixed_per_hash = {}, {}
    for n in (20_000, 80_000):
        bits = rng.random((n, 64)) < p
        h = np.unique(np.packbits(bits, axis=1).view(">u8").reshape(-1).astype(np.uint64).view(np.int64))
        sample = h[np.argsort(mix64(h), kind="stable")[:65536]]
        plan = choose_plan(6, len(h), sample)
        pairs, stats = bucket_pairs(*band_rows(h, plan), plan)
        per_hash[n] = stats["candidates"] / len(h)
        fixed = BandPlan.for_distance(6, 16)  # the shortest keys, for comparison
        fixed_per_hash[n] = bucket_pairs(*band_rows(h, fixed), fixed)[1]["candidates"] / len(h)
        some = h[:100]
        dist = np.bitwise_count(some[:, None].view(np.uint64) ^ h[None, :].view(np.uint64))
        truth = {(min(a, b), max(a, b)) for a, b in zip(np.repeat(some, len(h))[(dist <= 6).ravel()],
                                                        np.tile(h, len(some))[(dist <= 6).ravel()]) if a != b}
        assert truth <= {tuple(x) for x in pairs.tolist()}
    assert fixed_per_hash[80_000] > 3 * fixed_per_hash[20_000]  # fixed keys: crowding grows with n
    assert max(per_hash.values()) <= 40 and per_hash[80_000] < fixed_per_hash[80_000], (per_hash, fixed_per_hash)


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


def content_hash(out) -> str:
    """sha256 over the names and bytes of the decisions dataset and the kept parts."""
    digest = hashlib.sha256()
    for sub in ("decisions", "kept"):
        for path in storage.list_files(storage.join(str(out), sub)):
            digest.update(path.rsplit("/", 2)[-2:][0].encode() + path.rsplit("/", 1)[-1].encode())
            digest.update(storage.read_bytes(path))
    return digest.hexdigest()

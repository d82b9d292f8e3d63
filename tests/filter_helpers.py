"""What the filter's tests share: small images and captions, running the stage, reading its output back and
checking its accounting (one decision per record, kept + rejected per reason = total)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from components.common import config, storage
from components.filter.config import FilterConfig
from components.filter.stage import filter_pairs
from components.filter.stats import read_decisions

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



def kept_table(out: str) -> pa.Table:
    parts = [p for p in storage.list_files(storage.join(out, "kept")) if p.endswith(".parquet")]
    return pa.concat_tables([pq.read_table(pa.BufferReader(storage.read_bytes(p))) for p in parts])


def decisions(out: str) -> pa.Table:
    """The decisions dataset (OUT/decisions/part-*.parquet), every part in source order."""
    return read_decisions(out)


def rejected(out: str) -> dict[str, str]:
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
    table = kept_table(out)
    assert table.num_rows == stats["kept"]
    assert sorted(table.column("key").to_pylist()) == sorted(dec.filter(pc.field("kept")).column("key").to_pylist())
    assert not storage.list_files(storage.join(out, "_work")), "no work files left behind"
    for sample in storage.list_files(storage.join(out, "rejects")):  # the quick-review samples agree
        reason = sample.rsplit("/", 1)[-1].removesuffix(".jsonl")
        assert all(rejected(out)[json.loads(line)["key"]] == reason for line in storage.read_text(sample).splitlines())
    assert storage.read_bytes(storage.join(out, "stats.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    return table


# --------------------------------------------------------------------------- the synthetic corpus


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar of (name, bytes) members, in that order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    Path(path).write_bytes(tar_bytes(members))


def content_hash(out) -> str:
    """sha256 over the names and bytes of the decisions dataset and the kept parts."""
    digest = hashlib.sha256()
    for sub in ("decisions", "kept"):
        for path in storage.list_files(storage.join(str(out), sub)):
            digest.update(path.rsplit("/", 2)[-2:][0].encode() + path.rsplit("/", 1)[-1].encode())
            digest.update(storage.read_bytes(path))
    return digest.hexdigest()


def write_folder(tmp_path: Path, pairs: list[tuple[str, bytes, str]]) -> Path:
    """A folder source of KEY.jpg + KEY.txt pairs under tmp_path/pairs."""
    d = tmp_path / "pairs"
    d.mkdir(exist_ok=True)
    for key, data, caption in pairs:
        (d / f"{key}.jpg").write_bytes(data)
        (d / f"{key}.txt").write_text(caption)
    return d


def tiny_clip_bundle(path: Path, captions: list[str]) -> None:
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

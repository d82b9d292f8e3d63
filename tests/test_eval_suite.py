"""Evaluation suites and the sets they name: suite files, the built-in suite, CLIP_benchmark's webdataset layout,
CSVs, and the checks that run before any image is encoded. No model here."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import yaml
from PIL import Image

from components.common.config import ConfigError
from components.evaluate.config import EvalConfig
from components.evaluate.datasets import open_set
from components.evaluate.plan import plan_suite
from components.evaluate.suite import BUILTIN_SUITES, load_suite
from components.synthetic.shifts import SHIFTS

COLOURS = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


def _png(rgb: tuple[int, int, int], size: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> None:
    """A webdataset tar: sample i's members as `{i:06d}.{ext}`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for i, members in enumerate(samples):
            for ext, payload in members.items():
                info = tarfile.TarInfo(f"{i:06d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def clip_benchmark_set(root: Path, per_shard: list[list[tuple[int, tuple[int, int, int]]]], split: str = "test",
                       templates: list[str] | None = None) -> Path:
    """CLIP_benchmark's classification layout: <root>/<split>/{0..n-1}.tar + nshards.txt, classnames.txt and
    zeroshot_classification_templates.txt in <root>."""
    for i, shard in enumerate(per_shard):
        write_tar(root / split / f"{i}.tar", [{"webp" if j % 2 else "png": _png(rgb), "cls": str(label).encode()}
                                              for j, (label, rgb) in enumerate(shard)])
    (root / split / "nshards.txt").write_text(f"{len(per_shard)}\n")
    (root / "classnames.txt").write_text("\n".join(COLOURS) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text(
        "\n".join(templates or ["a photo of a {c}.", "a {c} thing."]) + "\n")
    return root


def test_builtin_suite_lists_the_reference_and_every_shift():
    suite = load_suite("synthetic")
    assert "synthetic" in BUILTIN_SUITES and suite.name == "synthetic" and suite.source == "built-in synthetic"
    assert [d.uri for d in suite.datasets] == ["synthetic:reference"] + [f"synthetic:{s}" for s in SHIFTS]
    assert [d.name for d in suite.shifts_of("synthetic")] == [f"synthetic-{s}" for s in SHIFTS]
    assert all(d.tasks == ("zeroshot", "linear_probe") for d in suite.datasets)
    assert load_suite("") is None and load_suite("  ") is None


def test_suite_file_defaults_relative_uris_and_one_dataset_shortcut(tmp_path):
    (tmp_path / "suites").mkdir()
    doc = {"name": "mine", "defaults": {"tasks": ["zeroshot"], "max_images": 50},
           "datasets": [{"name": "cifar", "uri": "../wds_cifar10", "classnames": "cifar10"},
                        {"name": "cifar-blur", "uri": "s3://bucket/blur", "shift_of": "cifar", "max_images": 10,
                         "templates": "prompts.txt"}]}
    (tmp_path / "suites" / "a.yaml").write_text(yaml.safe_dump(doc))
    suite = load_suite(str(tmp_path / "suites" / "a.yaml"))
    a, b = suite.datasets
    assert suite.name == "mine" and a.uri == str(tmp_path / "wds_cifar10") and b.uri == "s3://bucket/blur"
    assert a.tasks == b.tasks == ("zeroshot",) and (a.max_images, b.max_images) == (50, 10)
    assert a.classnames == "cifar10" and b.templates == str(tmp_path / "suites" / "prompts.txt")
    (tmp_path / "b.json").write_text(json.dumps({"datasets": [{"name": "x", "uri": "/data/x"}]}))
    assert load_suite(str(tmp_path / "b.json")).name == "b"
    one = load_suite("/data/wds_imagenet-sketch/")
    assert one.name == "wds_imagenet-sketch" and one.datasets[0].uri == "/data/wds_imagenet-sketch/"
    assert load_suite("s3://b/labels.csv").datasets[0].name == "labels"


@pytest.mark.parametrize("doc, message", [
    ({"datasets": [{"name": "a", "uri": "/x", "shft_of": "b"}]}, r"dataset 0 \(a\).*unknown setting 'shft_of'"),
    ({"datasets": [{"name": "a", "uri": "/x"}, {"name": "b", "uri": "/y", "shift_of": "c"}]},
     r"'b': shift_of 'c' must name another dataset"),
    ({"datasets": [{"name": "a", "uri": "/x", "shift_of": "a"}]}, "must name another dataset"),
    ({"datasets": [{"name": "a", "uri": "/x"}, {"name": "a", "uri": "/y"}]}, r"names \['a'\] appear twice"),
    ({"datasets": [{"name": "mean", "uri": "/x"}]}, "taken by the stage's own metrics"),
    ({"datasets": [{"name": "a b", "uri": "/x"}]}, "a name is letters"),
    ({"datasets": [{"name": "a", "uri": "/x", "tasks": ["zeroshot", "captioning"]}]}, r"unknown tasks \['captioning'\]"),
    ({"datasets": []}, "non-empty list"),
    ({"dataset": []}, r"unknown keys \['dataset'\]"),
])
def test_suite_errors_name_the_dataset_and_the_rule(tmp_path, doc, message):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=message):
        load_suite(str(path))


def test_clip_benchmark_layout_read_as_it_is(tmp_path):
    root = clip_benchmark_set(tmp_path / "wds_colours", [[(0, COLOURS["red"]), (2, COLOURS["blue"])],
                                                         [(1, COLOURS["green"])]] * 5 + [[(0, COLOURS["red"])]])
    data = open_set(str(root))  # split: <uri>/test exists, so it is read
    assert data.kind == "wds" and data.location == str(root / "test") and data.classnames == list(COLOURS)
    assert data.templates == ["a photo of a {c}.", "a {c} thing."]
    assert [s.rsplit("/", 1)[1] for s in data.shards][:3] == ["0.tar", "1.tar", "2.tar"]  # numeric order
    assert data.shards[-1].endswith("/10.tar")
    assert [s.label for s in data] == [0, 2, 1] * 5 + [0]
    (root / "test" / "nshards.txt").write_text("12\n")
    with pytest.raises(FileNotFoundError, match=r"nshards.txt says 12 shards, missing \['11.tar'\]"):
        open_set(str(root))
    flat = tmp_path / "flat"  # tars directly in the folder, names beside them
    write_tar(flat / "a.tar", [{"jpg": _png(COLOURS["red"]), "cls": b"0"}])
    (flat / "classnames.txt").write_text("red\ngreen\n")
    assert [s.label for s in open_set(str(flat))] == [0]
    with pytest.raises(ValueError, match=r"tars sit in \['test'\]: set the split"):
        open_set(str(root), split="")
    with pytest.raises(FileNotFoundError, match="no split folder 'train'"):
        open_set(str(root), split="train")


def test_caption_tars_and_bad_records_are_skipped_and_named(tmp_path):
    root = tmp_path / "wds_captions"
    write_tar(root / "test" / "0.tar", [{"png": _png(COLOURS["red"]), "txt": b"a red square\na red thing\n"},
                                        {"png": b"not an image", "txt": b"broken"},
                                        {"png": _png(COLOURS["blue"]), "txt": b"a blue square"},
                                        {"png": _png(COLOURS["green"])}])
    (root / "dataset_type.txt").write_text("retrieval\n")
    data = open_set(str(root))
    got = [(s.label, s.captions) for s in data]
    assert not data.has_labels and got == [(None, ["a red square", "a red thing"]), (None, ["a blue square"])]
    assert data.bad_count == 2
    assert "000001" in data.bad[0]["record"] and "not a readable image" in data.bad[0]["rule"]
    assert "000003" in data.bad[1]["record"] and "needs a .txt member" in data.bad[1]["rule"]
    labelled = tmp_path / "labelled"
    write_tar(labelled / "0.tar", [{"png": _png(COLOURS["red"]), "cls": b"7"}, {"png": _png(COLOURS["red"])},
                                   {"png": _png(COLOURS["green"]), "cls": b"1"}])
    (labelled / "classnames.txt").write_text("red\ngreen\n")
    data = open_set(str(labelled))
    assert [s.label for s in data] == [1] and data.bad_count == 2
    assert "class index 7 outside [0, 2)" in data.bad[0]["rule"] and ".cls member" in data.bad[1]["rule"]


def test_csv_sets(tmp_path):
    (tmp_path / "img").mkdir()
    for name, rgb in COLOURS.items():
        (tmp_path / "img" / f"{name}.png").write_bytes(_png(rgb))
    (tmp_path / "labels.csv").write_text(
        "filepath,label,caption,split\n"
        "img/red.png,red,a red square,test\n"
        "img/green.png,1,a green square,test\n"
        "img/blue.png,Blue,a blue square,train\n"
        "img/missing.png,red,gone,test\n"
        "img/red.png,teal,a teal square,test\n")
    (tmp_path / "classnames.txt").write_text("red\ngreen\nblue\n")
    data = open_set(str(tmp_path / "labels.csv"), split="test")
    got = [(s.label, s.captions) for s in data]
    assert data.kind == "csv" and data.classnames == ["red", "green", "blue"] and data.has_captions
    assert got == [(0, ["a red square"]), (1, ["a green square"])]
    assert [b["record"].rsplit(" ", 1)[1] for b in data.bad] == ["5", "6"]
    assert "missing.png" in data.bad[0]["rule"] and "'teal' is neither a class index" in data.bad[1]["rule"]
    assert len(open_set(str(tmp_path / "labels.csv"))) == 5  # no split: every row
    (tmp_path / "classnames.txt").unlink()
    names = open_set(str(tmp_path / "labels.csv"), columns={"label": "caption", "caption": "label"})
    assert names.classnames == sorted({"a red square", "a green square", "a blue square", "gone", "a teal square"})
    with pytest.raises(ValueError, match="no column 'cls'"):
        open_set(str(tmp_path / "labels.csv"), columns={"label": "cls"})
    (tmp_path / "bare.csv").write_text("image\nimg/red.png\n")
    with pytest.raises(ValueError, match="needs a label column or a caption column"):
        open_set(str(tmp_path / "bare.csv"))


def test_plan_checks_the_whole_suite_before_encoding(tmp_path):
    ref = tmp_path / "ref"
    for name, rgb in COLOURS.items():
        (ref / name).mkdir(parents=True)
        (ref / name / "0.png").write_bytes(_png(rgb))
    (ref / "zeroshot_classification_templates.txt").write_text("a {c} shape.\n")
    other = clip_benchmark_set(tmp_path / "other", [[(0, COLOURS["red"])]])
    (other / "classnames.txt").write_text("red\nteal\n")
    doc = {"datasets": [{"name": "ref", "uri": "ref"}, {"name": "other", "uri": "other", "shift_of": "ref"}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"'other': shift_of 'ref', but its classes \['teal'\]"):
        plan_suite(load_suite(str(tmp_path / "s.yaml")), EvalConfig(), {}, {})
    (other / "classnames.txt").write_text("red\ngreen\n")
    skipped: dict = {}
    planned = plan_suite(load_suite(str(tmp_path / "s.yaml")), EvalConfig(linear_probe=False), {}, skipped)
    assert [p.tasks for p in planned] == [("zeroshot",), ("zeroshot",)]
    assert skipped == {"ref/linear_probe": "linear_probe is off", "other/linear_probe": "linear_probe is off"}
    assert planned[0].templates == ["a {c} shape."] and planned[0].templates_from.startswith("zeroshot_classif")
    stage_wide = plan_suite(load_suite(str(tmp_path / "s.yaml")), EvalConfig(templates="cifar"), {}, {})
    assert len(stage_wide[0].templates) == 18 and stage_wide[0].templates_from == "the stage's templates: cifar"
    doc["datasets"][1]["tasks"] = ["retrieval"]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="'other': task retrieval needs captions"):
        plan_suite(load_suite(str(tmp_path / "s.yaml")), EvalConfig(), {}, {})
    doc["datasets"][1]["tasks"] = ["linear_probe"]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="both need the zeroshot task"):
        plan_suite(load_suite(str(tmp_path / "s.yaml")), EvalConfig(), {}, {})


def test_auto_split_and_a_class_called_test(tmp_path):
    """`<uri>/test` is a split only when it holds tars or class folders; an ImageFolder may have a class
    named "test". Regenerating a synthetic set replaces the earlier one whole."""
    for name in ("test", "train"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        (tmp_path / "folder" / name / "0.png").write_bytes(_png(COLOURS["red"]))
    data = open_set(str(tmp_path / "folder"))
    assert data.location == str(tmp_path / "folder") and data.classnames == ["test", "train"]
    (tmp_path / "split" / "test" / "red").mkdir(parents=True)
    (tmp_path / "split" / "test" / "red" / "0.png").write_bytes(_png(COLOURS["red"]))
    assert open_set(str(tmp_path / "split")).location == str(tmp_path / "split" / "test")
    from components.evaluate.suite import generate_synthetic

    suite = load_suite("synthetic")
    suite.datasets = suite.datasets[:1]
    generate_synthetic(suite, str(tmp_path / "data"), per_class=3)
    generated, described = generate_synthetic(suite, str(tmp_path / "data"), per_class=2)
    assert len(open_set(generated.datasets[0].uri)) == 6 * 2
    assert described["synthetic"].startswith("synthetic, generated: the evaluation split, 2 images per class")


def test_evaluation_images_are_rgb_as_training_and_serving_make_them(tmp_path):
    """Transparency lands on white here too (it did not: `convert("RGB")` dropped alpha to black)."""
    from clip_model.image_ops import to_rgb
    from components.evaluate.evalset import decode_image

    rgba = Image.new("RGBA", (4, 4), (200, 10, 10, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    decoded = decode_image(buf.getvalue(), "logo.png")
    assert decoded.getpixel((0, 0)) == to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert decoded.getpixel((1, 1)) == (200, 10, 10)
    with pytest.raises(ValueError, match=r"logo\.png: not a readable image"):
        decode_image(b"not an image", "logo.png")

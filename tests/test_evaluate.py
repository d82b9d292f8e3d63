"""Evaluation stage: a suite of datasets (CLIP_benchmark layout, built here) on a tiny CLIP trained on the
synthetic corpus, each image encoded once; the built-in synthetic suite; never substituting data."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from components.common.tracking import TrackingConfig
from components.evaluate import stage as eval_stage
from components.evaluate.config import EvalConfig
from components.evaluate.datasets import open_set
from components.evaluate.evalset import map_folders
from components.evaluate.probe import ProbeConfig, linear_probe, split_per_class
from components.evaluate.report import markdown_report, to_kfp_artifacts
from components.evaluate.stage import evaluate
from components.inference.prompts import resolve_templates
from components.synthetic.shifts import SHIFTS
from tests.fixtures_model import trained_tiny  # noqa: F401  (session fixture)
from tests.test_eval_suite import write_tar

BATCH = 32
TEMPLATES = ["a photo of a {c} shape.", "a photo of {c} shapes.", "an image showing {c} shapes."]


def clip_benchmark_suite(trained, root: Path) -> Path:
    """Two datasets in LAION's CLIP_benchmark layout and a suite file naming them: `colours` (the synthetic
    evaluation split as labelled tars in two shards) and `captions` (30 rendered scenes, two captions each)."""
    from PIL import Image

    from components.synthetic.scenes import random_scene, render

    folder = open_set(trained.eval_dir)
    samples = [{"png": Path(uri).read_bytes(), "cls": str(label).encode()} for uri, label in folder.items]
    half = len(samples) // 2
    write_tar(root / "wds_colours" / "test" / "0.tar", samples[:half])
    write_tar(root / "wds_colours" / "test" / "1.tar", samples[half:])
    (root / "wds_colours" / "test" / "nshards.txt").write_text("2\n")
    (root / "wds_colours" / "classnames.txt").write_text("\n".join(folder.classnames) + "\n")
    (root / "wds_colours" / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    rng = np.random.default_rng(3)
    captioned = []
    for _ in range(30):
        scene = random_scene(rng)
        buf = io.BytesIO()
        render(scene).resize((96, 96), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=92)
        captioned.append({"jpg": buf.getvalue(), "txt": f"{scene.caption(rng)}\n{scene.caption(rng)}\n".encode()})
    write_tar(root / "wds_captions" / "test" / "0.tar", captioned)
    (root / "wds_captions" / "test" / "nshards.txt").write_text("1\n")
    (root / "wds_captions" / "dataset_type.txt").write_text("retrieval\n")
    suite = {"name": "two", "datasets": [{"name": "colours", "uri": "wds_colours"},
                                         {"name": "captions", "uri": "wds_captions"}]}
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))
    return root / "suite.yaml"


def counting(load):
    """`load_eval_model` whose model records the batch size of every image-encoder call."""
    calls: list[int] = []

    def wrapped(*args, **kw):
        model = load(*args, **kw)
        encode = model.encode_image

        def encode_image(pixels):
            calls.append(int(pixels.shape[0]))
            return encode(pixels)

        model.encode_image = encode_image
        return model

    return wrapped, calls


@pytest.fixture(scope="module")
def suite_run(trained_tiny, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("evaluate")
    suite = clip_benchmark_suite(trained_tiny, tmp / "data")
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp}/mlflow.db", experiment="test-evaluate")
    cfg = EvalConfig(eval_suite=str(suite), eval_batch_size=BATCH, probe_shots=(1, 2, 4), retrieval_examples=4,
                     num_threads=2)
    out = tmp / "out"
    load, calls = counting(eval_stage.load_eval_model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eval_stage, "load_eval_model", load)
        result = evaluate(trained_tiny.model_uri, trained_tiny.manifest_uri, str(out), cfg, tracking)
    report = json.loads((out / "report.json").read_text())
    assert json.loads(json.dumps(result)) == report and result["report_uri"] == str(out / "report.json")
    return result, calls, tracking, out


def test_each_image_is_encoded_once_for_all_tasks(suite_run):
    report, calls, _, _ = suite_run
    sizes = {name: entry["n"] for name, entry in report["datasets"].items()}
    assert list(sizes) == ["colours", "captions", "validation"]
    assert sizes["colours"] == 6 * 24 and sizes["captions"] == 30 and sizes["validation"] >= 30
    # one pass per dataset in batches of BATCH: zero-shot, the probe and retrieval reuse the features
    expected = [min(BATCH, n - i) for n in sizes.values() for i in range(0, n, BATCH)]
    assert calls == expected and sum(calls) == sum(sizes.values())
    assert report["datasets"]["colours"]["tasks"] == ["zeroshot", "linear_probe"]
    assert report["datasets"]["captions"]["tasks"] == report["datasets"]["validation"]["tasks"] == ["retrieval"]


def test_clip_benchmark_datasets_read_as_they_are(suite_run):
    report, _, _, _ = suite_run
    colours, captions = report["datasets"]["colours"], report["datasets"]["captions"]
    zs = colours["zeroshot"]
    assert colours["kind"] == "wds" and colours["location"].endswith("wds_colours/test")
    assert zs["classnames"] == ["red", "green", "blue", "yellow", "purple", "orange"]
    assert zs["num_templates"] == len(TEMPLATES) and colours["templates_from"] == "zeroshot_classification_templates.txt"
    # six colour classes: chance is 1/6; a tiny model trained for a few hundred steps does far better
    assert zs["top1"] >= 2.5 * zs["chance"] and colours["linear_probe"]["settings"]["full"]["top1"] >= 2.5 * zs["chance"]
    assert captions["retrieval"]["n"] == 30 and captions["retrieval"]["captions"] == 60
    metrics = report["metrics"]
    for name in ("captions", "validation"):
        for d in ("image_to_text", "text_to_image"):
            r1, r5, r10 = (metrics[f"{name}/retrieval_{d}_R_at_{k}"] for k in (1, 5, 10))
            assert 0 <= r1 <= r5 <= r10 <= 1
            assert metrics[f"{name}/retrieval_{d}_median_rank"] >= 1
    n_val = report["datasets"]["validation"]["n"]
    assert metrics["validation/retrieval_text_to_image_R_at_10"] > 2 * 10 / n_val, metrics


def test_one_table_with_the_mean_over_datasets(suite_run):
    report, _, _, _ = suite_run
    metrics = report["metrics"]
    assert metrics["mean/zeroshot_top1"] == pytest.approx(metrics["colours/zeroshot_top1"])
    r1 = "retrieval_text_to_image_R_at_1"
    assert metrics[f"mean/{r1}"] == pytest.approx((metrics[f"captions/{r1}"] + metrics[f"validation/{r1}"]) / 2)
    assert not any(k.startswith("mean/") and k.endswith("_rank") for k in metrics)
    cm = np.array(report["datasets"]["colours"]["zeroshot"]["confusion_matrix"]["matrix"])
    assert cm.sum() == 144 and np.trace(cm) / cm.sum() == pytest.approx(metrics["colours/zeroshot_top1"], abs=1e-6)
    settings = report["datasets"]["colours"]["linear_probe"]["settings"]
    assert list(settings) == ["1shot", "2shot", "4shot", "full"]
    assert [settings[k]["n_train"] for k in ("1shot", "2shot", "4shot")] == [6, 12, 24]
    few = report["datasets"]["colours"]["few_shot"]
    assert few["relation"] in ("matches", "below", "above")
    if few["relation"] == "matches":
        assert metrics["colours/zeroshot_matches_shots"] == pytest.approx(few["shots"])
    md = markdown_report(report)
    assert "| dataset | shift of | n | classes | zero-shot top-1 |" in md and "| mean over 3 datasets |" in md
    assert "## Few-shot linear probe against zero-shot" in md and "## Robustness" not in md
    assert "- captions: wds at " in md


def test_outputs_and_mlflow_run(suite_run):
    import mlflow

    report, _, tracking, out = suite_run
    for png in ("colours/confusion_matrix.png", "colours/per_class_accuracy.png", "few_shot.png",
                "retrieval_examples.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "report.md").read_text() == markdown_report(report)
    mlflow.set_tracking_uri(tracking.tracking_uri)
    run = mlflow.get_run(report["mlflow_run_id"])
    assert run.data.tags["stage"] == "evaluate" and run.data.tags["eval_suite"] == "two"
    assert run.data.tags["eval_datasets"] == "colours,captions,validation"
    for k, v in report["metrics"].items():
        assert run.data.metrics[k] == pytest.approx(v)
    client = mlflow.MlflowClient()
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "report.md", "plots", "tables"} <= files
    assert "plots/colours/confusion_matrix.png" in {f.path for f in client.list_artifacts(run.info.run_id,
                                                                                         "plots/colours")}
    table = mlflow.load_table("tables/results.json", run_ids=[run.info.run_id])
    assert list(table["dataset"]) == ["colours", "captions", "validation", "mean"]
    assert table["zeroshot_top1"][0] == pytest.approx(report["metrics"]["colours/zeroshot_top1"])


def test_the_registered_models_description_reads_this_runs_figures(suite_run):
    """The export stage describes a model version with the evaluate run's metrics, by their logged names."""
    import mlflow

    from components.export.registry import describe, evaluation_figures

    report, _, tracking, _ = suite_run
    mlflow.set_tracking_uri(tracking.tracking_uri)
    run = mlflow.get_run(report["mlflow_run_id"])
    figures = evaluation_figures(run.data.metrics, run.data.tags)
    metrics = report["metrics"]
    assert figures == {"zeroshot_top1": {"colours": metrics["colours/zeroshot_top1"]},
                       "image_to_text_R1": metrics["validation/retrieval_image_to_text_R_at_1"],
                       "text_to_image_R1": metrics["validation/retrieval_text_to_image_R_at_1"]}
    parity = {"image": {"max_abs": 1e-7}, "text": {"max_abs": 2e-7}}
    text = describe(figures, parity, "abc", "run-1")
    assert f"Zero-shot top-1 {metrics['colours/zeroshot_top1']:.3f} on colours." in text
    assert f"image→text {figures['image_to_text_R1']:.3f}" in text


def test_kfp_artifacts(suite_run):
    from kfp import dsl

    report, _, _, _ = suite_run
    m, c = dsl.Metrics(), dsl.ClassificationMetrics()
    to_kfp_artifacts(report, m, c)
    assert set(m.metadata) == set(report["metrics"])
    assert m.metadata["colours/zeroshot_top1"] == pytest.approx(report["metrics"]["colours/zeroshot_top1"])
    cm = c.metadata["confusionMatrix"]
    zs = report["datasets"]["colours"]["zeroshot"]
    assert [a["displayName"] for a in cm["annotationSpecs"]] == zs["classnames"]
    assert [r["row"] for r in cm["rows"]] == zs["confusion_matrix"]["matrix"]
    flat = dsl.Metrics()
    to_kfp_artifacts(report["metrics"], flat)  # a bare metrics dict works too
    assert flat.metadata == m.metadata


def test_evaluation_never_substitutes_data(trained_tiny, tmp_path):  # noqa: F811
    """No suite means no zero-shot and no probe, said in the report; "synthetic" is generated on one path
    (a fixed seed, never the training corpus's) and every set is named as generated."""
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="test-evaluate-skip")
    skipped = evaluate(trained_tiny.model_uri, trained_tiny.manifest_uri, str(tmp_path / "none"),
                       EvalConfig(eval_suite="", num_threads=2), tracking)
    assert list(skipped["datasets"]) == ["validation"] and skipped["robustness"] == {}
    assert skipped["skipped"] == {"suite": "eval_suite is empty: no zero-shot and no linear probe"}
    assert skipped["suite"]["source"] == "none: eval_suite is empty"
    assert not any("zeroshot" in k or "linear_probe" in k for k in skipped["metrics"])
    assert "- suite skipped: eval_suite is empty" in markdown_report(skipped)

    generated = evaluate(trained_tiny.model_uri, None, str(tmp_path / "synthetic"),
                         EvalConfig(eval_suite="synthetic", synthetic_per_class=3, linear_probe=False,
                                    num_threads=2), tracking)
    names = ["synthetic"] + [f"synthetic-{s}" for s in SHIFTS]
    assert list(generated["datasets"]) == names and generated["suite"]["source"] == "built-in synthetic"
    for name in names:
        entry = generated["datasets"][name]
        assert entry["n"] == 6 * 3 and entry["source"].startswith("synthetic, generated: ")
        assert "seed 1" in entry["source"] and (tmp_path / "synthetic" / "data" / name / "red").is_dir()
    assert generated["skipped"] == {**{f"{n}/linear_probe": "linear_probe is off" for n in names},
                                    "validation/retrieval": "no dataset manifest"}
    rob = generated["robustness"]["synthetic"]
    assert [r["dataset"] for r in rob["rows"]] == names and rob["probe_fitted_on"] is None
    assert rob["rows"][0]["n"] == 18 and all(r["linear_probe_top1"] is None for r in rob["rows"])
    for row in rob["rows"][1:]:
        assert row["zeroshot_drop"] == pytest.approx(rob["rows"][0]["zeroshot_top1"] - row["zeroshot_top1"])
    assert (tmp_path / "synthetic" / "plots" / "robustness_synthetic.png").is_file()


def test_labelled_tars_and_s3_folder(trained_tiny, tmp_path, bucket):  # noqa: F811
    from components.common import storage

    folder = open_set(trained_tiny.eval_dir)
    samples = [{"png": Path(uri).read_bytes(), "cls": str(label).encode()} for uri, label in folder.items]
    for t in range(0, len(samples), 50):
        write_tar(tmp_path / "tars" / f"eval-{t // 50:06d}.tar", samples[t:t + 50])
    (tmp_path / "tars" / "classnames.txt").write_text("\n".join(folder.classnames) + "\n")
    tars = open_set(str(tmp_path / "tars"))
    assert tars.kind == "wds" and tars.classnames == folder.classnames and tars.location == str(tmp_path / "tars")
    assert [s.label for s in tars] == [lb for _, lb in folder.items] and tars.bad_count == 0
    storage.upload_dir(trained_tiny.eval_dir, f"s3://{bucket}/eval")
    remote = open_set(f"s3://{bucket}/eval", limit=12)
    got = [s.label for s in remote]
    assert len(got) == 12 and sorted(set(got)) == list(range(6))  # balanced subset
    storage.upload_dir(str(tmp_path / "tars"), f"s3://{bucket}/wds")
    assert [s.label for s in open_set(f"s3://{bucket}/wds", limit=5)] == [0] * 5


def test_linear_probe_split_is_deterministic_and_learns():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    centres = rng.normal(size=(4, 16)) * 3
    feats = centres[labels] + rng.normal(size=(len(labels), 16))
    a, b = split_per_class(labels, 0.5, seed=3), split_per_class(labels, 0.5, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], split_per_class(labels, 0.5, seed=4)[1])
    assert set(a[0]).isdisjoint(a[1]) and len(a[0]) + len(a[1]) == len(labels)
    res, fitted = linear_probe(feats, labels, ProbeConfig(shots=(1, 4, 16, 100), seed=3))
    assert list(res["settings"]) == ["1shot", "4shot", "full"]  # 16 and 100 shots leave no validation
    assert res["settings"]["full"]["top1"] > 0.9 and res["settings"]["full"]["shots"] is None
    assert res == linear_probe(feats, labels, ProbeConfig(shots=(1, 4, 16, 100), seed=3))[0]
    # the fitted full probe scores its test split as reported, and can be restricted to some classes
    assert np.array_equal(fitted.test_idx, a[1])
    assert (fitted.predict(feats[a[1]]) == labels[a[1]]).mean() == res["settings"]["full"]["top1"]
    assert set(fitted.predict(feats, allowed=np.array([1, 3]))) <= {1, 3}


def test_templates_and_class_names(tmp_path):
    assert len(resolve_templates("imagenet")) == 80 and len(resolve_templates("cifar")) == 18
    f = tmp_path / "t.txt"
    f.write_text("# mine\na {} thing\nan image of {}\n")
    assert resolve_templates(str(f)) == ["a {} thing", "an image of {}"]
    f.write_text("a {c} thing\n")  # CLIP_benchmark's placeholder
    assert resolve_templates(str(f)) == ["a {c} thing"]
    f.write_text("no placeholder\n")
    with pytest.raises(ValueError, match="placeholder"):
        resolve_templates(str(f))
    with pytest.raises(ValueError, match="neither a template set"):
        resolve_templates("nope")
    from clip_model.templates import CIFAR10_CLASSNAMES

    folders = sorted(["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"])
    names, index = map_folders(folders[::-1], CIFAR10_CLASSNAMES, "x")
    assert names == list(CIFAR10_CLASSNAMES) and index["automobile"] == 1
    # ImageNet-style wnid folders (not class names): sorted folders <-> names in order
    assert map_folders(["n02", "n01"], ["tench", "goldfish"], "x") == (["tench", "goldfish"], {"n01": 0, "n02": 1})
    assert map_folders(["n0", "n1"], ["n1\tone", "n0\tzero"], "x") == (["one", "zero"], {"n1": 0, "n0": 1})
    assert map_folders(["a_b", "c"], None, "x") == (["a b", "c"], {"a_b": 0, "c": 1})
    names, index = map_folders(["Red", "blue"], ["red", "green", "blue"], "x")  # a class without images
    assert names == ["red", "green", "blue"] and index == {"Red": 0, "blue": 2}
    with pytest.raises(ValueError, match="3 class folders but 2 class names"):
        map_folders(["x", "y", "z"], ["p", "q"], "set")

"""Evaluation stage: zero-shot, retrieval and linear probe on a tiny CLIP trained on the synthetic corpus."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from components.common.tracking import TrackingConfig
from components.evaluate.config import EvalConfig
from components.evaluate.data import load_labelled_set, map_folders
from components.evaluate.probe import ProbeConfig, linear_probe, split_per_class
from components.evaluate.report import markdown_report, to_kfp_artifacts
from components.evaluate.stage import evaluate
from components.evaluate.templates import resolve_templates
from tests.fixtures_model import trained_tiny  # noqa: F401  (session fixture)


@pytest.fixture(scope="module")
def eval_run(trained_tiny, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("evaluate")
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp}/mlflow.db", experiment="test-evaluate")
    cfg = EvalConfig(eval_data_uri=trained_tiny.eval_dir, dataset="synthetic", probe_shots=(1, 4),
                     retrieval_examples=4, num_threads=2)
    out = tmp / "out"
    result = evaluate(trained_tiny.model_uri, trained_tiny.manifest_uri, str(out), cfg, tracking)
    report = json.loads((out / "report.json").read_text())
    assert json.loads(json.dumps(result)) == report and result["report_uri"] == str(out / "report.json")
    metrics = result["metrics"]
    return metrics, report, tracking, out


def test_zero_shot_beats_chance(eval_run):
    metrics, report, _, _ = eval_run
    zs = report["zeroshot"]
    assert zs["classnames"] == ["red", "green", "blue", "yellow", "purple", "orange"]
    assert zs["num_templates"] == 6 and zs["n"] == 6 * 24
    # six colour classes: chance is 1/6; a tiny model trained for a few hundred steps does far better
    assert metrics["zeroshot_top1"] >= 2.5 * zs["chance"], metrics
    assert metrics["linear_probe_top1_full"] >= 2.5 * zs["chance"], metrics


def test_evaluation_never_substitutes_data(trained_tiny, tmp_path):  # noqa: F811
    """No labelled set means no zero-shot and no probe, said in the report; "synthetic" is generated
    on one path (a fixed seed, never the training corpus's) and named as such."""
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="test-evaluate-skip")
    skipped = evaluate(trained_tiny.model_uri, trained_tiny.manifest_uri, str(tmp_path / "none"),
                       EvalConfig(eval_data_uri="", num_threads=2), tracking)
    assert "zeroshot" not in skipped and "linear_probe" not in skipped and "retrieval" in skipped
    assert skipped["skipped"] == {"zeroshot": "no eval_data_uri", "linear_probe": "no eval_data_uri"}
    assert skipped["dataset"] == "custom" and skipped["eval_data"].startswith("none: eval_data_uri is empty")
    assert not any(k.startswith(("zeroshot", "linear_probe")) for k in skipped["metrics"])
    assert "zeroshot skipped: no eval_data_uri" in markdown_report(skipped)

    generated = evaluate(trained_tiny.model_uri, None, str(tmp_path / "synthetic"),
                         EvalConfig(eval_data_uri="synthetic", synthetic_per_class=3, linear_probe=False,
                                    num_threads=2), tracking)
    assert generated["dataset"] == "synthetic" and generated["zeroshot"]["n"] == 6 * 3
    assert generated["eval_data"].startswith("synthetic: generated, 3 images per class, seed 1")
    assert sorted(p.name for p in (tmp_path / "synthetic" / "data").iterdir())[0] == "blue"
    assert generated["skipped"] == {"linear_probe": "linear_probe is off", "retrieval": "no dataset manifest"}


def test_metrics_are_consistent(eval_run):
    metrics, report, _, _ = eval_run
    assert metrics["zeroshot_top5"] >= metrics["zeroshot_top1"]
    for d in ("image_to_text", "text_to_image"):
        r1, r5, r10 = (metrics[f"retrieval_{d}_R_at_{k}"] for k in (1, 5, 10))
        assert 0 <= r1 <= r5 <= r10 <= 1
        assert metrics[f"retrieval_{d}_median_rank"] >= 1 and metrics[f"retrieval_{d}_mean_rank"] >= 1
    n_val = report["retrieval"]["n"]
    assert n_val >= 30
    # better than chance retrieval (chance R@10 = 10 / n)
    assert metrics["retrieval_text_to_image_R_at_10"] > 2 * 10 / n_val, metrics
    cm = np.array(report["zeroshot"]["confusion_matrix"]["matrix"])
    assert cm.sum() == report["zeroshot"]["n"]
    assert np.trace(cm) / cm.sum() == pytest.approx(metrics["zeroshot_top1"], abs=1e-6)
    per_class = report["zeroshot"]["per_class_accuracy"]
    assert np.mean(per_class) == pytest.approx(metrics["zeroshot_mean_per_class"], abs=1e-6)
    settings = report["linear_probe"]["settings"]
    assert list(settings) == ["1shot", "4shot", "full"]
    assert settings["1shot"]["n_train"] == 6 and settings["4shot"]["n_train"] == 24
    assert all(s["C"] in EvalConfig().probe_c_grid for s in settings.values())


def test_outputs_and_mlflow_run(eval_run):
    import mlflow

    metrics, report, tracking, out = eval_run
    for png in ("confusion_matrix.png", "per_class_accuracy.png", "linear_probe.png", "retrieval_examples.png"):
        assert (out / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mlflow.set_tracking_uri(tracking.tracking_uri)
    run = mlflow.get_run(report["mlflow_run_id"])
    assert run.data.tags["stage"] == "evaluate"
    for k, v in metrics.items():
        assert run.data.metrics[k] == pytest.approx(v)
    client = mlflow.MlflowClient()
    files = {f.path for f in client.list_artifacts(run.info.run_id)}
    plots = {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    assert "report.json" in files and "plots/retrieval_examples.png" in plots and "plots/confusion_matrix.png" in plots


def test_kfp_artifacts(eval_run):
    from kfp import dsl

    _, report, _, _ = eval_run
    m, c = dsl.Metrics(), dsl.ClassificationMetrics()
    to_kfp_artifacts(report, m, c)
    assert m.metadata["zeroshot_top1"] == pytest.approx(report["metrics"]["zeroshot_top1"])
    assert set(m.metadata) == set(report["metrics"])
    cm = c.metadata["confusionMatrix"]
    assert [a["displayName"] for a in cm["annotationSpecs"]] == report["zeroshot"]["classnames"]
    assert [r["row"] for r in cm["rows"]] == report["zeroshot"]["confusion_matrix"]["matrix"]
    flat = dsl.Metrics()
    to_kfp_artifacts(report["metrics"], flat)  # a bare metrics dict works too
    assert flat.metadata == m.metadata


def _write_labelled_tars(src: Path, dst: Path, per_tar: int = 50) -> None:
    data = load_labelled_set(str(src))
    dst.mkdir(parents=True)
    items = list(data.items)
    for t in range(0, len(items), per_tar):
        with tarfile.open(dst / f"eval-{t // per_tar:06d}.tar", "w") as tar:
            for i, (uri, label) in enumerate(items[t:t + per_tar]):
                for ext, payload in (("png", Path(uri).read_bytes()), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{t + i:06d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    (dst / "classnames.txt").write_text("\n".join(data.classnames) + "\n")


def test_labelled_tars_and_s3_folder(trained_tiny, tmp_path, bucket):  # noqa: F811
    from components.common import storage

    folder = load_labelled_set(trained_tiny.eval_dir)
    _write_labelled_tars(Path(trained_tiny.eval_dir), tmp_path / "tars")
    tars = load_labelled_set(str(tmp_path / "tars"))
    assert tars.kind == "wds" and tars.classnames == folder.classnames
    assert [lb for _, _, lb in tars] == [lb for _, lb in folder.items]
    storage.upload_dir(trained_tiny.eval_dir, f"s3://{bucket}/eval")
    remote = load_labelled_set(f"s3://{bucket}/eval", limit=12)
    got = [(label, img.size) for _, img, label in remote]
    assert len(got) == 12 and sorted({lb for lb, _ in got}) == list(range(6))  # balanced subset
    bad = tmp_path / "bad"
    bad.mkdir()
    with tarfile.open(bad / "x.tar", "w") as tar:
        info = tarfile.TarInfo("000001.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    (bad / "classnames.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match=r"x.tar sample '000001'.*\.cls"):
        list(load_labelled_set(str(bad)))


def test_linear_probe_split_is_deterministic_and_learns():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 30)
    centres = rng.normal(size=(4, 16)) * 3
    feats = centres[labels] + rng.normal(size=(len(labels), 16))
    a, b = split_per_class(labels, 0.5, seed=3), split_per_class(labels, 0.5, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], split_per_class(labels, 0.5, seed=4)[1])
    assert set(a[0]).isdisjoint(a[1]) and len(a[0]) + len(a[1]) == len(labels)
    res = linear_probe(feats, labels, ProbeConfig(shots=(1, 4, 16, 100), seed=3))
    assert list(res["settings"]) == ["1shot", "4shot", "full"]  # 16 and 100 shots leave no validation
    assert res["settings"]["full"]["top1"] > 0.9
    assert res == linear_probe(feats, labels, ProbeConfig(shots=(1, 4, 16, 100), seed=3))


def test_templates_and_class_names(tmp_path):
    assert len(resolve_templates("imagenet")) == 80 and len(resolve_templates("cifar")) == 18
    f = tmp_path / "t.txt"
    f.write_text("# mine\na {} thing\nan image of {}\n")
    assert resolve_templates(str(f)) == ["a {} thing", "an image of {}"]
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
    with pytest.raises(ValueError, match="dataset="):
        EvalConfig(dataset="mnist")

"""Runs that compare: the parent run's headline metrics and params, and the datasets each stage read as
MLflow dataset inputs (same data, same digest)."""

import json
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.common import inputs
from components.common.headline import record_headline
from components.common.tracking import TrackingConfig


@pytest.fixture
def tracking(tmp_path):
    cfg = TrackingConfig(f"sqlite:///{tmp_path / 'mlflow.db'}", "compare")
    cfg.apply()
    return cfg


def _inputs(run_id: str) -> list:
    return mlflow.get_run(run_id).inputs.dataset_inputs


def test_parent_run_gets_the_headline_metrics_and_params(tracking):
    with mlflow.start_run(run_name="pipeline", tags={"stage": "pipeline", "kfp.run_id": "kfp-1"}) as parent:
        mlflow.log_param("data_root", "/data")
    pid = parent.info.run_id
    stage_data = {"filter": ({"total": 600, "kept": 450}, {}, {}),
                  "shard": ({"samples.train": 430}, {}, {"dataset.content_hash": "ab" * 32}),
                  "train": ({"final_loss": 1.25, "samples_per_s": 88.0},
                            {"model_config": "tiny", "steps": "30", "batch_size": "16", "global_batch": "16"}, {}),
                  "evaluate": ({"mean/zeroshot_top1": 0.41, "mean/linear_probe_top1_full": 0.6,
                                "validation/retrieval_image_to_text_R_at_1": 0.2,
                                "validation/retrieval_text_to_image_R_at_1": 0.25}, {}, {"eval_suite": "synthetic"}),
                  "export": ({"parity_image_max_abs": 2e-6, "parity_text_max_abs": 5e-6,
                              "parity_image_min_cosine": 1.0}, {}, {})}
    for stage, (metrics, params, tags) in stage_data.items():
        with mlflow.start_run(run_name=stage, parent_run_id=pid, nested=True, tags={"stage": stage, **tags}):
            mlflow.log_metrics(metrics)
            mlflow.log_params(params)
            if stage == "train":
                inputs.log_manifest({"content_hash": "ab" * 32, "splits": {}}, "/data/shards/manifest.json")
    logged = record_headline(tracking.tracking_uri, tracking.experiment, "kfp-1")
    run = mlflow.get_run(pid)
    expected = {"kept_fraction": 0.75, "final_loss": 1.25, "samples_per_s": 88.0, "mean/zeroshot_top1": 0.41,
                "mean/linear_probe_top1_full": 0.6, "validation/retrieval_image_to_text_R_at_1": 0.2,
                "validation/retrieval_text_to_image_R_at_1": 0.25, "onnx_parity_max_abs": 5e-6}
    assert run.data.metrics == pytest.approx(expected) and logged["metrics"] == pytest.approx(expected)
    assert {k: v for k, v in run.data.params.items() if k != "data_root"} == {
        "model_config": "tiny", "steps": "30", "batch_size": "16", "global_batch": "16",
        "dataset_content_hash": "ab" * 32, "eval_suite": "synthetic"}
    (shards,) = run.inputs.dataset_inputs
    assert (shards.dataset.name, shards.dataset.digest) == (inputs.MANIFEST_NAME, "ab" * 6), "the Dataset column"
    # a second call (finish-run retried) changes nothing and does not fail
    record_headline(tracking.tracking_uri, tracking.experiment, "kfp-1")
    assert mlflow.get_run(pid).data.metrics == pytest.approx(expected)
    assert len(mlflow.get_run(pid).inputs.dataset_inputs) == 1


def test_a_pipeline_that_failed_early_gets_what_ran(tracking):
    with mlflow.start_run(run_name="pipeline", tags={"stage": "pipeline", "kfp.run_id": "kfp-2"}) as parent:
        pass
    with mlflow.start_run(run_name="filter", parent_run_id=parent.info.run_id, nested=True, tags={"stage": "filter"}):
        mlflow.log_metrics({"total": 10, "kept": 4})
    record_headline(tracking.tracking_uri, tracking.experiment, "kfp-2")
    run = mlflow.get_run(parent.info.run_id)
    assert run.data.metrics == pytest.approx({"kept_fraction": 0.4}) and run.data.params == {}


def _source(root: Path) -> Path:
    (root / "a").mkdir(parents=True)
    (root / "a" / "0.jpg").write_bytes(b"x" * 100)
    (root / "1.txt").write_text("a red circle")
    return root


def test_the_same_source_gives_the_same_digest_anywhere(tracking, tmp_path):
    digests = []
    for where in ("one", "two"):
        with mlflow.start_run() as run:
            inputs.log_source(str(_source(tmp_path / where)))
        (got,) = _inputs(run.info.run_id)
        assert got.dataset.name == inputs.SOURCE_NAME and got.dataset.source_type == "local"
        # MLflow keeps one dataset per (name, digest) in an experiment: the second run links the first's
        assert json.loads(got.dataset.source)["uri"] == str(tmp_path / "one")
        assert [(t.key, t.value) for t in got.tags] == [("mlflow.data.context", "source")]
        assert json.loads(got.dataset.profile)["files"] == 2
        digests.append(got.dataset.digest)
    assert digests[0] == digests[1] and len(digests[0]) == inputs.DIGEST_CHARS
    (tmp_path / "two" / "1.txt").write_text("a blue square, longer")
    with mlflow.start_run() as run:
        inputs.log_source(str(tmp_path / "two"))
    assert _inputs(run.info.run_id)[0].dataset.digest != digests[0], "other content, other digest"


def test_filter_output_manifest_and_eval_sets_as_inputs(tracking, tmp_path):
    from components.evaluate.datasets import open_set
    from components.evaluate.plan import Planned
    from components.evaluate.suite import DatasetSpec

    out = tmp_path / "filtered"
    (out / "kept").mkdir(parents=True)
    table = pa.table({"key": ["k0", "k1", "k2"], "sha256": ["s0", "s1", "s2"], "caption": ["a", "b", "c"],
                      "image": [b"\xff", b"\xfe", b"\xfd"]})
    pq.write_table(table, out / "kept" / "part-00000.parquet")
    # the same records split into other part files, in another order: the same digest
    again = tmp_path / "again"
    (again / "kept").mkdir(parents=True)
    pq.write_table(table.slice(2), again / "kept" / "part-00000.parquet", compression="gzip")
    pq.write_table(table.slice(0, 2), again / "kept" / "part-00007.parquet")
    manifest = {"content_hash": "cd" * 32, "tokenizer_sha256": "ef" * 32,
                "splits": {"train": {"samples": 3, "shards": [{"uri": "t0.tar"}]},
                           "validation": {"samples": 1, "shards": [{"uri": "v0.tar"}]}}}
    classes = _source(tmp_path / "eval")
    data = open_set(str(classes))
    planned = [Planned(DatasetSpec("colors", str(classes)), data, ("zeroshot",), ["{}"], "test", str(classes))]
    with mlflow.start_run() as run:
        inputs.log_filtered(str(out))
        inputs.log_manifest(manifest, str(tmp_path / "shards" / "manifest.json"))
        inputs.log_eval_sets(planned)
    got = {i.dataset.name: i for i in _inputs(run.info.run_id)}
    assert set(got) == {inputs.FILTERED_NAME, inputs.MANIFEST_NAME, "colors"}
    filtered = got[inputs.FILTERED_NAME].dataset
    assert json.loads(filtered.schema)["mlflow_colspec"] == [
        {"type": "string", "name": "key", "required": True}, {"type": "string", "name": "sha256", "required": True},
        {"type": "string", "name": "caption", "required": True}, {"type": "binary", "name": "image", "required": True}]
    assert json.loads(filtered.profile)["rows"] == 3
    with mlflow.start_run():
        assert inputs.log_filtered(str(again)).digest == filtered.digest
    shards = got[inputs.MANIFEST_NAME].dataset
    assert shards.digest == "cd" * 6 and json.loads(shards.profile)["train.samples"] == 3
    assert json.loads(shards.profile)["content_hash"] == "cd" * 32, "the whole hash is in the profile"
    colors = got["colors"]
    assert ("mlflow.data.context", "evaluation") in [(t.key, t.value) for t in colors.tags]
    assert json.loads(colors.dataset.profile)["classes"] == 1
    assert colors.dataset.digest == inputs.listing_fingerprint(str(classes))[0][:inputs.DIGEST_CHARS]


def test_a_source_on_s3_gets_the_digest_of_the_same_files_on_disk(tracking, tmp_path, bucket):
    from components.common import storage

    local = _source(tmp_path / "src")
    storage.upload_dir(str(local), f"s3://{bucket}/raw")
    assert storage.list_sizes(f"s3://{bucket}/raw") == [(f"s3://{bucket}/raw/1.txt", 12),
                                                          (f"s3://{bucket}/raw/a/0.jpg", 100)]
    assert inputs.listing_fingerprint(f"s3://{bucket}/raw") == inputs.listing_fingerprint(str(local))
    with mlflow.start_run() as run:
        inputs.log_source(f"s3://{bucket}/raw")
    (got,) = _inputs(run.info.run_id)
    assert got.dataset.source_type == "s3" and json.loads(got.dataset.source)["uri"] == f"s3://{bucket}/raw"

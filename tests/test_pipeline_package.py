"""The compiled KFP package: fresh, five stages in order, the parameters users set in the KFP UI."""

import yaml

from pipelines import platform as pf
from pipelines.compile import PACKAGE, is_stale

STAGES = ["filter-pairs", "shard-pairs", "train-clip", "evaluate-clip", "export-onnx"]
UI_PARAMETERS = {"source_uri", "data_root", "filter_preset", "model_config", "train_steps", "batch_size",
                 "num_workers", "gpus_per_worker", "mlflow_experiment", "registered_model_name",
                 "mlflow_tracking_uri", "s3_endpoint", "image"}


def _documents():
    return list(yaml.safe_load_all(PACKAGE.read_text()))


def test_committed_package_is_not_stale():
    assert not is_stale(), "pipelines/clip_pipeline.yaml is stale: run `python -m pipelines.compile`"


def test_dag_has_the_five_stages_in_order():
    spec = _documents()[0]
    body = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert set(STAGES) <= set(body)

    def upstream(task):  # every task this one waits for, by data or by `.after`
        deps = set(body[task].get("dependentTasks", []))
        for art in body[task].get("inputs", {}).get("artifacts", {}).values():
            deps.add(art["taskOutputArtifact"]["producerTask"])
        return deps

    for before, after in zip(STAGES, STAGES[1:]):
        assert before in upstream(after), f"{after} must run after {before}"
    assert "start-tracking" in upstream("filter-pairs")
    # the exit handler closes the MLflow parent run whatever happened
    root = spec["root"]["dag"]["tasks"]
    assert root["finish-tracking"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"


def test_pipeline_parameters_and_cluster_defaults():
    spec = _documents()[0]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert UI_PARAMETERS <= set(params)
    assert params["mlflow_tracking_uri"]["defaultValue"] == pf.MLFLOW_TRACKING_URI
    assert params["s3_endpoint"]["defaultValue"] == pf.S3_ENDPOINT
    assert params["data_root"]["defaultValue"].startswith(f"s3://{pf.BUCKET}/")
    assert params["source_uri"]["defaultValue"] == "synthetic"


def test_components_run_on_the_project_image_without_runtime_installs():
    spec = _documents()[0]
    for name, executor in spec["deploymentSpec"]["executors"].items():
        container = executor["container"]
        assert container["image"] == pf.COMPONENT_IMAGE, name
        assert "pip install" not in " ".join(container["command"]), name


def test_platform_spec_sets_secrets_labels_retries():
    docs = _documents()
    assert len(docs) == 2, "kfp-kubernetes settings compile to a second (platform) document"
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for stage in STAGES:
        cfg = executors[f"exec-{stage}"]
        secrets = {s["secretName"] if "secretName" in s else s["secretNameParameter"]["runtimeValue"]["constant"]
                   for s in cfg["secretAsEnv"]}
        assert pf.S3_SECRET in secrets, stage
        assert cfg["podMetadata"]["labels"]["clipflow/access-storage"] == "true"
    tasks = docs[0]["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    for stage in ("filter-pairs", "shard-pairs"):
        assert tasks[stage]["retryPolicy"]["maxRetryCount"] == 2
        assert tasks[stage]["cachingOptions"]["enableCache"] is True

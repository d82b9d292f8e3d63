"""Cluster mode offline: the train step as a KubeRay RayJob (fake Kubernetes API), and KFP submission."""

import json
import shlex
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import yaml

from pipelines import platform as pf
from pipelines import rayjob, steps
from pipelines.submit import parse_arguments, submit

TEMPLATE = Path(__file__).resolve().parents[1] / "k8s" / "overlays" / "prod-gpu" / "rayjob-template-gpu.yaml"


class FakeKubeRay:
    """Creates nothing real: on create it plays the RayJob's driver by writing train_result.json."""

    def __init__(self, final_status):
        self.final_status, self.created, self.deleted = final_status, [], []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append(body)
        argv = shlex.split(body["spec"]["entrypoint"])
        out = Path(argv[argv.index("--output") + 1])
        if self.final_status["jobStatus"] == "SUCCEEDED":
            out.mkdir(parents=True, exist_ok=True)
            (out / "train_result.json").write_text(json.dumps(
                {"run_id": "train-run-1", "model_uri": str(out / "model.pt"), "steps": 7}))

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        return {"status": self.final_status}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.deleted.append(name)


class Artifact(SimpleNamespace):
    def __init__(self, path):
        super().__init__(path=str(path), metadata={})


@pytest.fixture
def cluster_step(tmp_path, monkeypatch):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx_json = steps.start_tracking(str(tmp_path / "data"), tracking, "cluster", "run-42", "", {"p": 1})
    dataset = Artifact(tmp_path / "dataset")
    Path(dataset.path).write_text(json.dumps({"uri": "/data/manifest.json", "content_hash": "h" * 64,
                                              "tokenizer": "/data/tokenizer.json"}))
    monkeypatch.setattr(rayjob, "load_template", lambda namespace, core_api=None: yaml.safe_load(TEMPLATE.read_text()))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # launcher=auto -> RayJob

    def run(final_status):
        api = FakeKubeRay(final_status)
        monkeypatch.setattr(rayjob, "custom_objects_api", lambda: api)
        model = Artifact(tmp_path / "model")
        result = steps.train_step(ctx_json, dataset, "ViT-B-32", 100, 256, 5e-4, 4, 8, "12", "96Gi", "auto",
                                  "registry.example/clipflow:2.0", model)
        return api, result, model, json.loads(ctx_json)

    return run


def test_train_step_runs_a_rayjob_and_records_lineage(cluster_step):
    api, result, model, ctx = cluster_step({"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"})
    (job,) = api.created
    assert job["metadata"]["namespace"] == pf.NAMESPACE and api.deleted == [job["metadata"]["name"]]
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == 4
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits == {"cpu": "12", "memory": "96Gi", "nvidia.com/gpu": 8}
    argv = shlex.split(job["spec"]["entrypoint"])
    config = json.loads(argv[argv.index("--config") + 1])
    assert (config["model"], config["use_gpu"]) == ("ViT-B-32", True)
    assert config["num_workers"] == 32, "one Ray Train worker per GPU: 4 pods x 8 GPUs"
    assert argv[argv.index("--parent-run-id") + 1] == ctx["parent_run_id"]
    assert result["run_id"] == "train-run-1"
    assert json.loads(Path(model.path).read_text())["dataset_content_hash"] == "h" * 64
    parent = mlflow.get_run(ctx["parent_run_id"])
    assert parent.data.tags["lineage.training_run_id"] == "train-run-1"


def test_failed_rayjob_fails_the_train_step_with_the_jobs_message(cluster_step):
    with pytest.raises(rayjob.RayJobFailed, match="NCCL timeout on rank 3"):
        cluster_step({"jobStatus": "FAILED", "jobDeploymentStatus": "Failed",
                      "message": "Job entrypoint command failed: NCCL timeout on rank 3"})


def test_launcher_resolution(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert steps.resolve_launcher("auto") == "local"
    assert steps.resolve_launcher("rayjob") == "rayjob"
    with pytest.raises(ValueError, match="launcher"):
        steps.resolve_launcher("slurm")


class FakeKfp:
    def __init__(self, existing=None):
        self.existing, self.calls = existing, []

    def get_pipeline_id(self, name):
        return self.existing

    def upload_pipeline(self, path, pipeline_name, namespace=None):
        self.calls.append(("upload", pipeline_name))

    def upload_pipeline_version(self, path, pipeline_version_name, pipeline_id):
        self.calls.append(("version", pipeline_id))

    def create_run_from_pipeline_package(self, path, **kw):
        self.calls.append(("run", kw))
        return SimpleNamespace(run_id="kfp-run-1")


def test_submit_uploads_then_runs_with_the_pipeline_service_account():
    client = FakeKfp()
    assert submit("http://kfp", {"train_steps": 10}, client=client) == "kfp-run-1"
    assert client.calls[0] == ("upload", "clip-pretraining")
    run = client.calls[1][1]
    assert run["service_account"] == pf.SERVICE_ACCOUNT and run["arguments"] == {"train_steps": 10}
    again = FakeKfp(existing="pid-7")
    submit("http://kfp", {}, client=again)
    assert again.calls[0] == ("version", "pid-7")


def test_submit_argument_parsing():
    assert parse_arguments(["train_steps=10", "model_config=ViT-B-32", "learning_rate=1e-4"]) == \
        {"train_steps": 10, "model_config": "ViT-B-32", "learning_rate": 1e-4}
    with pytest.raises(ValueError, match="key=value"):
        parse_arguments(["oops"])

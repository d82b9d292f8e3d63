"""Cluster mode offline: the filter, shard and train steps as KubeRay RayJobs (fake Kubernetes API), and KFP
submission."""

import json
import shlex
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import yaml

from components.common import config
from components.common.context import RunConfig, start_run
from components.train import task as train_task
from components.train.config import TrainConfig
from components.common import platform as pf
from components.common import rayjob
from pipelines.arguments import typed_arguments
from pipelines.submit import submit

TEMPLATE = Path(__file__).resolve().parents[1] / "k8s" / "overlays" / "prod-gpu" / "rayjob-template-gpu.yaml"


class FakeKubeRay:
    """Creates nothing real: on create it plays the RayJob's driver: for training by writing train_result.json,
    for filter and shard by running the job's `clipflow` command in this process (on the test's Ray)."""

    def __init__(self, final_status):
        self.final_status, self.created, self.deleted = final_status, [], []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.created.append(body)
        argv = shlex.split(body["spec"]["entrypoint"])
        assert argv[0] == "clipflow" and argv[1] in ("filter", "shard", "train")
        if argv[1] != "train":
            from pipelines.cli import main

            assert main(argv[1:]) == 0
            return
        out = Path(argv[3])  # clipflow train MANIFEST OUTPUT ...
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
    ctx_json = start_run(RunConfig(data_root=str(tmp_path / "data"), mlflow_tracking_uri=tracking,
                                   mlflow_experiment="cluster"), "run-42").to_json()
    dataset = Artifact(tmp_path / "dataset")
    tokenizer = tmp_path / "shards" / "tokenizer.json"  # the step copies it beside the model
    tokenizer.parent.mkdir()
    tokenizer.write_text('{"stand-in": "the dataset tokenizer"}')
    Path(dataset.path).write_text(json.dumps({"uri": "/data/manifest.json", "content_hash": "h" * 64,
                                              "tokenizer": str(tokenizer)}))
    monkeypatch.setattr(rayjob, "load_template", lambda namespace, core_api=None: yaml.safe_load(TEMPLATE.read_text()))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # launcher=auto -> RayJob

    def run(final_status):
        api = FakeKubeRay(final_status)
        monkeypatch.setattr(rayjob, "custom_objects_api", lambda: api)
        model = Artifact(tmp_path / "model")
        result = train_task.run(ctx=ctx_json, dataset=dataset, model=model, model_config="ViT-B-32", steps=100,
                                     batch_size=256, lr=5e-4, num_workers=4, gpus_per_worker=8, cpus_per_worker="12",
                                     memory_per_worker="96Gi", launcher="auto", image="registry.example/clipflow:2.0")
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
    assert "activeDeadlineSeconds" not in job["spec"] and job["spec"]["backoffLimit"] == 0  # days-long runs live
    argv = shlex.split(job["spec"]["entrypoint"])
    cfg = config.from_json(TrainConfig, argv[argv.index("--config") + 1])  # what the RayJob's driver reads
    assert (cfg.model_config, cfg.use_gpu, cfg.steps, cfg.optim.lr) == ("ViT-B-32", True, 100, 5e-4)
    assert cfg.processes == 32, "one Ray Train worker per GPU: 4 pods x 8 GPUs"
    assert workers["template"]["spec"]["containers"][0]["image"] == "registry.example/clipflow:2.0"
    assert argv[argv.index("--parent-run-id") + 1] == ctx["parent_run_id"]
    assert result["run_id"] == "train-run-1"
    assert json.loads(Path(model.path).read_text())["dataset_content_hash"] == "h" * 64
    parent = mlflow.get_run(ctx["parent_run_id"])
    assert parent.data.tags["lineage.training_run_id"] == "train-run-1"
    assert (Path(result["model_uri"]).parent / "tokenizer.json").read_text() == '{"stand-in": "the dataset tokenizer"}'


def test_filter_and_shard_steps_run_as_rayjobs(tmp_path, monkeypatch):
    """launcher auto inside Kubernetes: filter and shard each run their own command as a RayJob of data_workers CPU
    pods with the RayJob settings; the steps then read what the job wrote (stats, manifest) and record it."""
    from components.common.ray_runtime import ray_session
    from components.filter import task as filter_task
    from components.shard import task as shard_task

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx_json = start_run(RunConfig(data_root=str(tmp_path / "data"), mlflow_tracking_uri=tracking,
                                   mlflow_experiment="cluster"), "run-7").to_json()
    monkeypatch.setattr(rayjob, "load_template", lambda namespace, core_api=None: yaml.safe_load(TEMPLATE.read_text()))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    api = FakeKubeRay({"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"})
    monkeypatch.setattr(rayjob, "custom_objects_api", lambda: api)
    cluster = {"launcher": "auto", "data_workers": 3, "data_cpus_per_worker": "6", "data_memory_per_worker": "24Gi",
               "rayjob_deadline_s": 0, "rayjob_backoff_limit": 2, "rayjob_ttl_s": 60}
    filtered, dataset = Artifact(tmp_path / "filtered.json"), Artifact(tmp_path / "dataset.json")
    with ray_session(num_cpus=2, log_to_driver=False):  # the "RayJob's" Ray
        filter_task.run(ctx=ctx_json, filtered=filtered, source_uri="synthetic", synthetic_samples=60,
                        preset="datacomp_basic", **cluster)
        shard_task.run(ctx=ctx_json, filtered=filtered, dataset=dataset, samples_per_shard=16, vocab_size=300,
                       val_fraction=0.1, tokenizer="", init_checkpoint="", **cluster)
    assert [job["metadata"]["name"] for job in api.created] == ["clip-filter-run-7", "clip-shard-run-7"]
    assert api.deleted == ["clip-filter-run-7", "clip-shard-run-7"]
    for job, stage in zip(api.created, ("filter", "shard")):
        spec = job["spec"]
        assert job["metadata"]["labels"]["app.kubernetes.io/component"] == stage
        assert (spec["backoffLimit"], spec["ttlSecondsAfterFinished"]) == (2, 60)
        assert "activeDeadlineSeconds" not in spec
        (workers,) = spec["rayClusterSpec"]["workerGroupSpecs"]
        assert workers["replicas"] == 3
        resources = workers["template"]["spec"]["containers"][0]["resources"]
        assert resources["limits"] == resources["requests"] == {"cpu": "6", "memory": "24Gi"}  # no GPU
        assert shlex.split(spec["entrypoint"])[:2] == ["clipflow", stage]
    filter_out = json.loads(Path(filtered.path).read_text())
    assert filter_out["stats"]["kept"] > 0
    pointer = json.loads(Path(dataset.path).read_text())
    manifest = json.loads(Path(pointer["uri"]).read_text())
    assert pointer["content_hash"] == manifest["content_hash"]
    assert manifest["config"]["samples_per_shard"] == 16 and manifest["source"] == filter_out["uri"]
    assert sum(s["samples"] for s in manifest["splits"]["train"]["shards"]) == pointer["samples"] > 0


def test_failed_rayjob_fails_the_train_step_with_the_jobs_message(cluster_step):
    with pytest.raises(rayjob.RayJobFailed, match="NCCL timeout on rank 3"):
        cluster_step({"jobStatus": "FAILED", "jobDeploymentStatus": "Failed",
                      "message": "Job entrypoint command failed: NCCL timeout on rank 3"})


def test_launcher_resolution(monkeypatch):
    from components.common.rayjob import DataCluster

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert TrainConfig(launcher="auto").resolved_launcher() == "local"
    assert DataCluster(launcher="auto").resolved_launcher() == "local"
    with pytest.raises(ValueError, match="launcher"):
        DataCluster(launcher="slurm")
    assert TrainConfig(launcher="rayjob").resolved_launcher() == "rayjob"
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert TrainConfig(launcher="auto").resolved_launcher() == "rayjob"
    with pytest.raises(ValueError, match="launcher"):
        TrainConfig(launcher="slurm")


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
    assert submit("http://kfp", {"steps": 10}, client=client) == "kfp-run-1"
    assert client.calls[0] == ("upload", "clip-pretraining")
    run = client.calls[1][1]
    assert run["service_account"] == pf.SERVICE_ACCOUNT and run["arguments"] == {"steps": 10}
    again = FakeKfp(existing="pid-7")
    submit("http://kfp", {}, client=again)
    assert again.calls[0] == ("version", "pid-7")


def test_submit_arguments_take_the_parameters_types():
    assert typed_arguments(config.parse_sets(["steps=10", "model_config=ViT-B-32", "lr=1e-4", "cpus_per_worker=8"])) \
        == {"steps": 10, "model_config": "ViT-B-32", "lr": 1e-4, "cpus_per_worker": "8"}
    with pytest.raises(config.ConfigError, match="unknown pipeline parameters \\['train_steps'\\]"):
        typed_arguments({"train_steps": "10"})
    with pytest.raises(config.ConfigError, match="key=value"):
        config.parse_sets(["oops"])


def test_a_budget_the_user_names_replaces_the_default_one():
    from pipelines.arguments import pipeline_defaults, with_budget
    from pipelines.local import local_arguments

    assert pipeline_defaults()["epochs"] > 0 and pipeline_defaults()["steps"] == 0  # the paper's epochs on a cluster
    assert with_budget({"steps": 20000, "lr": 1e-4}) == {"steps": 20000, "epochs": 0.0, "lr": 1e-4}
    assert with_budget({"epochs": 2.0}) == {"steps": 0, "epochs": 2.0}
    assert with_budget({"lr": 1e-4}) == {"lr": 1e-4}  # no budget named: the defaults' stands
    assert with_budget({"steps": 5, "epochs": 2.0}) == {"steps": 5, "epochs": 2.0}  # both: TrainConfig refuses it
    local = local_arguments(Path("/tmp/w"), epochs=1.0)  # the local 300 steps give way
    assert (local["steps"], local["epochs"]) == (0, 1.0)

"""The RayJob the train step creates on a cluster: valid for KubeRay v1.7.0, and watched to the end."""

import json
import shlex

import jsonschema
import pytest
import yaml

from components.common import platform as pf
from components.common.rayjob import (DataCluster, RayJobFailed, RayJobPolicy, RayJobSpec, fill_rayjob, job_name,
                                     load_template, run_rayjob, stage_entrypoint, training_entrypoint)
from tests.k8s_helpers import RAYJOB_CRD, RAYJOB_TEMPLATES, kuberay_crd_schema

TEMPLATES = {"cpu": RAYJOB_TEMPLATES["base"], "gpu": RAYJOB_TEMPLATES["prod-gpu"]}


def unknown_fields(obj, schema, path="") -> list[str]:
    """Fields the API server would silently prune (jsonschema alone accepts them)."""
    found = []
    if isinstance(obj, dict) and "properties" in schema:
        for key, value in obj.items():
            if key not in schema["properties"]:
                if not schema.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in schema:
                    found.append(f"{path}.{key}")
                continue
            found += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def gpu_job(template="gpu", **kw):
    spec = RayJobSpec(image="registry.example/clipflow:1.2.3", num_workers=4, gpus_per_worker=8, **kw)
    entry = training_entrypoint("s3://b/p/manifest.json", "s3://b/p/model", {"model": "ViT-B-32", "steps": 10},
                                "http://mlflow:5000", "exp", "parent123")
    return fill_rayjob(yaml.safe_load(TEMPLATES[template].read_text()), job_name("run-ABC_123"), entry, spec,
                       {"AWS_ENDPOINT_URL": "http://s3:8333"})


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_generated_rayjob_validates_against_kuberay_crd(template):
    job = gpu_job(template)
    schema = kuberay_crd_schema(RAYJOB_CRD)  # the vendored KubeRay v1.7.0 CRD
    jsonschema.validate(job, schema)
    assert unknown_fields(job, schema) == []


def test_cpu_only_job_has_no_gpu_request():
    spec = RayJobSpec(num_workers=2, gpus_per_worker=0, cpus_per_worker="6")
    job = fill_rayjob(yaml.safe_load(TEMPLATES["cpu"].read_text()), "clip-train-x", "python -m components.train",
                      spec)
    resources = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in resources["limits"] and resources["limits"]["cpu"] == "6"


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_data_stage_job_has_cpu_workers_and_validates(template):
    """The filter / shard RayJob: data_workers CPU pods of the component image, no GPU, their own command."""
    cluster = DataCluster(data_workers=6, data_cpus_per_worker="16", data_memory_per_worker="64Gi")
    entry = stage_entrypoint("shard", ["s3://b/p/filtered", "s3://b/p/shards"], {"samples_per_shard": 10000})
    job = fill_rayjob(yaml.safe_load(TEMPLATES[template].read_text()), job_name("run-1", "clip-shard"), entry,
                      cluster.spec())
    schema = kuberay_crd_schema(RAYJOB_CRD)
    jsonschema.validate(job, schema)
    assert unknown_fields(job, schema) == []
    (workers,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 6
    resources = workers["template"]["spec"]["containers"][0]["resources"]
    for kind in ("requests", "limits"):
        assert resources[kind] == {"cpu": "16", "memory": "64Gi"}, kind
    assert job["metadata"]["name"].startswith("clip-shard-")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:4] == ["clipflow", "shard", "s3://b/p/filtered", "s3://b/p/shards"]
    assert json.loads(argv[argv.index("--config") + 1]) == {"samples_per_shard": 10000}


def test_deadline_backoff_and_ttl_are_settings_with_no_deadline_by_default():
    default = gpu_job()["spec"]
    assert "activeDeadlineSeconds" not in default, "a multi-day run must not be killed by default"
    assert default["backoffLimit"] == 0 and default["ttlSecondsAfterFinished"] == 600
    for template in TEMPLATES.values():  # nor by the template itself
        assert "activeDeadlineSeconds" not in yaml.safe_load(template.read_text())["spec"]
    policy = RayJobPolicy(rayjob_deadline_s=7 * 86400, rayjob_backoff_limit=3, rayjob_ttl_s=3600)
    spec = gpu_job(policy=policy)["spec"]
    assert (spec["activeDeadlineSeconds"], spec["backoffLimit"], spec["ttlSecondsAfterFinished"]) == (604800, 3, 3600)
    jsonschema.validate(gpu_job(policy=policy), kuberay_crd_schema(RAYJOB_CRD))
    with pytest.raises(ValueError, match="rayjob_backoff_limit=-1"):
        RayJobPolicy(rayjob_backoff_limit=-1)
    with pytest.raises(ValueError, match="data_workers=0"):
        DataCluster(data_workers=0)


def test_template_is_read_from_the_configmap_k8s_creates():
    class Core:
        def read_namespaced_config_map(self, name, namespace):
            assert (name, namespace) == ("clip-rayjob-template", pf.NAMESPACE)
            return type("CM", (), {"data": {"rayjob.yaml": TEMPLATES["gpu"].read_text()}})()

    assert load_template(pf.NAMESPACE, Core())["kind"] == "RayJob"


def test_rayjob_has_the_fields_kuberay_requires():
    spec = gpu_job()["spec"]
    assert spec["entrypoint"].startswith("clipflow train ")
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == pf.RAY_VERSION
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"] == "registry.example/clipflow:1.2.3"
    (workers,) = cluster["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 4
    container = workers["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 8
    assert workers["template"]["spec"]["serviceAccountName"] == pf.SERVICE_ACCOUNT
    assert workers["template"]["metadata"]["labels"][pf.STORAGE_ACCESS_LABEL[0]] == pf.STORAGE_ACCESS_LABEL[1]
    env = {e["name"]: e for e in container["env"]}
    assert env["AWS_ENDPOINT_URL"]["value"] == "http://s3:8333", "the run's endpoint replaces the template's"
    assert list(env).count("AWS_ENDPOINT_URL") == 1
    assert {"secretRef": {"name": pf.S3_SECRET}} in container["envFrom"]
    assert all(c["image"] == "registry.example/clipflow:1.2.3"
               for t in [spec["submitterPodTemplate"], cluster["headGroupSpec"]["template"], workers["template"]]
               for c in t["spec"]["containers"])


def test_entrypoint_round_trips_the_train_config():
    entry = gpu_job()["spec"]["entrypoint"]
    argv = shlex.split(entry)
    assert json.loads(argv[argv.index("--config") + 1]) == {"model": "ViT-B-32", "steps": 10}
    assert argv[argv.index("--parent-run-id") + 1] == "parent123"


def test_job_name_is_a_valid_short_dns_label():
    name = job_name("3F2A_very-long-Run.ID-" + "x" * 80)
    assert len(name) <= 40 and name == name.lower() and not name.endswith("-")
    assert all(c.isalnum() or c == "-" for c in name)


class FakeCustomObjects:
    """Plays KubeRay: each get returns the next status in the script."""

    def __init__(self, statuses):
        self.statuses, self.created, self.deleted = list(statuses), [], []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == ("ray.io", "v1", "rayjobs")
        self.created.append(body)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return {"metadata": {"name": name}, "status": status}

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.deleted.append(name)


def test_failed_rayjob_fails_the_step_with_the_jobs_message():
    api = FakeCustomObjects([
        {"jobDeploymentStatus": "Initializing"},
        {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
        {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED",
         "message": "Job entrypoint command failed with exit code 1: CUDA out of memory"},
    ])
    logs = []
    with pytest.raises(RayJobFailed, match="CUDA out of memory"):
        run_rayjob(gpu_job(), api=api, poll_seconds=0, log=logs.append)
    assert api.deleted == [api.created[0]["metadata"]["name"]], "the RayJob is cleaned up after failure"
    assert any("job=RUNNING" in line for line in logs), "progress is logged while waiting"


def test_succeeded_rayjob_returns_status_and_cleans_up():
    api = FakeCustomObjects([{"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
                             {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}])
    status = run_rayjob(gpu_job(), api=api, poll_seconds=0, log=lambda _: None)
    assert status["jobStatus"] == "SUCCEEDED" and len(api.deleted) == 1


def test_stuck_rayjob_times_out_clearly():
    api = FakeCustomObjects([{"jobDeploymentStatus": "Initializing"}])
    with pytest.raises(RayJobFailed, match="did not finish within"):
        run_rayjob(gpu_job(), api=api, poll_seconds=0.01, timeout_s=0.05, log=lambda _: None)

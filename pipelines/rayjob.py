"""Training on a cluster: a KubeRay `RayJob` created with the kubernetes client.

`build_rayjob` renders the object (validated in tests against KubeRay v1.7.0's CRD); `run_rayjob`
creates it, waits for a terminal status while logging progress, raises with the job's message when
it fails, and deletes it. `python -m pipelines.rayjob` prints the object with default settings (the
template k8s/ ships is this output).
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from pipelines import platform as pf

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
TERMINAL_JOB = {"SUCCEEDED", "FAILED", "STOPPED"}
TERMINAL_DEPLOYMENT = {"Complete", "Failed", "ValidationFailed"}
ACCESS_LABELS = {"clipflow/access-storage": "true", "clipflow/access-mlflow": "true"}


class RayJobFailed(RuntimeError):
    """The RayJob ended without success; the message carries KubeRay's reason and message."""


@dataclass
class RayJobSpec:
    """How the training cluster looks. GPU count, image and resources come from pipeline parameters."""

    image: str = pf.COMPONENT_IMAGE
    num_workers: int = 1
    gpus_per_worker: int = 1
    cpus_per_worker: int = 8
    memory_per_worker: str = "48Gi"
    head_cpus: int = 2
    head_memory: str = "8Gi"
    namespace: str = pf.NAMESPACE
    service_account: str = pf.SERVICE_ACCOUNT
    ttl_seconds_after_finished: int = 600
    active_deadline_seconds: int = 7 * 24 * 3600
    accelerator_node_selector: dict[str, str] = field(default_factory=dict)
    poll_seconds: float = 15.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "RayJobSpec":
        return cls(**json.loads(text)) if text else cls()


def job_name(run_id: str, prefix: str = "clip-train") -> str:
    """An RFC 1123 name short enough for the RayCluster and its pods that KubeRay derives from it."""
    suffix = re.sub(r"[^a-z0-9-]", "-", run_id.lower()).strip("-")
    return f"{prefix}-{suffix}"[:40].rstrip("-")


def _env(env: dict[str, str]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in sorted(env.items()) if v]
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        items.append({"name": key, "valueFrom": {"secretKeyRef": {"name": pf.S3_SECRET, "key": key}}})
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        items.append({"name": key, "valueFrom": {"secretKeyRef": {"name": pf.MLFLOW_SECRET, "key": key,
                                                                  "optional": True}}})
    return items


def _pod(spec: RayJobSpec, container: str, cpus: int, memory: str, gpus: int, env: dict[str, str],
         node_selector: dict[str, str] | None = None) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": str(cpus), "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    pod_spec: dict[str, Any] = {
        "serviceAccountName": spec.service_account,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": container,
            "image": spec.image,
            "env": _env(env),
            "resources": {"requests": dict(limits), "limits": dict(limits)},
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
        }],
        # NCCL and the data loader need a shared-memory segment larger than the container default.
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if node_selector:
        pod_spec["nodeSelector"] = dict(node_selector)
    return {"metadata": {"labels": dict(ACCESS_LABELS)}, "spec": pod_spec}


def build_rayjob(name: str, entrypoint: str, spec: RayJobSpec, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The RayJob object: a head group (driver) and one GPU worker group of `num_workers` pods."""
    env = dict(env or {})
    worker_group = {
        "groupName": "gpu-workers" if spec.gpus_per_worker else "cpu-workers",
        "replicas": spec.num_workers,
        "minReplicas": spec.num_workers,
        "maxReplicas": spec.num_workers,
        "rayStartParams": {},
        "template": _pod(spec, "ray-worker", spec.cpus_per_worker, spec.memory_per_worker, spec.gpus_per_worker,
                         env, spec.accelerator_node_selector),
    }
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": spec.namespace,
                     "labels": {"app.kubernetes.io/part-of": "clipflow", "app.kubernetes.io/component": "train"}},
        "spec": {
            "entrypoint": entrypoint,
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
            "activeDeadlineSeconds": spec.active_deadline_seconds,
            "backoffLimit": 0,  # Ray Train's FailureConfig restarts workers; a resubmission resumes from checkpoints
            "rayClusterSpec": {
                "rayVersion": pf.RAY_VERSION,
                "headGroupSpec": {
                    # The head schedules no training work: num-cpus 0 keeps workers on the GPU group.
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": _pod(spec, "ray-head", spec.head_cpus, spec.head_memory, 0, env),
                },
                "workerGroupSpecs": [worker_group],
            },
        },
    }


def training_entrypoint(manifest_uri: str, output_uri: str, train_config: dict[str, Any], tracking_uri: str,
                        experiment: str, parent_run_id: str) -> str:
    """The command the RayJob's driver runs: the same training entry point as local mode."""
    args = ["python", "-m", "components.train", "--manifest", manifest_uri, "--output", output_uri,
            "--config", json.dumps(train_config, sort_keys=True), "--experiment", experiment]
    if tracking_uri:
        args += ["--tracking-uri", tracking_uri]
    if parent_run_id:
        args += ["--parent-run-id", parent_run_id]
    return shlex.join(args)


def custom_objects_api() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def wait_for_rayjob(api: Any, name: str, namespace: str, poll_seconds: float, timeout_s: float | None = None,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Poll until the RayJob reaches a terminal status; logs every change of status."""
    start, last = time.monotonic(), None
    while True:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        status = obj.get("status") or {}
        job, deployment = status.get("jobStatus", ""), status.get("jobDeploymentStatus", "")
        now = (job, deployment)
        if now != last:
            elapsed = time.monotonic() - start
            log(f"[rayjob {name}] {elapsed:7.0f}s  deployment={deployment or '-'}  job={job or '-'}"
                + (f"  dashboard={status['dashboardURL']}" if status.get("dashboardURL") else ""))
            last = now
        if job in TERMINAL_JOB or deployment in TERMINAL_DEPLOYMENT:
            return status
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise RayJobFailed(f"RayJob {namespace}/{name} did not finish within {timeout_s:.0f}s "
                               f"(deployment={deployment}, job={job})")
        time.sleep(poll_seconds)


def run_rayjob(job: dict[str, Any], api: Any = None, timeout_s: float | None = None, poll_seconds: float = 15.0,
               cleanup: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Create the RayJob, wait for it, delete it; raise RayJobFailed with KubeRay's message on failure."""
    api = api or custom_objects_api()
    name, namespace = job["metadata"]["name"], job["metadata"]["namespace"]
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    log(f"[rayjob {name}] created in namespace {namespace}")
    try:
        status = wait_for_rayjob(api, name, namespace, poll_seconds, timeout_s, log)
    finally:
        if cleanup:
            try:
                api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
                log(f"[rayjob {name}] deleted")
            except Exception as exc:  # cleanup must not hide the job's own outcome
                log(f"[rayjob {name}] cleanup failed: {exc}")
    if status.get("jobStatus") != "SUCCEEDED":
        detail = status.get("message") or status.get("reason") or "no message from KubeRay"
        raise RayJobFailed(f"RayJob {namespace}/{name} ended with job={status.get('jobStatus') or '-'} "
                           f"deployment={status.get('jobDeploymentStatus') or '-'}: {detail}")
    return status


def run_training_rayjob(manifest_uri: str, output_uri: str, cfg: Any, ctx: Any, spec: RayJobSpec,
                        api: Any = None, timeout_s: float | None = None) -> dict[str, Any]:
    """The train step in cluster mode: same trainer, run as a RayJob; returns its train_result.json."""
    from components import storage

    env = {"AWS_ENDPOINT_URL": ctx.s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": ctx.s3_endpoint,
           "MLFLOW_TRACKING_URI": ctx.tracking_uri}
    entrypoint = training_entrypoint(manifest_uri, output_uri, dataclasses.asdict(cfg), ctx.tracking_uri,
                                     ctx.experiment, ctx.parent_run_id)
    job = build_rayjob(job_name(ctx.pipeline_run_id or "manual"), entrypoint, spec, env)
    run_rayjob(job, api=api, timeout_s=timeout_s, poll_seconds=spec.poll_seconds)
    return storage.read_json(storage.join(output_uri, "train_result.json"))


def main() -> None:
    spec = RayJobSpec()
    entrypoint = training_entrypoint("s3://BUCKET/PREFIX/shards/manifest.json", "s3://BUCKET/PREFIX/model",
                                     {"model": "ViT-B-32"}, pf.MLFLOW_TRACKING_URI, "clip-pretraining", "PARENT_RUN_ID")
    import yaml

    job = build_rayjob("clip-train-template", entrypoint, spec,
                       {"AWS_ENDPOINT_URL": pf.S3_ENDPOINT, "MLFLOW_S3_ENDPOINT_URL": pf.S3_ENDPOINT,
                        "MLFLOW_TRACKING_URI": pf.MLFLOW_TRACKING_URI})
    print(yaml.safe_dump(job, sort_keys=False), end="")


if __name__ == "__main__":
    main()

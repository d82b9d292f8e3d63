"""Training on a cluster: a KubeRay `RayJob` created with the kubernetes client.

k8s/ ships the RayJob skeleton as ConfigMap `clip-rayjob-template` (CPU workers in the base, GPU
workers in the prod-gpu overlay). `fill_rayjob` fills it in (name, entrypoint, image, worker count,
GPUs and resources, endpoints); `run_rayjob` creates the object, waits for a terminal status while
logging progress, raises with the job's message when it fails, and deletes it. Tests validate the
filled objects against KubeRay v1.7.0's CRD. `python -m pipelines.rayjob --template FILE` prints one.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import yaml

from pipelines import platform as pf

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
TEMPLATE_CONFIGMAP, TEMPLATE_KEY = "clip-rayjob-template", "rayjob.yaml"
TERMINAL_JOB = {"SUCCEEDED", "FAILED", "STOPPED"}
TERMINAL_DEPLOYMENT = {"Complete", "Failed", "ValidationFailed"}
GPU = "nvidia.com/gpu"


class RayJobFailed(RuntimeError):
    """The RayJob ended without success; the message carries KubeRay's reason and message."""


@dataclass
class RayJobSpec:
    """What the pipeline sets on the template; None keeps the template's value."""

    image: str = pf.COMPONENT_IMAGE
    num_workers: int = 1
    gpus_per_worker: int = 1
    cpus_per_worker: str | None = None
    memory_per_worker: str | None = None
    namespace: str = pf.NAMESPACE
    poll_seconds: float = 15.0
    timeout_s: float | None = None

    @classmethod
    def for_training(cls, cfg: Any, **kw: Any) -> "RayJobSpec":
        """The RayJob of a TrainConfig: its workers, their resources and image ("" = the component image, its
        CUDA build when training on GPUs)."""
        from components.common.kfp_component import IMAGE

        image = cfg.image or (pf.gpu_image(IMAGE) if cfg.use_gpu else IMAGE)
        return cls(image=image, num_workers=cfg.num_workers, gpus_per_worker=cfg.gpus_per_worker,
                   cpus_per_worker=cfg.cpus_per_worker or None, memory_per_worker=cfg.memory_per_worker or None, **kw)


def job_name(run_id: str, prefix: str = "clip-train") -> str:
    """An RFC 1123 name short enough for the RayCluster and its pods that KubeRay derives from it."""
    suffix = re.sub(r"[^a-z0-9-]", "-", run_id.lower()).strip("-")
    return f"{prefix}-{suffix}"[:40].rstrip("-")


def _pod_templates(job: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = job["spec"]
    if "submitterPodTemplate" in spec:
        yield spec["submitterPodTemplate"]
    yield spec["rayClusterSpec"]["headGroupSpec"]["template"]
    for group in spec["rayClusterSpec"].get("workerGroupSpecs", []):
        yield group["template"]


def _set_env(container: dict[str, Any], env: dict[str, str]) -> None:
    items = [e for e in container.get("env", []) if e["name"] not in env]
    container["env"] = items + [{"name": k, "value": v} for k, v in sorted(env.items()) if v]


def fill_rayjob(template: dict[str, Any], name: str, entrypoint: str, spec: RayJobSpec,
                env: dict[str, str] | None = None) -> dict[str, Any]:
    """The RayJob to create: the template with this run's name, command, image, workers and endpoints."""
    job = copy.deepcopy(template)
    job["metadata"] = {**job.get("metadata", {}), "name": name, "namespace": spec.namespace}
    job["spec"]["entrypoint"] = entrypoint
    for pod in _pod_templates(job):
        for container in pod["spec"]["containers"]:
            container["image"] = spec.image
    for pod in [job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]] + [
            g["template"] for g in job["spec"]["rayClusterSpec"].get("workerGroupSpecs", [])]:
        for container in pod["spec"]["containers"]:
            _set_env(container, env or {})
    groups = job["spec"]["rayClusterSpec"].get("workerGroupSpecs", [])
    if len(groups) != 1:
        raise ValueError(f"the RayJob template must have exactly one worker group, found {len(groups)}")
    group = groups[0]
    group["replicas"] = group["minReplicas"] = group["maxReplicas"] = spec.num_workers
    worker = group["template"]["spec"]["containers"][0]
    resources = worker.setdefault("resources", {})
    for kind in ("requests", "limits"):
        values = resources.setdefault(kind, {})
        if spec.gpus_per_worker:
            values[GPU] = spec.gpus_per_worker
        else:
            values.pop(GPU, None)
        if spec.cpus_per_worker:
            values["cpu"] = spec.cpus_per_worker
        if spec.memory_per_worker:
            values["memory"] = spec.memory_per_worker
    return job


def load_template(namespace: str = pf.NAMESPACE, core_api: Any = None) -> dict[str, Any]:
    """The RayJob skeleton from the ConfigMap that `kubectl apply -k k8s/` created."""
    if core_api is None:
        from kubernetes import client

        _load_kube_config()
        core_api = client.CoreV1Api()
    try:
        cm = core_api.read_namespaced_config_map(TEMPLATE_CONFIGMAP, namespace)
    except Exception as exc:
        raise RuntimeError(f"cannot read ConfigMap {namespace}/{TEMPLATE_CONFIGMAP} (apply k8s/ first): {exc}") from exc
    return yaml.safe_load(cm.data[TEMPLATE_KEY])


def training_entrypoint(manifest_uri: str, output_uri: str, train_config: dict[str, Any], tracking_uri: str,
                        experiment: str, parent_run_id: str) -> str:
    """The command the RayJob's driver runs: the same training entry point as local mode."""
    args = ["clipflow", "train", manifest_uri, output_uri, "--config", json.dumps(train_config, sort_keys=True),
            "--experiment", experiment]
    if tracking_uri:
        args += ["--tracking-uri", tracking_uri]
    if parent_run_id:
        args += ["--parent-run-id", parent_run_id]
    return shlex.join(args)


def _load_kube_config() -> None:
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()


def custom_objects_api() -> Any:
    from kubernetes import client

    _load_kube_config()
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


def run_training_rayjob(manifest_uri: str, output_uri: str, cfg: Any, ctx: Any, spec: RayJobSpec | None = None,
                        api: Any = None, core_api: Any = None) -> dict[str, Any]:
    """The train step in cluster mode: the same trainer, run as a RayJob; returns its train_result.json."""
    from components.common import config, storage

    spec = spec or RayJobSpec.for_training(cfg)

    env = {"AWS_ENDPOINT_URL": ctx.s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": ctx.s3_endpoint,
           "MLFLOW_TRACKING_URI": ctx.tracking_uri}
    entrypoint = training_entrypoint(manifest_uri, output_uri, config.to_dict(cfg), ctx.tracking_uri,
                                     ctx.experiment, ctx.parent_run_id)
    job = fill_rayjob(load_template(spec.namespace, core_api), job_name(ctx.pipeline_run_id or "manual"),
                      entrypoint, spec, env)
    run_rayjob(job, api=api, timeout_s=spec.timeout_s, poll_seconds=spec.poll_seconds)
    return storage.read_json(storage.join(output_uri, "train_result.json"))


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="print the RayJob the train step would create")
    parser.add_argument("--template", required=True, help="a RayJob template file from k8s/")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--gpus-per-worker", type=int, default=1)
    args = parser.parse_args(argv)
    template = yaml.safe_load(open(args.template))
    entrypoint = training_entrypoint("s3://BUCKET/RUN/shards/manifest.json", "s3://BUCKET/RUN/model",
                                     {"model_config": "ViT-B-32"}, pf.MLFLOW_TRACKING_URI, pf.PIPELINE_NAME, "PARENT")
    job = fill_rayjob(template, "clip-train-example", entrypoint,
                      RayJobSpec(num_workers=args.workers, gpus_per_worker=args.gpus_per_worker),
                      {"AWS_ENDPOINT_URL": pf.S3_ENDPOINT, "MLFLOW_TRACKING_URI": pf.MLFLOW_TRACKING_URI})
    print(yaml.safe_dump(job, sort_keys=False), end="")


if __name__ == "__main__":
    main()

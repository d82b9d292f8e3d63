"""The stages on a cluster: one KubeRay `RayJob` launcher for filter, shard and train.

k8s/ ships the RayJob skeleton as ConfigMap `clip-rayjob-template` (CPU workers in the base, GPU
workers in the prod-gpu overlay). `fill_rayjob` fills it in (name, entrypoint, image, worker count,
GPUs and resources, endpoints, deadline / backoff / TTL); `run_rayjob` creates the object, waits for a
terminal status while logging progress, raises with the job's message when it fails, and deletes it.
`run_stage_rayjob` is what a stage's step calls: the stage's own `clipflow` command as the RayJob's
entrypoint, so a stage runs the same code on a laptop's Ray and on the RayJob's cluster (which it joins
through the RAY_ADDRESS KubeRay sets). Tests validate the filled objects against KubeRay v1.7.0's CRD.
`python -m components.common.rayjob --template FILE` prints one.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import yaml

from components.common import platform as pf

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
TEMPLATE_CONFIGMAP, TEMPLATE_KEY = "clip-rayjob-template", "rayjob.yaml"
TERMINAL_JOB = {"SUCCEEDED", "FAILED", "STOPPED"}
TERMINAL_DEPLOYMENT = {"Complete", "Failed", "ValidationFailed"}
GPU = "nvidia.com/gpu"


LAUNCHERS = ("auto", "local", "rayjob")


def resolve_launcher(launcher: str) -> str:
    """'auto' is a RayJob inside Kubernetes and a local Ray elsewhere."""
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher={launcher!r}: expected one of {LAUNCHERS}")
    if launcher == "auto":
        return "rayjob" if os.environ.get("KUBERNETES_SERVICE_HOST") else "local"
    return launcher


@dataclass
class RayJobPolicy:
    """How long a stage's RayJob may run, how often KubeRay retries it, and when its cluster goes."""

    rayjob_deadline_s: int = 0  # the RayJob's activeDeadlineSeconds; 0 = no deadline, so a multi-day run is not
                                # killed (stop a run from KFP; its RayJob is deleted with it)
    rayjob_backoff_limit: int = 0  # the RayJob's backoffLimit: resubmissions of a failed job (each resumes: training
                                   # from its latest checkpoint, shard from its completed shards)
    rayjob_ttl_s: int = 600  # ttlSecondsAfterFinished: the finished job's Ray cluster is kept this long (its logs)

    def __post_init__(self) -> None:
        for name in ("rayjob_deadline_s", "rayjob_backoff_limit", "rayjob_ttl_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")


@dataclass
class DataCluster:
    """Where a data stage (filter, shard) runs: a local Ray, or a RayJob of CPU workers on Kubernetes."""

    launcher: str = "auto"  # auto (a KubeRay RayJob inside Kubernetes, a local Ray elsewhere) | local | rayjob
    data_workers: int = 4  # filter / shard RayJob: Ray worker pods
    data_cpus_per_worker: str = "8"  # filter / shard RayJob: CPU request and limit of a worker pod, in cores
    data_memory_per_worker: str = "32Gi"  # filter / shard RayJob: memory request and limit of a worker pod (a
                                          # Kubernetes quantity); the object store takes about 30 % of it
    rayjob: RayJobPolicy = field(default_factory=RayJobPolicy)

    def __post_init__(self) -> None:
        resolve_launcher(self.launcher)
        if self.data_workers < 1:
            raise ValueError(f"data_workers={self.data_workers}: must be >= 1")

    def resolved_launcher(self) -> str:
        return resolve_launcher(self.launcher)

    def spec(self, **kw: Any) -> "RayJobSpec":
        """The RayJob of a data stage: CPU workers of the component image."""
        from components.common.kfp_component import IMAGE

        return RayJobSpec(image=IMAGE, num_workers=self.data_workers, gpus_per_worker=0,
                          cpus_per_worker=self.data_cpus_per_worker or None,
                          memory_per_worker=self.data_memory_per_worker or None, policy=self.rayjob, **kw)


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
    timeout_s: float | None = None  # the launcher stops waiting after this long (None = as long as the job runs)
    policy: RayJobPolicy = field(default_factory=RayJobPolicy)

    @classmethod
    def for_training(cls, cfg: Any, **kw: Any) -> "RayJobSpec":
        """The RayJob of a TrainConfig: its workers, their resources and image ("" = the component image, its
        CUDA build when training on GPUs)."""
        from components.common.kfp_component import IMAGE

        image = cfg.image or (pf.gpu_image(IMAGE) if cfg.use_gpu else IMAGE)
        return cls(image=image, num_workers=cfg.num_workers, gpus_per_worker=cfg.gpus_per_worker,
                   cpus_per_worker=cfg.cpus_per_worker or None, memory_per_worker=cfg.memory_per_worker or None,
                   policy=cfg.rayjob, **kw)


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
    job["spec"]["backoffLimit"] = spec.policy.rayjob_backoff_limit
    job["spec"]["ttlSecondsAfterFinished"] = spec.policy.rayjob_ttl_s
    if spec.policy.rayjob_deadline_s:
        job["spec"]["activeDeadlineSeconds"] = spec.policy.rayjob_deadline_s
    else:
        job["spec"].pop("activeDeadlineSeconds", None)
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


def stage_entrypoint(command: str, positionals: list[str], settings: dict[str, Any], tracking_uri: str = "",
                     experiment: str = "", parent_run_id: str = "") -> str:
    """The command the RayJob's driver runs: the stage's `clipflow` command, as run locally."""
    args = ["clipflow", command, *positionals, "--config", json.dumps(settings, sort_keys=True)]
    if experiment:
        args += ["--experiment", experiment]
    if tracking_uri:
        args += ["--tracking-uri", tracking_uri]
    if parent_run_id:
        args += ["--parent-run-id", parent_run_id]
    return shlex.join(args)


def training_entrypoint(manifest_uri: str, output_uri: str, train_config: dict[str, Any], tracking_uri: str,
                        experiment: str, parent_run_id: str) -> str:
    """The train stage's entrypoint (it logs its own MLflow run, nested under the pipeline's)."""
    return stage_entrypoint("train", [manifest_uri, output_uri], train_config, tracking_uri, experiment,
                            parent_run_id)


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


def run_stage_rayjob(stage: str, entrypoint: str, spec: RayJobSpec, ctx: Any, api: Any = None,
                     core_api: Any = None) -> dict[str, Any]:
    """Run one stage's command as a RayJob named after the stage and the pipeline run; waits for it."""
    env = {"AWS_ENDPOINT_URL": ctx.s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": ctx.s3_endpoint,
           "MLFLOW_TRACKING_URI": ctx.tracking_uri}
    name = job_name(ctx.pipeline_run_id or "manual", f"clip-{stage}")
    job = fill_rayjob(load_template(spec.namespace, core_api), name, entrypoint, spec, env)
    job["metadata"].setdefault("labels", {})["app.kubernetes.io/component"] = stage
    return run_rayjob(job, api=api, timeout_s=spec.timeout_s, poll_seconds=spec.poll_seconds)


def run_training_rayjob(manifest_uri: str, output_uri: str, cfg: Any, ctx: Any, spec: RayJobSpec | None = None,
                        api: Any = None, core_api: Any = None) -> dict[str, Any]:
    """The train step in cluster mode: the same trainer, run as a RayJob; returns its train_result.json."""
    from components.common import config, storage

    entrypoint = training_entrypoint(manifest_uri, output_uri, config.to_dict(cfg), ctx.tracking_uri,
                                     ctx.experiment, ctx.parent_run_id)
    run_stage_rayjob("train", entrypoint, spec or RayJobSpec.for_training(cfg), ctx, api, core_api)
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

"""Shared by the k8s/RayJob test modules (test_k8s.py, test_k8s_policy.py, test_rayjob.py).

Everything is read from inside the repository: k8s/, and the KubeRay v1.7.0 RayJob CRD vendored in
tests/data/kuberay-v1.7.0 (see its README.md). A missing CRD fails the test that needs it, never
skips it. The `rendered` fixture renders every kustomize target with `kubectl kustomize`.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from components.common import platform

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
KUBERAY_CRDS = Path(__file__).resolve().parent / "data" / "kuberay-v1.7.0"
RAYJOB_CRD = "ray.io_rayjobs.yaml"

OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
TARGETS = ["k8s", "k8s/base"] + [f"k8s/overlays/{name}" for name in OVERLAYS]
RAYJOB_TEMPLATES = {
    "base": K8S / "base" / "rayjob" / "rayjob-template.yaml",
    "prod-gpu": K8S / "overlays" / "prod-gpu" / "rayjob-template-gpu.yaml",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet", "Pod", "CronJob"}


@functools.lru_cache(maxsize=None)
def kuberay_crd_schema(kind_file: str = RAYJOB_CRD) -> dict:
    """openAPIV3Schema of the v1 version of a vendored KubeRay CRD (cached: do not mutate it)."""
    path = KUBERAY_CRDS / kind_file
    assert path.is_file(), (
        f"KubeRay CRD not found at {path}: it is vendored in the repository "
        "(tests/data/kuberay-v1.7.0, see its README.md); restore it from git")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    assert shutil.which("kubectl"), "kubectl is needed to render k8s/ (kubectl kustomize)"
    out = {}
    for target in TARGETS:
        proc = subprocess.run(["kubectl", "kustomize", target], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0, f"kubectl kustomize {target} failed:\n{proc.stderr}"
        out[target] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    return out


def find(objs, kind, name=None, namespace=None):
    return [o for o in objs if o["kind"] == kind
            and (name is None or o["metadata"]["name"] == name)
            and (namespace is None or o["metadata"].get("namespace") == namespace)]


def one(objs, kind, name, namespace=platform.NAMESPACE):
    hits = find(objs, kind, name, namespace)
    assert len(hits) == 1, f"expected exactly one {kind} {namespace}/{name}, found {len(hits)}"
    return hits[0]


def pod_specs(objs) -> list[tuple[str, dict, dict]]:
    """(owner, pod metadata, pod spec) of every workload in a render."""
    out = []
    for o in objs:
        if o["kind"] not in WORKLOAD_KINDS:
            continue
        tpl = o["spec"]["jobTemplate"]["spec"]["template"] if o["kind"] == "CronJob" else (
            o if o["kind"] == "Pod" else o["spec"]["template"])
        out.append((f"{o['kind']}/{o['metadata']['name']}", tpl.get("metadata", {}), tpl["spec"]))
    return out


def rayjob_pod_specs(rayjob: dict) -> list[tuple[str, dict, dict]]:
    spec = rayjob["spec"]
    cluster = spec["rayClusterSpec"]
    tpls = [("head", cluster["headGroupSpec"]["template"])]
    tpls += [(f"worker/{g['groupName']}", g["template"]) for g in cluster["workerGroupSpecs"]]
    if "submitterPodTemplate" in spec:
        tpls.append(("submitter", spec["submitterPodTemplate"]))
    return [(f"RayJob {name}", t.get("metadata", {}), t["spec"]) for name, t in tpls]


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def env_value(container: dict, name: str):
    values = [e.get("value") for e in container.get("env", []) if e["name"] == name]
    assert values, f"container {container['name']} sets no env {name}"
    return values[0]


def load_templates() -> dict[str, dict]:
    return {name: yaml.safe_load(path.read_text()) for name, path in RAYJOB_TEMPLATES.items()}

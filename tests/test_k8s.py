"""k8s/, the RayJob templates and the Dockerfile: render, validate, check policy and shared names.

Offline: `kubectl kustomize` renders, `kubernetes-validate` holds the Kubernetes schemas, the KubeRay
CRDs come from ../shared/schemas (missing = failure, not a skip).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pipelines import platform

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
RAYJOB_CRD = SHARED / "schemas" / "kuberay-v1.7.0" / "ray.io_rayjobs.yaml"
K8S_VERSION = "1.31.0"  # oldest version we support; kubernetes-validate bundles 1.25 ... 1.37

OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
TARGETS = ["k8s", "k8s/base"] + [f"k8s/overlays/{name}" for name in OVERLAYS]
DEV_TARGETS = {"k8s", "k8s/overlays/dev"}  # the only renders allowed to carry credentials
RAYJOB_TEMPLATES = {
    "base": K8S / "base" / "rayjob" / "rayjob-template.yaml",
    "prod-gpu": K8S / "overlays" / "prod-gpu" / "rayjob-template-gpu.yaml",
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet", "Pod", "CronJob"}
ACCESS_KEY, ACCESS_VALUE = platform.STORAGE_ACCESS_LABEL


# --------------------------------------------------------------------------- fixtures and helpers
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


@pytest.fixture(scope="module")
def rayjob_schema() -> dict:
    assert RAYJOB_CRD.is_file(), (
        f"KubeRay CRD not found at {RAYJOB_CRD}: the shared schemas must sit beside the repository "
        "(../shared/schemas/kuberay-v1.7.0)")
    crd = yaml.load(RAYJOB_CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return v1["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def rayjob_validator(rayjob_schema):
    cls = jsonschema.validators.validator_for(rayjob_schema)
    return cls(rayjob_schema)


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


# --------------------------------------------------------------------------- rendering and schemas
def test_every_target_renders_and_root_is_dev(rendered):
    assert {"dev", "prod-gpu"} <= set(OVERLAYS)
    for target, objs in rendered.items():
        assert len(objs) > 10, f"{target} rendered only {len(objs)} objects"
    key = lambda o: (o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"])  # noqa: E731
    assert sorted(rendered["k8s"], key=key) == sorted(rendered["k8s/overlays/dev"], key=key)


def test_every_object_validates_against_kubernetes_schema_strict(rendered):
    seen = set()
    for target, objs in rendered.items():
        for obj in objs:
            blob = json.dumps(obj, sort_keys=True)
            if blob in seen:
                continue
            seen.add(blob)
            what = f"{target}: {obj['kind']} {obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{what}: {'.'.join(map(str, e.path))}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                pytest.fail(f"{what}: no schema ({e.message}); CRs belong in templates, not in k8s/")


def test_strict_validation_rejects_a_typo(rendered):
    deployment = copy.deepcopy(one(rendered["k8s"], "Deployment", "mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


# --------------------------------------------------------------------------- policy
def all_pod_specs(rendered):
    for target, objs in rendered.items():
        for owner, meta, spec in pod_specs(objs):
            yield f"{target}: {owner}", meta, spec
    for name, tpl in load_templates().items():
        for owner, meta, spec in rayjob_pod_specs(tpl):
            yield f"template {name}: {owner}", meta, spec


def test_every_container_is_non_root_unprivileged_and_bounded(rendered):
    checked = 0
    for owner, _, spec in all_pod_specs(rendered):
        pod_sc = spec.get("securityContext", {})
        for c in containers(spec):
            what = f"{owner} container {c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, f"{what}: runAsNonRoot"
            uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
            assert isinstance(uid, int) and uid > 0, f"{what}: runAsUser must be a non-zero uid"
            assert sc.get("allowPrivilegeEscalation") is False, f"{what}: allowPrivilegeEscalation"
            assert sc.get("privileged", False) is False, f"{what}: privileged"
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{what}: capabilities.drop"
            assert not sc.get("capabilities", {}).get("add"), f"{what}: capabilities.add"
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", f"{what}: seccompProfile"
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    assert r in res.get(kind, {}), f"{what}: resources.{kind}.{r} missing"
            checked += 1
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), f"{owner}: host namespaces"
        for vol in spec.get("volumes", []):
            assert "hostPath" not in vol, f"{owner}: hostPath volume {vol['name']}"
    assert checked >= 30


def test_images_are_pinned(rendered):
    images = {(owner, c["image"]) for owner, _, spec in all_pod_specs(rendered) for c in containers(spec)}
    assert images
    for owner, image in images:
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{owner}: image {image} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{owner}: image {image} is not a version tag"


def test_component_image_is_one_configurable_name(rendered):
    base = yaml.safe_load((K8S / "base" / "kustomization.yaml").read_text())
    (entry,) = base["images"]
    assert f"{entry['newName']}:{entry['newTag']}" == platform.COMPONENT_IMAGE
    repo = platform.COMPONENT_IMAGE.rpartition(":")[0]
    for target, objs in rendered.items():
        mlflow = one(objs, "Deployment", "mlflow")
        assert mlflow["spec"]["template"]["spec"]["containers"][0]["image"] == platform.COMPONENT_IMAGE
        for owner, _, spec in pod_specs(objs):
            for c in containers(spec):
                if c["image"].startswith(repo + ":"):
                    assert c["image"] == platform.COMPONENT_IMAGE, f"{target}: {owner}"
    for name, tpl in load_templates().items():
        for owner, _, spec in rayjob_pod_specs(tpl):
            assert {c["image"] for c in containers(spec)} == {platform.COMPONENT_IMAGE}, f"{name} {owner}"


def test_kustomize_images_edit_changes_the_component_image_everywhere(tmp_path):
    overlay = tmp_path / "overlay"
    shutil.copytree(K8S, tmp_path / "k8s")
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": ["../k8s/overlays/prod-gpu"],
        "images": [{"name": platform.COMPONENT_IMAGE.rpartition(":")[0],
                    "newName": "registry.example.com/ml/clipflow", "newTag": "9.9.9"}]}))
    proc = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    objs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    image = one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image == "registry.example.com/ml/clipflow:9.9.9"
    workload_images = {c["image"] for _, _, spec in pod_specs(objs) for c in containers(spec)}
    assert platform.COMPONENT_IMAGE not in workload_images


SECRETISH = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|ACCESS_KEY|API_KEY|PRIVATE_KEY|CREDENTIAL", re.I)


def test_no_plaintext_credentials_outside_dev(rendered):
    dev_literals = set()
    for target in DEV_TARGETS:
        for secret in find(rendered[target], "Secret"):
            assert secret["metadata"]["labels"].get("clipflow/dev-only-credentials") == "true"
            dev_literals |= {v for v in secret.get("data", {}).values()}
    assert dev_literals, "the dev overlay must generate its dev-only Secrets"
    for target, objs in rendered.items():
        if target not in DEV_TARGETS:
            assert not find(objs, "Secret"), f"{target} must not carry Secrets (create them, docs/deploy.md)"
            text = json.dumps(objs)
            assert not any(lit in text for lit in dev_literals), f"{target} leaks a dev literal"
            assert "dev-only" not in text, f"{target} mentions a dev-only value"
    for owner, _, spec in all_pod_specs(rendered):
        for c in containers(spec):
            for e in c.get("env", []):
                if SECRETISH.search(e["name"]):
                    assert "value" not in e, f"{owner}: env {e['name']} is a plaintext value; use a Secret"
    for cm in (o for objs in rendered.values() for o in find(objs, "ConfigMap")):
        for key, text in cm.get("data", {}).items():
            assert not re.search(r"(password|secret)\s*[:=]\s*\S", text, re.I), f"ConfigMap {key}"


def test_rbac_is_namespaced_and_grants_rayjobs(rendered):
    for target, objs in rendered.items():
        assert not find(objs, "ClusterRole") and not find(objs, "ClusterRoleBinding"), target
        for role in find(objs, "Role"):
            for rule in role["rules"]:
                for field in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule.get(field, []), f"{target}: Role {role['metadata']['name']}: {field}"
                assert not rule.get("nonResourceURLs"), target
        role = one(objs, "Role", "clip-rayjob-launcher")
        granted = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
                   for r in rule["resources"] for v in rule["verbs"] if not rule.get("resourceNames")}
        for resource in ("rayjobs", "rayclusters"):
            for verb in ("create", "get", "list", "watch", "delete", "patch"):
                assert ("ray.io", resource, verb) in granted, f"{target}: {verb} {resource}"
        binding = one(objs, "RoleBinding", "clip-rayjob-launcher")
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": "clip-rayjob-launcher"}
        subjects = {(s["kind"], s["namespace"], s["name"]) for s in binding["subjects"]}
        assert subjects == {("ServiceAccount", ns, platform.SERVICE_ACCOUNT)
                            for ns in (platform.NAMESPACE, platform.KFP_NAMESPACE)}
        for ns in (platform.NAMESPACE, platform.KFP_NAMESPACE):
            one(objs, "ServiceAccount", platform.SERVICE_ACCOUNT, ns)
        kfp = one(objs, "RoleBinding", "clip-pipeline-runner-kfp", platform.KFP_NAMESPACE)
        assert kfp["roleRef"]["kind"] == "Role"


# --------------------------------------------------------------------------- network policies
def selector_matches(selector: dict, labels: dict) -> bool:
    assert not selector.get("matchExpressions"), "this check understands matchLabels only"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def ingress_allowed(policies, target_ns, target_labels, source_ns, source_labels, port) -> bool:
    """Kubernetes' NetworkPolicy ingress semantics for pod-to-pod traffic (matchLabels only)."""
    selecting = [p for p in policies if p["metadata"]["namespace"] == target_ns
                 and selector_matches(p["spec"]["podSelector"], target_labels)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    ns_labels = {"kubernetes.io/metadata.name": source_ns}
    for policy in selecting:
        for rule in policy["spec"].get("ingress", []):
            if rule.get("ports") and not any(p.get("port") == port for p in rule["ports"]):
                continue
            for peer in rule.get("from", []):
                if "ipBlock" in peer:
                    continue
                ns_ok = (selector_matches(peer["namespaceSelector"], ns_labels) if "namespaceSelector" in peer
                         else source_ns == target_ns)
                if ns_ok and selector_matches(peer.get("podSelector", {}), source_labels):
                    return True
    return False


def test_network_policies_admit_only_labelled_pods(rendered):
    ns, kfp = platform.NAMESPACE, platform.KFP_NAMESPACE
    access = {ACCESS_KEY: ACCESS_VALUE}
    for target, objs in rendered.items():
        pols = find(objs, "NetworkPolicy")
        labels = {name: one(objs, kind, name)["spec"]["template"]["metadata"]["labels"]
                  for kind, name in [("Deployment", "mlflow"), ("Deployment", "seaweedfs"),
                                     ("StatefulSet", "postgres")]}
        mlflow, s3, pg = labels["mlflow"], labels["seaweedfs"], labels["postgres"]
        s3_port = urlparse(platform.S3_ENDPOINT).port
        mlflow_port = urlparse(platform.MLFLOW_TRACKING_URI).port
        for dst, port in [(mlflow, mlflow_port), (s3, s3_port)]:
            assert ingress_allowed(pols, ns, dst, ns, access, port), target
            assert ingress_allowed(pols, ns, dst, kfp, access, port), target
            assert not ingress_allowed(pols, ns, dst, ns, {"app": "other"}, port), target
            assert not ingress_allowed(pols, ns, dst, kfp, {}, port), target
            assert not ingress_allowed(pols, ns, dst, "default", access, port), target
        assert ingress_allowed(pols, ns, s3, ns, mlflow, s3_port), target
        assert ingress_allowed(pols, ns, pg, ns, mlflow, 5432), target
        assert not ingress_allowed(pols, ns, pg, ns, access, 5432), target
        assert not ingress_allowed(pols, ns, pg, kfp, access, 5432), target
        # Ray pods and the bucket job carry the label.
        job = one(objs, "Job", "clip-bucket-bootstrap")
        assert selector_matches({"matchLabels": access}, job["spec"]["template"]["metadata"]["labels"])
    for name, tpl in load_templates().items():
        for owner, meta, _ in rayjob_pod_specs(tpl):
            if owner.endswith("submitter"):
                continue  # talks only to the Ray dashboard
            assert meta["labels"].get(ACCESS_KEY) == ACCESS_VALUE, f"{name} {owner}"


# --------------------------------------------------------------------------- names shared with the pipeline
def test_names_match_pipelines_platform(rendered):
    s3 = urlparse(platform.S3_ENDPOINT)
    tracking = urlparse(platform.MLFLOW_TRACKING_URI)
    for target, objs in rendered.items():
        one(objs, "Namespace", platform.NAMESPACE, None)
        for url in (s3, tracking):
            service, svc_ns = url.hostname.split(".")[:2]
            assert svc_ns == platform.NAMESPACE
            svc = one(objs, "Service", service, svc_ns)
            assert url.port in [p["port"] for p in svc["spec"]["ports"]], f"{target}: {service} port"
        job = one(objs, "Job", "clip-bucket-bootstrap")["spec"]["template"]["spec"]["containers"][0]
        assert env_value(job, "BUCKET") == platform.BUCKET
        assert env_value(job, "AWS_ENDPOINT_URL") == platform.S3_ENDPOINT
        mlflow = one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
        assert env_value(mlflow, "MLFLOW_S3_ENDPOINT_URL") == platform.S3_ENDPOINT
        assert env_value(mlflow, "BUCKET") == platform.BUCKET
        script = mlflow["args"][0]
        assert '--artifacts-destination "s3://${BUCKET}/mlflow"' in script
        # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the image installs psycopg2.
        uris = re.findall(r"postgresql[+\w]*://\S+", script)
        assert len(uris) == 2 and all(u.startswith("postgresql+psycopg2://") for u in uris), uris
        hosts = env_value(mlflow, "ALLOWED_HOSTS").split(",")
        fqdn = tracking.hostname
        short, nsd = fqdn.split(".")[0], ".".join(fqdn.split(".")[:2])
        for host in (short, nsd, fqdn):
            assert f"{host}:{tracking.port}" in hosts and host in hosts, f"{target}: allowed host {host}"
        assert "localhost:5000" in hosts
        cm = one(objs, "ConfigMap", "clip-rayjob-template")
        assert yaml.safe_load(cm["data"]["rayjob.yaml"])["kind"] == "RayJob"


def test_secret_references_resolve_to_dev_secrets(rendered):
    objs = rendered["k8s"]
    secrets = {(s["metadata"]["namespace"], s["metadata"]["name"]): set(s["data"]) for s in find(objs, "Secret")}
    for ns in (platform.NAMESPACE, platform.KFP_NAMESPACE):
        assert secrets[(ns, platform.S3_SECRET)] == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
        assert secrets[(ns, platform.MLFLOW_SECRET)] == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    refs = [(platform.NAMESPACE, owner, spec) for owner, _, spec in pod_specs(objs)]
    refs += [(tpl["metadata"]["namespace"], owner, spec) for tpl in load_templates().values()
             for owner, _, spec in rayjob_pod_specs(tpl)]
    seen = set()
    for ns, owner, spec in refs:
        for c in containers(spec):
            for src in c.get("envFrom", []):
                name = src["secretRef"]["name"]
                assert (ns, name) in secrets, f"{owner}: Secret {ns}/{name} does not exist"
                seen.add(name)
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets.get((ns, ref["name"]), set()), f"{owner}: {ref}"
                    seen.add(ref["name"])
    assert {platform.S3_SECRET, platform.MLFLOW_SECRET} <= seen


# --------------------------------------------------------------------------- RayJob templates vs KubeRay CRD
def unknown_fields(obj, schema, path="") -> list[str]:
    """Fields the API server would silently prune: not in the schema's properties."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    out = []
    if isinstance(obj, dict) and "properties" in schema:
        for key, value in obj.items():
            if key not in schema["properties"]:
                out.append(f"{path}.{key}")
            else:
                out += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            out += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


def check_rayjob(rayjob: dict, validator) -> None:
    errors = sorted(validator.iter_errors(rayjob), key=lambda e: list(e.path))
    if errors:
        raise jsonschema.ValidationError("; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5]))
    extra = unknown_fields(rayjob, validator.schema)
    assert not extra, f"fields unknown to the RayJob CRD: {extra}"


@pytest.mark.parametrize("name", sorted(RAYJOB_TEMPLATES))
def test_rayjob_template_validates_against_kuberay_crd(name, rayjob_validator):
    tpl = load_templates()[name]
    check_rayjob(tpl, rayjob_validator)
    assert tpl["metadata"]["namespace"] == platform.NAMESPACE
    assert tpl["spec"]["rayClusterSpec"]["rayVersion"] == platform.RAY_VERSION
    for owner, _, spec in rayjob_pod_specs(tpl):
        assert spec["serviceAccountName"] == platform.SERVICE_ACCOUNT, owner
        if owner.endswith("submitter"):
            continue
        (c,) = spec["containers"]
        assert env_value(c, "AWS_ENDPOINT_URL") == platform.S3_ENDPOINT
        assert env_value(c, "MLFLOW_TRACKING_URI") == platform.MLFLOW_TRACKING_URI
        assert {s["secretRef"]["name"] for s in c["envFrom"]} == {platform.S3_SECRET, platform.MLFLOW_SECRET}
    for group in tpl["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    gpus = [g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")
            for g in tpl["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    assert all(gpus) if name == "prod-gpu" else not any(gpus)


def test_rendered_configmaps_carry_the_validated_templates(rendered, rayjob_validator):
    expected = {"k8s/overlays/prod-gpu": "prod-gpu"}
    for target, objs in rendered.items():
        cm = one(objs, "ConfigMap", "clip-rayjob-template")
        text = cm["data"]["rayjob.yaml"]
        assert text == RAYJOB_TEMPLATES[expected.get(target, "base")].read_text(), target
        check_rayjob(yaml.safe_load(text), rayjob_validator)


def test_rayjob_check_rejects_broken_templates(rayjob_validator):
    tpl = load_templates()["base"]
    missing = copy.deepcopy(tpl)
    del missing["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    typo = copy.deepcopy(tpl)
    typo["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    wrong_type = copy.deepcopy(tpl)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="groupName"):
        check_rayjob(missing, rayjob_validator)
    with pytest.raises(AssertionError, match="rayStartParam"):
        check_rayjob(typo, rayjob_validator)
    with pytest.raises(jsonschema.ValidationError, match="integer"):
        check_rayjob(wrong_type, rayjob_validator)


# --------------------------------------------------------------------------- the component image
def dockerfile_stages() -> tuple[dict[str, str], list[tuple[str, list[str]]]]:
    text = (REPO / "Dockerfile").read_text()
    lines = re.sub(r"\\\n", " ", text).splitlines()
    args, stages = {}, []
    for line in (ln.strip() for ln in lines):
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        if instr.upper() == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args.setdefault(key.strip(), value.strip())
        if instr.upper() == "FROM":
            stages.append((rest, []))
        elif stages:
            stages[-1][1].append(line)
    return args, stages


def test_dockerfile_is_multistage_pinned_and_non_root():
    args, stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage build expected"
    for source, _ in stages:
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], source.split()[0])
        if image in {s.split()[-1] for s, _ in stages if " AS " in s.upper()}:
            continue  # FROM an earlier stage
        repo, _, tag = image.rpartition(":")
        assert repo and tag != "latest" and re.fullmatch(r"\d+\.\d+\.\d+-slim-\w+", tag), image
    final = stages[-1][1]
    users = [ln.split()[1] for ln in final if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"0", "root"}, "final stage must run as non-root"
    assert args["RAY_VERSION"] == platform.RAY_VERSION
    assert args["TORCH_VARIANT"] == "cpu"
    build = " ".join(ln for _, body in stages for ln in body)
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in build and "torch==${TORCH_VERSION}" in build
    for pkg in ("psycopg2-binary==", "mlflow[auth]==", "ray[default"):
        assert pkg in build, f"Dockerfile must install {pkg}"
    assert re.search(r"pip install[^&]* \. ", build + " "), "the project itself (.) must be installed"
    assert all(re.fullmatch(r"[\w.\-]+", args[k]) and args[k] for k in
               ("TORCH_VERSION", "RAY_VERSION", "MLFLOW_VERSION", "PSYCOPG2_VERSION"))
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored

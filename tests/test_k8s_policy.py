"""k8s/, the RayJob templates and the Dockerfile follow policy and use the names components.common.platform uses.

Offline: `kubectl kustomize` renders (the `rendered` fixture, tests/k8s_helpers.py). Rendering and
schema validation: test_k8s.py.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from urllib.parse import urlparse

import yaml

from components.common import platform
from tests.k8s_helpers import (K8S, REPO, containers, env_value, find, load_templates, one, pod_specs,
                               rayjob_pod_specs)
from tests.k8s_helpers import rendered  # noqa: F401  (a pytest fixture)

DEV_TARGETS = {"k8s", "k8s/overlays/dev"}  # the only renders allowed to carry credentials
ACCESS_KEY, ACCESS_VALUE = platform.STORAGE_ACCESS_LABEL


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
        image = platform.gpu_image(platform.COMPONENT_IMAGE) if name == "prod-gpu" else platform.COMPONENT_IMAGE
        for owner, _, spec in rayjob_pod_specs(tpl):
            assert {c["image"] for c in containers(spec)} == {image}, f"{name} {owner}"


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
        # The store URIs come from the Secret as environment variables (mlflow reads MLFLOW_BACKEND_STORE_URI).
        assert "--backend-store-uri" not in script and "postgresql" not in script
        for var in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI"):
            (entry,) = [e for e in mlflow["env"] if e["name"] == var]
            assert entry["valueFrom"]["secretKeyRef"] == {"name": "clip-mlflow-backend", "key": var}, target
        hosts = env_value(mlflow, "ALLOWED_HOSTS").split(",")
        fqdn = tracking.hostname
        short, nsd = fqdn.split(".")[0], ".".join(fqdn.split(".")[:2])
        for host in (short, nsd, fqdn):
            assert f"{host}:{tracking.port}" in hosts and host in hosts, f"{target}: allowed host {host}"
        assert "localhost:5000" in hosts
        cm = one(objs, "ConfigMap", "clip-rayjob-template")
        assert yaml.safe_load(cm["data"]["rayjob.yaml"])["kind"] == "RayJob"


def test_dev_store_uris_use_psycopg2(rendered):
    """SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the image installs psycopg2."""
    (secret,) = [s for s in find(rendered["k8s"], "Secret") if s["metadata"]["name"] == "clip-mlflow-backend"]
    for key, database in (("MLFLOW_BACKEND_STORE_URI", "mlflow"), ("MLFLOW_AUTH_DATABASE_URI", "mlflow_auth")):
        uri = base64.b64decode(secret["data"][key]).decode()
        assert uri.startswith("postgresql+psycopg2://") and uri.endswith(f"@postgres:5432/{database}"), key


# --------------------------------------------------------------------------- secrets off command lines
def sensitive(name: str) -> bool:
    """An env var whose value must never reach a process's argv (`ps` shows argv to every user): passwords,
    secret keys, tokens and URIs that may embed them. Account names and key ids are not secrets."""
    return name.endswith("_URI") or (bool(SECRETISH.search(name)) and not name.endswith(("_ID", "_USER", "_USERNAME")))


def secret_env(container: dict, secrets: dict[str, set[str]]) -> set[str]:
    """Names of the container's env vars that come from a Secret (secretKeyRef or envFrom secretRef)."""
    names = {e["name"] for e in container.get("env", []) if e.get("valueFrom", {}).get("secretKeyRef")}
    for src in container.get("envFrom", []):
        if "secretRef" in src:
            names |= secrets.get(src["secretRef"]["name"], set())
    return names


def argv_lines(text: str) -> list[str]:
    """The lines of a command/args string that can put words on a process's argv: everything except
    heredoc bodies (they go to stdin) and the builtins that exec nothing and print nothing of their
    words: `:` presence checks and `case` subjects."""
    out, terminator = [], None
    for line in text.splitlines():
        if terminator is not None:
            if line.strip() == terminator:
                terminator = None
            continue
        heredoc = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if heredoc:
            terminator = heredoc.group(1)
        if re.match(r"\s*(:|case)\s", line):
            continue
        out.append(line)
    return out


def test_no_secrets_on_command_lines(rendered):
    """No Secret value, secret variable or credential-bearing URI in any container's command or args (where
    `ps` would show it); secrets travel as environment variables and files."""
    secrets = {s["metadata"]["name"]: set(s.get("data", {})) for objs in rendered.values()
               for s in find(objs, "Secret")}
    literals = {base64.b64decode(v).decode() for objs in rendered.values() for s in find(objs, "Secret")
                for k, v in s.get("data", {}).items() if sensitive(k)}
    checked = 0
    for owner, _, spec in all_pod_specs(rendered):
        for c in containers(spec):
            words = [str(w) for w in (c.get("command") or []) + (c.get("args") or [])]
            hidden = {n for n in secret_env(c, secrets) if sensitive(n)}
            what = f"{owner} container {c['name']}"
            for word in words:
                assert not any(lit and lit in word for lit in literals), f"{what}: a Secret's value on its command line"
                assert not re.search(r"://[^/\s:@]+:[^/\s@]+@", word), f"{what}: a URI with a password in command/args"
                for name in hidden:
                    assert f"$({name})" not in word, f"{what}: $({name}) puts a secret on the command line"
                for line in argv_lines(word):
                    used = [n for n in hidden if re.search(rf"\$\{{?{n}\b", line)]
                    assert not used, f"{what}: {used} on a command line: {line.strip()}"
            checked += 1
    assert checked >= 10


def test_command_line_policy_catches_the_old_mlflow_command():
    """The check above fails on what k8s/ used to do (the DB password on mlflow's command line)."""
    old = ('exec mlflow server \\\n  --backend-store-uri '
           '"postgresql+psycopg2://${POSTGRES_USER}:${POSTGRES_PASSWORD}@postgres:5432/mlflow"')
    assert [ln for ln in argv_lines(old) if "${POSTGRES_PASSWORD}" in ln] and sensitive("POSTGRES_PASSWORD")
    assert sensitive("MLFLOW_BACKEND_STORE_URI") and not sensitive("POSTGRES_USER") and not sensitive("AWS_ACCESS_KEY_ID")
    heredoc = "cat > f <<EOF\ndatabase_uri = ${MLFLOW_AUTH_DATABASE_URI}\nEOF\nexec server\n"
    assert argv_lines(heredoc) == ["cat > f <<EOF", "exec server"]


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

"""k8s/ and the RayJob templates are valid: render, validate against the Kubernetes and KubeRay schemas.

Offline: `kubectl kustomize` renders, `kubernetes-validate` holds the Kubernetes schemas, the KubeRay
v1.7.0 RayJob CRD is vendored in tests/data/kuberay-v1.7.0 (missing = failure, not a skip). Policy
and the names shared with the pipeline: test_k8s_policy.py; shared helpers: k8s_helpers.py.
"""

from __future__ import annotations

import copy
import functools
import json

import jsonschema
import kubernetes_validate
import pytest
import yaml

from components.common import platform
from tests.k8s_helpers import (OVERLAYS, RAYJOB_CRD, RAYJOB_TEMPLATES, env_value, kuberay_crd_schema,
                               load_templates, one, rayjob_pod_specs)
from tests.k8s_helpers import rendered  # noqa: F401  (a pytest fixture)

K8S_VERSION = "1.31.0"  # oldest version we support; kubernetes-validate bundles 1.25 ... 1.37


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


@functools.lru_cache(maxsize=None)
def rayjob_validator():
    """Validator for the vendored RayJob CRD; called inside the tests, so a missing CRD fails them."""
    schema = kuberay_crd_schema(RAYJOB_CRD)
    return jsonschema.validators.validator_for(schema)(schema)


def check_rayjob(rayjob: dict, validator) -> None:
    errors = sorted(validator.iter_errors(rayjob), key=lambda e: list(e.path))
    if errors:
        raise jsonschema.ValidationError("; ".join(
            f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors[:5]))
    extra = unknown_fields(rayjob, validator.schema)
    assert not extra, f"fields unknown to the RayJob CRD: {extra}"


@pytest.mark.parametrize("name", sorted(RAYJOB_TEMPLATES))
def test_rayjob_template_validates_against_kuberay_crd(name):
    tpl = load_templates()[name]
    check_rayjob(tpl, rayjob_validator())
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


def test_rendered_configmaps_carry_the_validated_templates(rendered):
    validator = rayjob_validator()
    expected = {"k8s/overlays/prod-gpu": "prod-gpu"}
    for target, objs in rendered.items():
        cm = one(objs, "ConfigMap", "clip-rayjob-template")
        text = cm["data"]["rayjob.yaml"]
        assert text == RAYJOB_TEMPLATES[expected.get(target, "base")].read_text(), target
        check_rayjob(yaml.safe_load(text), validator)


def test_rayjob_check_rejects_broken_templates():
    validator = rayjob_validator()
    tpl = load_templates()["base"]
    missing = copy.deepcopy(tpl)
    del missing["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"]
    typo = copy.deepcopy(tpl)
    typo["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParam"] = {}
    wrong_type = copy.deepcopy(tpl)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError, match="groupName"):
        check_rayjob(missing, validator)
    with pytest.raises(AssertionError, match="rayStartParam"):
        check_rayjob(typo, validator)
    with pytest.raises(jsonschema.ValidationError, match="integer"):
        check_rayjob(wrong_type, validator)

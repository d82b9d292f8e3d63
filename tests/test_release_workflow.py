"""The release workflow publishes exactly the image names the pipeline and k8s/ use."""

from __future__ import annotations

import re
import tomllib

import yaml

from components.common import platform
from tests.k8s_helpers import REPO

WORKFLOW = REPO / ".github" / "workflows" / "release-images.yml"


def workflow() -> dict:
    doc = yaml.safe_load(WORKFLOW.read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as True
    return doc


def test_release_tags_build_and_push_cpu_and_cuda_images():
    doc = workflow()
    assert doc["on"] == {"push": {"tags": ["v*.*.*"]}}
    assert doc["permissions"]["packages"] == "write"
    (job,) = doc["jobs"].values()
    variants = {m["variant"]: m["suffix"] for m in job["strategy"]["matrix"]["include"]}
    assert variants == {"cpu": "", platform.CUDA_VARIANT: f"-{platform.CUDA_VARIANT}"}
    build = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("docker/build-push-action"))
    assert build["with"]["push"] is True and build["with"]["file"] == "Dockerfile"
    assert "TORCH_VARIANT=${{ matrix.variant }}" in build["with"]["build-args"]
    login = next(s for s in job["steps"] if str(s.get("uses", "")).startswith("docker/login-action"))
    assert login["with"]["registry"] == "ghcr.io"


def test_published_names_are_the_ones_the_pipeline_and_k8s_use():
    """`ghcr.io/<owner>/clipflow:<version>[-cu128]` with version = pyproject's = the default image's tag."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    meta = next(s for s in workflow()["jobs"]["image"]["steps"] if s.get("id") == "meta")["run"]
    pattern = re.search(r'image=ghcr\.io/\$\{owner\}/(\w+):\$\{version\}', meta)
    assert pattern, meta
    repo, _, tag = platform.COMPONENT_IMAGE.rpartition(":")
    assert repo == f"ghcr.io/clipflow/{pattern.group(1)}" and tag == version
    gpu_template = (REPO / "k8s" / "overlays" / "prod-gpu" / "rayjob-template-gpu.yaml").read_text()
    assert set(re.findall(r"image: (\S+)", gpu_template)) == {platform.gpu_image(platform.COMPONENT_IMAGE)}
    kustomization = yaml.safe_load((REPO / "k8s" / "base" / "kustomization.yaml").read_text())
    assert kustomization["images"][0]["newTag"] == version


def test_gpu_training_defaults_to_the_cuda_image():
    from components.common.kfp_component import IMAGE
    from components.train.config import TrainConfig
    from components.common.rayjob import RayJobSpec

    assert RayJobSpec.for_training(TrainConfig(gpus_per_worker=8)).image == platform.gpu_image(IMAGE)
    assert RayJobSpec.for_training(TrainConfig(gpus_per_worker=0)).image == IMAGE
    assert RayJobSpec.for_training(TrainConfig(gpus_per_worker=8, image="r/x:1")).image == "r/x:1"

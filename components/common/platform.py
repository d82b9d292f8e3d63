"""Names shared by the pipeline and the Kubernetes manifests in k8s/.

k8s/ creates these objects; the pipeline and the RayJob launcher refer to them. tests/ checks that the
rendered manifests and this module agree, so change both together.
"""

PIPELINE_NAME = "clip-pretraining"               # the KFP pipeline and the default MLflow experiment
NAMESPACE = "clip"
SERVICE_ACCOUNT = "clip-pipeline-runner"        # KFP runs and RayJob pods use it
S3_SECRET = "clip-s3-credentials"               # keys: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
MLFLOW_SECRET = "clip-mlflow-credentials"       # keys: MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD
BUCKET = "clip-data"
S3_ENDPOINT = f"http://seaweedfs-s3.{NAMESPACE}.svc.cluster.local:8333"
MLFLOW_TRACKING_URI = f"http://mlflow.{NAMESPACE}.svc.cluster.local:5000"
COMPONENT_IMAGE = "ghcr.io/clipflow/clipflow:0.1.0"  # built from ./Dockerfile; override with CLIPFLOW_IMAGE
CUDA_VARIANT = "cu128"                          # the GPU build of the same image: tag suffix "-cu128"
# .github/workflows/release-images.yml publishes both on a release tag v<version>


def gpu_image(image: str) -> str:
    """The CUDA build of a component image (the release workflow tags it `<tag>-cu128`)."""
    return image if image.endswith(f"-{CUDA_VARIANT}") else f"{image}-{CUDA_VARIANT}"
RAY_VERSION = "2.60.0"
KFP_NAMESPACE = "kubeflow"                      # where standalone KFP runs pipelines (k8s/base/kfp-access)
# Pods with this label may reach MLflow and the object store (k8s NetworkPolicies): add it to every
# pipeline task (kfp.kubernetes.add_pod_label(task, *STORAGE_ACCESS_LABEL)); the RayJob template has it.
STORAGE_ACCESS_LABEL = ("clipflow/access-storage", "true")

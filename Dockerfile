# The component image: every pipeline step, the Ray head/workers of the training RayJob and the MLflow
# tracking server (k8s/base/platform/mlflow.yaml) run it. Its name is components/common/platform.py
# COMPONENT_IMAGE and the `images:` entry of k8s/base/kustomization.yaml.
#
#   CPU:  docker build -t ghcr.io/clipflow/clipflow:0.1.0 .
#   GPU:  docker build --build-arg TORCH_VARIANT=cu128 -t ghcr.io/clipflow/clipflow:0.1.0-cu128 .
#
# Versions are pinned here (and must agree with components/common/platform.py RAY_VERSION; tests/test_k8s_policy.py checks).
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

# ---- build: a virtual environment with torch, the project and the server extras -------------------
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
# cpu, or a CUDA variant of the PyTorch wheel index (cu126, cu128, ...)
ARG TORCH_VARIANT=cpu
ARG RAY_VERSION=2.60.0
ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG2_VERSION=2.9.10
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
 && pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}" \
 && echo "torch==${TORCH_VERSION}" > /tmp/constraints.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY clip_model ./clip_model
COPY components ./components
COPY pipelines ./pipelines
# ray[default]: the dashboard/job server `ray job submit` talks to; mlflow[auth] + psycopg2: the
# tracking server with basic auth on PostgreSQL; boto3 comes with the project.
RUN pip install --constraint /tmp/constraints.txt \
      "ray[default,train,data]==${RAY_VERSION}" \
      "mlflow[auth]==${MLFLOW_VERSION}" \
      "psycopg2-binary==${PSYCOPG2_VERSION}" \
      . \
 && python -c "import torch, ray, mlflow, psycopg2, boto3, clip_model, components, pipelines; print('torch', torch.__version__, 'ray', ray.__version__, 'mlflow', mlflow.__version__)" \
 && clipflow --help >/dev/null

# ---- runtime: the same base, the venv, a non-root user -------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
# wget: KubeRay's health probes of Ray head and worker pods call it.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends wget \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 1000 clip \
 && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash clip
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/clip
USER 1000:1000
WORKDIR /home/clip
CMD ["python", "-c", "import clip_model, components, pipelines; print('clipflow component image')"]

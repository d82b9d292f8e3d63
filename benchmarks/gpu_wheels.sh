#!/usr/bin/env bash
# Download here, once, the wheels the GPU machine's image lacks for benchmarks/gpu_check.sh, into .whl/ at the
# repository root (git-ignored): webdataset (+ braceexpand), boto3 (+ botocore, s3transfer, jmespath) and the
# benchmark-only open_clip_torch with ftfy and wcwidth. The image has torch, torchvision, timm, numpy, pillow,
# tokenizers, pyarrow, pyyaml, regex, huggingface_hub, safetensors and psutil; Ray (a 79 MB wheel, over the
# 64 MiB a device call may carry) and MLflow are not needed: the check runs the training loop without them.
#
#   bash benchmarks/gpu_wheels.sh            # then carry ".whl" with the device call running gpu_check.sh
#
# Versions are the ones the project is tested with. All are pure-Python wheels (py3-none-any).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS=(webdataset==1.0.2 braceexpand==0.1.7 boto3==1.44.8 botocore==1.44.8 s3transfer==0.19.3 jmespath==1.1.0
        open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4)
rm -rf .whl
mkdir .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
ls -1 .whl
du -sh .whl

#!/usr/bin/env bash
# GPU check of CLIP training (ViT-B/32, bf16, batch 256 on one GPU): the training step run in this
# process without Ray on synthetic tensors and on real shards through the project's reader, then the
# full Ray Train stage. Prints samples/s/GPU and MFU.
#
#   bash benchmarks/gpu_check.sh [gpu_check.py args, e.g. --parts synthetic,shards --compile]
#
# Run from the repository root with a python that already has torch with CUDA ($PYTHON, else
# python3). Missing project dependencies are pip-installed (never torch: it is pinned to the
# installed version); the project itself is used from the working tree via PYTHONPATH.
# Budget: < 5 minutes on one H100 including setup. Exit status: 0 only if every part passed.
set -uo pipefail

fail() { echo "GPU CHECK FAILED: $*" >&2; exit 2; }

[ -f components/train/stage.py ] && [ -f benchmarks/gpu_check.py ] || fail "run from the repository root (cwd is $PWD)"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
command -v "$PY" >/dev/null 2>&1 || fail "no python found (set PYTHON=...)"
echo "== python: $("$PY" -V 2>&1) ($(command -v "$PY"))"

"$PY" - <<'EOF' || fail "this python needs torch with CUDA and a visible GPU (the script does not install torch)"
import sys
import torch
print(f"== torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs visible: {torch.cuda.device_count()}")
sys.exit(0 if torch.cuda.is_available() else 1)
EOF
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# module -> pip requirement, for what the check imports (a subset of pyproject.toml's dependencies)
missing=$("$PY" - <<'EOF'
import importlib.util
need = {"numpy": "numpy>=1.26", "PIL": "pillow>=10.0", "tokenizers": "tokenizers>=0.19",
        "ray": "ray[train]>=2.50", "webdataset": "webdataset>=1.0", "mlflow": "mlflow>=3.5",
        "boto3": "boto3>=1.36", "pyarrow": "pyarrow>=15", "pandas": "pandas>=2.0",
        "matplotlib": "matplotlib>=3.8", "psutil": "psutil>=5.9"}
print(" ".join(req for mod, req in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "== installing missing dependencies (torch pinned): $missing"
    constraints=$(mktemp)
    "$PY" -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
    if ! timeout 150 "$PY" -m pip install --quiet --disable-pip-version-check -c "$constraints" $missing; then
        echo "WARNING: pip install failed (offline?); the parts that need: $missing will FAIL" >&2
    fi
    rm -f "$constraints"
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RAY_DEDUP_LOGS=0 TOKENIZERS_PARALLELISM=false
start=$(date +%s)
timeout 270 "$PY" benchmarks/gpu_check.py "$@"
rc=$?
echo "== gpu_check.py exit status $rc after $(( $(date +%s) - start ))s"
[ "$rc" -eq 124 ] && echo "GPU CHECK FAILED: timed out after 270s" >&2
exit "$rc"

#!/usr/bin/env bash
# GPU check of CLIP training (ViT-B/32, bf16, batch 512 on one GPU) and of what feeds it: MFU of the step
# (eager, regional compile, accumulation), real shards through the reader, the per-worker loop without Ray,
# the reader against the JPEG-decode limit and our step against OpenCLIP's (benchmarks/gpu_check.py's parts).
#
#   bash benchmarks/gpu_wheels.sh                       # here, once: the wheels the GPU image lacks -> .whl/
#   bash benchmarks/gpu_check.sh [gpu_check.py args]    # there, with .whl carried (e.g. --parts synthetic,shards)
#   bash benchmarks/gpu_check.sh --device cpu --batch 16 --corpus 256   # a dry run of the code paths on CPU
#
# Run from the repository root with a python that already has torch ($PYTHON, else python3). Wheels in .whl/
# (webdataset, boto3, open_clip_torch with ftfy and wcwidth, ...) are installed into a private target dir
# without an index; anything else missing is pip-installed if an index is reachable (never torch). Ray cannot
# travel (its wheel is 79 MB, over the 64 MiB a device call may carry): the check runs the same per-worker
# training loop without Ray and says so. The project is used from the working tree via PYTHONPATH.
# Budget: < 5 minutes on one H100/H200 including setup. Exit status: 0 only if every part passed.
set -uo pipefail

fail() { echo "GPU CHECK FAILED: $*" >&2; exit 2; }

[ -f components/train/stage.py ] && [ -f benchmarks/gpu_check.py ] || fail "run from the repository root (cwd is $PWD)"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null 2>&1 || PY=python
command -v "$PY" >/dev/null 2>&1 || fail "no python found (set PYTHON=...)"
echo "== python: $("$PY" -V 2>&1) ($(command -v "$PY"))"
start=$(date +%s)

dry_run=0
for arg in "$@"; do [ "$arg" = "cpu" ] && dry_run=1; done
DRY_RUN=$dry_run "$PY" - <<'EOF' || fail "this python needs torch with CUDA and a visible GPU (the script does not install torch)"
import os
import sys
import torch
print(f"== torch {torch.__version__}, CUDA {torch.version.cuda}, GPUs visible: {torch.cuda.device_count()}")
sys.exit(0 if torch.cuda.is_available() or os.environ["DRY_RUN"] == "1" else 1)
EOF
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

SITE="${TMPDIR:-/tmp}/clipflow-gpu-check-site"
if compgen -G ".whl/*.whl" >/dev/null; then
    echo "== installing the carried wheels: $(ls .whl | tr '\n' ' ')"
    "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" .whl/*.whl || fail "installing the wheels in .whl/ failed"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# module -> pip requirement, for what the check imports (open_clip only for the openclip part)
missing=$("$PY" - <<'EOF'
import importlib.util
need = {"numpy": "numpy>=1.26", "PIL": "pillow>=10.0", "tokenizers": "tokenizers>=0.19",
        "webdataset": "webdataset>=1.0", "boto3": "boto3>=1.36", "pyarrow": "pyarrow>=15", "yaml": "pyyaml>=6",
        "psutil": "psutil>=5.9", "open_clip": "open_clip_torch==3.3.0"}
print(" ".join(req for mod, req in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ] && [ "$dry_run" = 1 ]; then
    # a dry run uses the caller's environment (often the project's .venv): never install into it
    # (open_clip_torch would pull a torchvision that may not import beside this torch)
    echo "== not installed: $missing; a dry run installs nothing: the parts that need them will FAIL"
elif [ -n "$missing" ]; then
    echo "== not installed: $missing; trying pip (torch pinned)"
    constraints=$(mktemp)
    "$PY" -c "import torch; print('torch==' + torch.__version__)" > "$constraints"
    if ! timeout 60 "$PY" -m pip install --quiet --disable-pip-version-check -c "$constraints" $missing; then
        echo "WARNING: pip install failed (offline? run benchmarks/gpu_wheels.sh here and carry .whl); the parts" \
             "that need: $missing will FAIL" >&2
    fi
    rm -f "$constraints"
fi

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
left=$(( 285 - ($(date +%s) - start) ))
timeout "$left" "$PY" benchmarks/gpu_check.py "$@"
rc=$?
echo "== gpu_check.py exit status $rc after $(( $(date +%s) - start ))s in all"
[ "$rc" -eq 124 ] && echo "GPU CHECK FAILED: over the 5-minute budget" >&2
exit "$rc"

#!/usr/bin/env bash
# The data path on the GPU machine in one call (a lease is short, a cold start a minute): the
# GPU tests of the digest, the data layer and the rank hand-off, then bench/e2e.py (the whole
# daemon, Qwen3-8B-shaped). Needs the service packages: run it after
#     eval "$(bash .gpu-kit/install.sh)"
# from the repository root. Arguments go to bench/e2e.py (e.g. --tp 2, --scale 0.1).
set -u -o pipefail
OUT=${OUT:-.out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.} PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv | tee "$OUT/env.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' \
    | tee -a "$OUT/env.txt"
echo "== GPU tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/kernels/test_digest.py \
    tests/orchestrator/data tests/orchestrator/rollout 2>&1 | tee "$OUT/pytest_gpu.txt" \
    | tail -25 || status=1
echo "== bench/e2e.py $*"
timeout 300 python3 bench/e2e.py "$@" 2>&1 | tee "$OUT/e2e.txt" | tail -40 || status=1
exit $status

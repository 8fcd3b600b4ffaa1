#!/usr/bin/env bash
# Everything the kernels need a GPU for, in one go (a GPU lease is short; a cold start is a
# minute): bit-exactness check, launch-config sweep, GPU tests with the swept config, and the
# benchmark table. Logs go to $OUT (default .out/). Run from the repository root:
#     bash bench/gpu_run.sh            # or: OUT=/tmp/x bash bench/gpu_run.sh --no-sweep
set -u -o pipefail
OUT=${OUT:-.out}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
PY=${PY:-python3}
status=0
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv \
    | tee "$OUT/env.txt"
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' \
    | tee -a "$OUT/env.txt"
echo "== bit-exactness: Triton vs reference (shape table + whole model)"
$PY bench/quant.py --check 2>&1 | tee "$OUT/check.txt" | tail -4 || status=1
if [ "${1:-}" != "--no-sweep" ]; then
    echo "== launch-config sweep"
    $PY bench/quant.py --sweep --out "$OUT" 2>&1 | tee "$OUT/sweep.txt" | tail -16 || status=1
    # Use the swept config for what follows (the repository keeps the one committed).
    cp "$OUT"/*.json kernels/configs/ 2>/dev/null || true
fi
echo "== GPU tests"
# --confcutdir: the top-level tests/conftest.py needs redis, which the GPU image lacks.
$PY -m pytest tests/kernels -m gpu -q -p no:cacheprovider --confcutdir=tests/kernels \
    2>&1 | tee "$OUT/pytest_gpu.txt" | tail -4 || status=1
echo "== benchmark"
$PY bench/quant.py --out "$OUT" 2>&1 | tee "$OUT/bench.txt" || status=1
exit $status

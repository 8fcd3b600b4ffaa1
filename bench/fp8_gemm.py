"""The blockwise FP8 GEMM (kernels/fp8_gemm.py) on the probe-sized products of Qwen3-8B, against a
bf16 matmul of the same shape, the fp32 emulation, and a few launch configs.

    PYTHONPATH=. python3 bench/fp8_gemm.py            # on a CUDA GPU

Prints, per (tokens, K, N), the median time of each and its TFLOP/s (2 * T * K * N flops).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import triton.testing  # noqa: E402

from kernels.blockwise import quantize_blockwise  # noqa: E402
from kernels.config import Fp8GemmConfig, configs_for_tensor  # noqa: E402
from kernels.fp8_gemm import fp8_block_gemm, fp8_block_gemm_reference  # noqa: E402
from kernels.token_group import quantize_token_groups  # noqa: E402
from orchestrator.model.gemm import SCALED_MM_V2  # noqa: E402

# Qwen3-8B's linear layers as (K, N): q and o, k and v, gate and up, down.
SHAPES = [(4096, 4096), (4096, 1024), (4096, 12288), (12288, 4096)]
CONFIGS = [
    Fp8GemmConfig(block_m=64, num_warps=4, num_stages=3),
    Fp8GemmConfig(block_m=64, num_warps=4, num_stages=4),
    Fp8GemmConfig(block_m=128, num_warps=4, num_stages=3),
    Fp8GemmConfig(block_m=128, num_warps=8, num_stages=3),
    Fp8GemmConfig(block_m=64, num_warps=8, num_stages=4),
]


def _bench_shape(t: int, k: int, n: int, sweep: bool, device: torch.device) -> None:
    x = torch.randn(t, k, device=device, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
    xq, xs = quantize_token_groups(x)
    wq, ws = quantize_blockwise(w)
    flops = 2 * t * k * n
    runs = {
        "bf16 matmul (torch)": lambda: x @ w.t(),
        "fp8 block GEMM (default config)": lambda: fp8_block_gemm(xq, xs, wq, ws),
        "activation quantization (token groups)": lambda: quantize_token_groups(x),
        "emulation (fp32)": lambda: fp8_block_gemm_reference(xq, xs, wq, ws),
    }
    if hasattr(torch.nn.functional, "scaled_mm"):
        runs["F.scaled_mm, blockwise recipes (cuBLAS)"] = lambda: SCALED_MM_V2.fn(xq, xs, wq, ws)
    if sweep:
        for c in CONFIGS:
            label = f"fp8 block GEMM m{c.block_m} w{c.num_warps} s{c.num_stages}"
            runs[label] = functools.partial(fp8_block_gemm, xq, xs, wq, ws, c)
    for label, fn in runs.items():
        ms = triton.testing.do_bench(fn, warmup=10, rep=50)
        print(f"{k:>6} {n:>6} {label:<44} {ms:>8.4f} {flops / ms / 1e9:>8.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="the probe: 8 x 64")
    parser.add_argument("--sweep", action="store_true", help="also time every config in CONFIGS")
    args = parser.parse_args()
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}, T={args.tokens}")
    print(f"{'K':>6} {'N':>6} {'what':<44} {'ms':>8} {'TFLOP/s':>8}")
    for k, n in SHAPES:
        _bench_shape(args.tokens, k, n, args.sweep, device)
    probe = torch.empty(1, 1, device=device)
    print(f"default config: {configs_for_tensor(probe).fp8_gemm}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

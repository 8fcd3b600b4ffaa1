"""The blockwise FP8 GEMM (kernels/fp8_gemm.py) against its reference, the dequantized operands
multiplied in fp32, run in Triton's interpreter on the CPU (test_gpu.py runs it compiled).

The operands are fp8 already (made by the torch references), so the interpreter's fp8 cast,
which misrounds some values (tests/kernels/fp8_cast.py), never runs. What differs is the
output's rounding to bf16 (the interpreter truncates: up to 2^-7 of a value) and the order of the
fp32 sums.
"""

from __future__ import annotations

import pytest
import torch

from kernels.blockwise import quantize_blockwise_reference
from kernels.config import Fp8GemmConfig
from kernels.fp8 import BLOCK, FP8_DTYPE, cdiv
from kernels.fp8_gemm import fp8_block_gemm, fp8_block_gemm_reference
from kernels.token_group import quantize_token_groups_reference
from tests.kernels.shapes import make_weight, seed_for

pytestmark = pytest.mark.usefixtures("interpreted")

# (tokens, channels K, outputs N): one of everything, tails of K and N (130, 257, 300), more
# row tiles than one program takes (70 > 32), several steps of K, a single output.
GEMM_SHAPES = [(1, 128, 128), (7, 130, 257), (70, 384, 300), (33, 256, 1)]
SMALL = Fp8GemmConfig(block_m=32, group_m=2)


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16 `got` against fp32 `want`: the bf16 rounding of each value (truncation at worst),
    and fp32 summation order, which is tiny beside the largest value."""
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    err = (got.float() - want).abs()
    bound = 2.0**-7 * want.abs() + 2.0**-16 * want.abs().max()
    assert bool((err <= bound).all()), f"worst excess {(err - bound).max().item():.3g}"


def _operands(tokens: int, k: int, n: int, seed: int):
    """Activations with an outlier token, a weight with a zero block and an outlier block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g)
    x[-1] *= 50.0
    xq, xs = quantize_token_groups_reference(x)
    wq, ws = quantize_blockwise_reference(make_weight((n, k), torch.bfloat16, seed + 1))
    return xq, xs, wq, ws


@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=str)
def test_kernel_equals_reference(shape):
    xq, xs, wq, ws = _operands(*shape, seed_for("gemm", shape))
    assert_close(fp8_block_gemm(xq, xs, wq, ws, SMALL), fp8_block_gemm_reference(xq, xs, wq, ws))


def test_every_block_uses_its_own_scales():
    # Scales 2^-8..2^0 from block to block and a non-square scale grid: a scale read from the
    # wrong block or token, or a grid read the wrong way round, cannot match by chance. The
    # weight scales come as a view of a wider grid (strided rows), as a TP piece's would.
    tokens, k, n = 40, 384, 256
    g = torch.Generator().manual_seed(1)
    xq = (torch.randn(tokens, k, generator=g) * 100).clamp(-448, 448).to(FP8_DTYPE)
    wq = (torch.randn(n, k, generator=g) * 100).clamp(-448, 448).to(FP8_DTYPE)
    xs = 2.0 ** torch.randint(-8, 1, (tokens, cdiv(k, BLOCK)), generator=g).float()
    wide = 2.0 ** torch.randint(-8, 1, (cdiv(n, BLOCK), 2 * cdiv(k, BLOCK)), generator=g).float()
    ws = wide[:, 1 : 1 + cdiv(k, BLOCK)]
    assert_close(fp8_block_gemm(xq, xs, wq, ws, SMALL), fp8_block_gemm_reference(xq, xs, wq, ws))


def test_strided_operands_and_empty_ones():
    xq, xs, wq, ws = _operands(20, 256, 130, 5)
    # Rows of a wider buffer, as a view of a shard would be.
    wide = torch.zeros(130, 384, dtype=torch.uint8)
    wide[:, :256] = wq.view(torch.uint8)
    strided = wide.view(FP8_DTYPE)[:, :256]
    want = fp8_block_gemm_reference(xq, xs, wq, ws)
    assert_close(fp8_block_gemm(xq, xs, strided, ws, SMALL), want)
    assert fp8_block_gemm(xq[:0], xs[:0], wq, ws, SMALL).shape == (0, 130)


def test_mismatched_operands_are_refused():
    xq, xs, wq, ws = _operands(4, 256, 128, 6)
    with pytest.raises(ValueError, match="channels differ"):
        fp8_block_gemm(xq[:, :128], xs[:, :1], wq, ws)
    with pytest.raises(ValueError, match="b_s must be"):
        fp8_block_gemm(xq, xs, wq, ws[:, :1])
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_block_gemm(xq.float(), xs, wq, ws)

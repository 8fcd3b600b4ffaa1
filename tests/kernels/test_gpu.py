"""On a CUDA GPU: the Triton kernels equal the references bit for bit (q and scales).

Skipped without CUDA. On the GPU both torch and Triton round fp32 -> e4m3fn correctly, so no
allowance is made: every byte of q and every bit of every scale must match.
"""

from __future__ import annotations

import pytest
import torch

from kernels.blockwise import quantize_blockwise, quantize_blockwise_reference
from kernels.config import PerChannelConfig
from kernels.fp8 import FP8_DTYPE
from kernels.grouped import quantize_blockwise_many, quantize_per_channel_many
from kernels.per_channel import quantize_per_channel, quantize_per_channel_reference
from tests.kernels.shapes import AWKWARD_SHAPES, DTYPES, REAL_SHAPES, make_weight, seed_for

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

GPU_SHAPES = AWKWARD_SHAPES + REAL_SHAPES + [(4096, 4096), (12288, 4096), (4096, 12288)]
# Forces the two-pass per-channel path for rows wider than 1024.
TWO_PASS = PerChannelConfig(max_single_pass_n=1024, chunk_n=512)


def poison_allocator(nbytes: int) -> None:
    """Fill and free a block, so the caching allocator hands the kernel memory holding 0x7F
    (NaN in e4m3fn; a NaN scale): an element the kernel fails to write cannot pass."""
    torch.full((nbytes,), 0x7F, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()


def assert_bit_exact(got, want) -> None:
    (q, s), (q_ref, s_ref) = got, want
    assert q.dtype == FP8_DTYPE and q.shape == q_ref.shape and s.shape == s_ref.shape
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(s.view(torch.int32), s_ref.view(torch.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_blockwise_bit_exact(shape, dtype):
    w = make_weight(shape, dtype, seed_for("gpu-blockwise", shape, dtype)).cuda()
    poison_allocator(w.numel() * 2)
    assert_bit_exact(quantize_blockwise(w), quantize_blockwise_reference(w))


@pytest.mark.parametrize("config", [None, TWO_PASS], ids=["tuned", "two-pass"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_per_channel_bit_exact(shape, dtype, config):
    w = make_weight(shape, dtype, seed_for("gpu-per-channel", shape, dtype)).cuda()
    poison_allocator(w.numel() * 2)
    got = quantize_per_channel(w, config=config)
    assert_bit_exact(got, quantize_per_channel_reference(w))


def test_many_bit_exact():
    # One call over every shape and dtype, aligned and unaligned rows, plus a misaligned view.
    ws = [
        make_weight(shape, dtype, seed_for("gpu-many", shape, dtype)).cuda()
        for shape in GPU_SHAPES
        for dtype in DTYPES
    ]
    flat = make_weight((1, 1 + 256 * 384), torch.bfloat16, seed_for("gpu-many-flat")).cuda()
    ws.append(flat.view(-1)[1:].view(256, 384))
    poison_allocator(sum(w.numel() for w in ws) * 2)
    for got, w in zip(quantize_blockwise_many(ws), ws, strict=True):
        assert_bit_exact(got, quantize_blockwise_reference(w))
    poison_allocator(sum(w.numel() for w in ws) * 2)
    for got, w in zip(quantize_per_channel_many(ws), ws, strict=True):
        assert_bit_exact(got, quantize_per_channel_reference(w))


# The blockwise FP8 GEMM: (tokens, channels K, outputs N). Tails of K (130, 2368 = 18.5 blocks)
# and N (257, 3584 + 0), one token, and the probe-sized products of Qwen3-8B's layers.
GEMM_SHAPES = [
    (1, 128, 128),
    (7, 130, 257),
    (300, 2368, 3584),
    (512, 4096, 4096),
    (512, 4096, 1024),
    (512, 4096, 12288),
    (512, 12288, 4096),
]


@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=str)
def test_fp8_block_gemm_matches_its_reference(shape):
    from kernels.blockwise import quantize_blockwise
    from kernels.fp8_gemm import fp8_block_gemm, fp8_block_gemm_reference
    from kernels.token_group import quantize_token_groups

    tokens, k, n = shape
    g = torch.Generator().manual_seed(seed_for("gpu-gemm", shape))
    x = torch.randn(tokens, k, generator=g).cuda()
    x[-1] *= 50.0  # an outlier token
    xq, xs = quantize_token_groups(x)
    wq, ws = quantize_blockwise(make_weight((n, k), torch.bfloat16, seed_for("w", shape)).cuda())
    got = fp8_block_gemm(xq, xs, wq, ws)
    want = fp8_block_gemm_reference(xq, xs, wq, ws)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, n)
    err = got.float() - want
    # bf16 output (2^-9 of a value), and Hopper's fp8 tensor cores summing each 128-channel
    # partial product in reduced precision (as in SGLang's and DeepGEMM's kernels) before the
    # scales promote it to fp32: small beside the largest output, and over the whole tile.
    assert err.abs().max() <= 2.0**-6 * want.abs().max()
    assert err.norm() <= 2.0**-7 * want.norm()

"""Blockwise FP8 GEMM, as SGLang serves a blockwise FP8 linear layer on Hopper: Triton kernel,
launcher, plain-torch reference.

    out[t, n] = sum over k-blocks kb of (sum_{k in kb} a[t, k] * b[n, k]) * a_s[t, kb] * b_s[nb, kb]

with nb = n // 128 and kb a run of 128 channels.

`a` holds fp8 e4m3 activations [T, K] with one fp32 scale per token per 128 channels
(kernels/token_group.py makes them); `b` an fp8 weight [N, K] with one fp32 scale per 128x128
block (kernels/blockwise.py). Each program computes a BLOCK_M x 128 tile of the output: per
128-wide step of K it takes one fp8 tensor-core product (wgmma on Hopper) of the tile's slice,
then scales that partial sum by its token scales and its single weight scale and adds it to an
fp32 accumulator. So the fp8 products are only ever summed 128 at a time before the scales are
applied, the promotion DeepGEMM makes too; the tile is written as bf16. Tails of K and N (and of
T) are masked: the missing channels read as zeros, which add nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.blockwise import dequantize_blockwise
from kernels.config import Fp8GemmConfig, configs_for_tensor
from kernels.fp8 import BLOCK, FP8_DTYPE, cdiv
from kernels.token_group import dequantize_token_groups


@triton.jit
def _fp8_block_gemm_kernel(
    a_ptr,  # (T, K) fp8 e4m3fn, rows `stride_am` apart, channels contiguous
    a_s_ptr,  # (T, KB) fp32: one scale per token per 128 channels, rows `stride_asm` apart
    b_ptr,  # (N, K) fp8 e4m3fn weight, rows `stride_bn` apart, channels contiguous
    b_s_ptr,  # (NB, KB) fp32: one scale per 128x128 block, strides (stride_bsn, stride_bsk)
    c_ptr,  # (T, N) bf16 out, contiguous
    t,
    n,
    k,
    stride_am,
    stride_asm,
    stride_bn,
    stride_bsn,
    stride_bsk,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,  # 128: one weight scale per program per step
    BLOCK_K: tl.constexpr,  # 128: one activation scale per token per step
    GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(t, BLOCK_M)
    tiles_n = tl.cdiv(n, BLOCK_N)
    # Grouped order: GROUP_M row tiles walk one band of weight columns before the next band,
    # so a weight tile is read from HBM once and from L2 by the others.
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < t
    col_ok = cols < n
    a_ptrs = a_ptr + rows.to(tl.int64)[:, None] * stride_am + ks[None, :]
    # The weight tile as [BLOCK_K, BLOCK_N]: the transpose of its rows, read in place.
    b_ptrs = b_ptr + cols.to(tl.int64)[None, :] * stride_bn + ks[:, None]
    a_s_ptrs = a_s_ptr + rows.to(tl.int64) * stride_asm
    b_s_ptr = b_s_ptr + pid_n * stride_bsn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    steps = tl.cdiv(k, BLOCK_K)
    for step in range(0, steps):
        k_ok = ks < k - step * BLOCK_K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a_s = tl.load(a_s_ptrs + step, mask=row_ok, other=0.0)
        b_s = tl.load(b_s_ptr + step * stride_bsk)
        acc += tl.dot(a, b) * (a_s[:, None] * b_s)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * n + cols[None, :]
    tl.store(c_ptrs, acc.to(tl.bfloat16), mask=row_ok[:, None] & col_ok[None, :])


def _check(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.dtype != FP8_DTYPE or b.dtype != FP8_DTYPE:
        raise ValueError(f"a and b must be 2-D {FP8_DTYPE}, got {a.dtype} and {b.dtype}")
    (tokens, k), (n, kb) = a.shape, b.shape
    if k != kb:
        raise ValueError(f"a is [{tokens}, {k}] but b is [{n}, {kb}]: channels differ")
    if tuple(a_s.shape) != (tokens, cdiv(k, BLOCK)):
        raise ValueError(f"a_s must be [{tokens}, {cdiv(k, BLOCK)}], got {tuple(a_s.shape)}")
    if tuple(b_s.shape) != (cdiv(n, BLOCK), cdiv(k, BLOCK)):
        raise ValueError(
            f"b_s must be [{cdiv(n, BLOCK)}, {cdiv(k, BLOCK)}], got {tuple(b_s.shape)}"
        )
    if a_s.dtype != torch.float32 or b_s.dtype != torch.float32:
        raise ValueError("scales must be fp32")


def fp8_block_gemm(
    a: torch.Tensor,
    a_s: torch.Tensor,
    b: torch.Tensor,
    b_s: torch.Tensor,
    config: Fp8GemmConfig | None = None,
) -> torch.Tensor:
    """bf16 [T, N] = (a [T, K] fp8 with a_s [T, K/128]) @ (b [N, K] fp8 with b_s [N/128, K/128]).T,
    in one launch (see the module docstring). CUDA tensors, or CPU ones under TRITON_INTERPRET=1."""
    _check(a, a_s, b, b_s)
    cfg = config or configs_for_tensor(a).fp8_gemm
    if a.stride(1) != 1:
        a = a.contiguous()
    if b.stride(1) != 1:
        b = b.contiguous()
    if a_s.stride(1) != 1:
        a_s = a_s.contiguous()
    tokens, k = a.shape
    n = b.shape[0]
    out = torch.empty(tokens, n, dtype=torch.bfloat16, device=a.device)
    if tokens == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    grid = (cdiv(tokens, cfg.block_m) * cdiv(n, BLOCK),)
    _fp8_block_gemm_kernel[grid](
        a,
        a_s,
        b,
        b_s,
        out,
        tokens,
        n,
        k,
        a.stride(0),
        a_s.stride(0),
        b.stride(0),
        b_s.stride(0),
        b_s.stride(1),
        BLOCK_M=cfg.block_m,
        BLOCK_N=BLOCK,
        BLOCK_K=BLOCK,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out


def fp8_block_gemm_reference(
    a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor
) -> torch.Tensor:
    """Plain torch, the oracle: the dequantized operands multiplied in fp32; fp32 [T, N]."""
    _check(a, a_s, b, b_s)
    x = dequantize_token_groups(a, a_s, BLOCK)
    return x @ dequantize_blockwise(b, b_s, dtype=torch.float32).t()


__all__ = ["fp8_block_gemm", "fp8_block_gemm_reference"]

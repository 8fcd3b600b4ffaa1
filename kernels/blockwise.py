"""Blockwise 128x128 FP8 e4m3fn quantization: Triton kernel, launcher, plain-torch reference,
dequantization.

scale_inv = amax / 448 per block (fp32), q = clamp(x * (448 / amax), -448, 448) cast to e4m3fn
with round-to-nearest-even. The kernel and the reference follow kernels/fp8.py op for op, so
that they agree bit for bit on the GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import _tables
from kernels.config import BlockwiseConfig, configs_for_tensor
from kernels.fp8 import (
    BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    SCALE_EPS,
    cdiv,
    check_weight,
    scale_and_clamp,
    scale_from_amax,
    to_bf16,
)

Backend = Literal["auto", "triton", "reference"]


@triton.jit
def _blockwise_fp8_kernel(
    x_ptr,  # bf16: the launch's base input; tensor t starts at x_ptr + meta[t, X_OFF]
    q_ptr,  # (Q,) fp8 e4m3fn: every output of the call; tensor t's [M, N] at meta[t, Q_OFF]
    s_ptr,  # (S,) fp32: every scale of the call; tensor t's [Mb, Nb] at meta[t, S_OFF]
    meta_ptr,  # (T, 8) int64: x_off, q_off, s_off, M, N, first block, -, -
    block_tensor_ptr,  # (num_blocks,) int32: meta row of each block of this launch
    num_blocks,  # blocks in this launch
    BLOCK_SIZE: tl.constexpr,  # 128: the quantization block is BLOCK_SIZE x BLOCK_SIZE
    BLOCKS_PER_PROG: tl.constexpr,  # consecutive blocks each program takes
    ALIGNED: tl.constexpr,  # every tensor's rows start on 16 bytes (see _tables.is_aligned)
    FP8_MAX: tl.constexpr,
    SCALE_EPS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_SIZE)
    cols = tl.arange(0, BLOCK_SIZE)
    for i in tl.static_range(BLOCKS_PER_PROG):
        b = pid * BLOCKS_PER_PROG + i
        if b < num_blocks:
            meta = meta_ptr + tl.load(block_tensor_ptr + b).to(tl.int64) * 8
            x_off = tl.load(meta + 0)
            q_off = tl.load(meta + 1)
            s_off = tl.load(meta + 2)
            m = tl.load(meta + 3)
            n = tl.load(meta + 4)
            local = b - tl.load(meta + 5)
            n32 = n.to(tl.int32)
            if ALIGNED:
                # Offsets read from a table carry no alignment facts; without these hints the
                # compiler emits 2-byte loads and 1-byte stores instead of 16-byte ones.
                x_off = tl.multiple_of(x_off, 16)
                q_off = tl.multiple_of(q_off, 16)
                n = tl.multiple_of(n, 16)
                n32 = tl.multiple_of(n32, 16)
            # Block coordinates in int32 (a tensor has far fewer than 2**31 blocks): a 64-bit
            # division is a long instruction sequence.
            local32 = local.to(tl.int32)
            blocks_n = tl.cdiv(n32, BLOCK_SIZE)
            bm = local32 // blocks_n
            bn = local32 - bm * blocks_n
            row0 = bm.to(tl.int64) * BLOCK_SIZE
            col0 = bn * BLOCK_SIZE
            # Block-relative offsets fit in int32 (127 * N + 127); the block's start may not.
            inner = rows[:, None] * n32 + cols[None, :]
            mask = (rows[:, None] < m - row0) & (cols[None, :] < n - col0)
            start = row0 * n + col0
            # Masked-off elements read as 0, so an edge block's amax is over valid ones only.
            x = tl.load(x_ptr + (x_off + start) + inner, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(tl.max(tl.abs(x)), SCALE_EPS)
            # div_rn: IEEE division, as torch does; a plain `/` may compile to an approximate
            # division and break bit-exactness with the reference.
            scale_inv = tl.math.div_rn(amax, FP8_MAX)
            multiplier = tl.math.div_rn(tl.full([], FP8_MAX, tl.float32), amax)
            y = tl.minimum(tl.maximum(x * multiplier, -FP8_MAX), FP8_MAX)
            tl.store(q_ptr + (q_off + start) + inner, y.to(tl.float8e4nv), mask=mask)
            tl.store(s_ptr + s_off + local, scale_inv)


def scale_shape(m: int, n: int) -> tuple[int, int]:
    """Shape of `scale_inv` for an [m, n] weight."""
    return cdiv(m, BLOCK), cdiv(n, BLOCK)


def kernel_is_interpreted() -> bool:
    """True when TRITON_INTERPRET=1 was set before this module was imported (Triton decides
    at decoration time), so that the kernel also runs on CPU tensors."""
    return type(_blockwise_fp8_kernel).__name__ == "InterpretedFunction"


def use_triton(ws: Sequence[torch.Tensor], backend: Backend) -> bool:
    """Resolve a backend: "auto" is Triton for CUDA tensors and the reference on the CPU."""
    if backend == "reference":
        return False
    on_cuda = all(w.device.type == "cuda" for w in ws)
    if backend == "auto":
        return on_cuda
    if backend != "triton":
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    if not on_cuda and not kernel_is_interpreted():
        raise RuntimeError(
            "the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
            "kernels is imported to run them on the CPU"
        )
    return True


def launch_blockwise(
    ws: Sequence[torch.Tensor], config: BlockwiseConfig | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Quantize 2-D tensors of one device with one launch per alignment class (at most two).

    Outputs are views into one fp8 and one fp32 buffer allocated for the whole call.
    """
    ws = [to_bf16(w) for w in ws]
    if not ws:
        return []
    device = ws[0].device
    if any(w.device != device for w in ws):
        raise ValueError("launch_blockwise takes tensors of one device; group them first")
    cfg = config or configs_for_tensor(ws[0]).blockwise
    shapes = [(w.shape[0], w.shape[1]) for w in ws]
    block_counts = [mb * nb for mb, nb in (scale_shape(m, n) for m, n in shapes)]
    q_offs, q_total = _tables.packed_offsets([m * n for m, n in shapes], _tables.Q_ALIGN)
    s_offs, s_total = _tables.packed_offsets(block_counts, 1)
    q_flat = torch.empty(q_total, dtype=FP8_DTYPE, device=device)
    s_flat = torch.empty(s_total, dtype=torch.float32, device=device)
    for aligned, idx in _tables.alignment_groups(ws):
        base = ws[idx[0]]
        rows, counts, first = [], [], 0
        for i in idx:
            m, n = shapes[i]
            x_off = _tables.element_offset(ws[i], base)
            rows.append([x_off, q_offs[i], s_offs[i], m, n, first])
            counts.append(block_counts[i])
            first += block_counts[i]
        meta = _tables.meta_table(rows, device)
        table = _tables.unit_table(tuple(counts), device)
        grid = (cdiv(first, cfg.blocks_per_prog),)
        _blockwise_fp8_kernel[grid](
            base,
            q_flat,
            s_flat,
            meta,
            table,
            first,
            BLOCK_SIZE=BLOCK,
            BLOCKS_PER_PROG=cfg.blocks_per_prog,
            ALIGNED=aligned,
            FP8_MAX=FP8_MAX,
            SCALE_EPS=SCALE_EPS,
            num_warps=cfg.num_warps,
        )
    return [
        (
            q_flat[q_offs[i] : q_offs[i] + m * n].view(m, n),
            s_flat[s_offs[i] : s_offs[i] + block_counts[i]].view(scale_shape(m, n)),
        )
        for i, (m, n) in enumerate(shapes)
    ]


def quantize_blockwise(
    w: torch.Tensor, backend: Backend = "auto", config: BlockwiseConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise FP8: (q fp8 [M, N], scale_inv fp32 [ceil(M/128), ceil(N/128)]).

    Triton on CUDA tensors, the reference on CPU tensors; backend="triton" forces the kernel
    (on the CPU only under TRITON_INTERPRET=1). Quantize a whole model with
    `kernels.grouped.quantize_blockwise_many`: one launch instead of one per tensor.
    """
    check_weight(w)
    if not use_triton([w], backend):
        return quantize_blockwise_reference(w)
    return launch_blockwise([w], config)[0]


def _reference_scaled(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference up to (not including) the fp8 cast: (fp32 values in [-448, 448], scale_inv).

    Kept apart so that tests can cast these values with Triton's own cast and compare the rest
    of a kernel's arithmetic exactly (see tests/kernels).
    """
    x = to_bf16(w).float()
    m, n = x.shape
    mb, nb = scale_shape(m, n)
    # Zero padding never changes an amax (|x| >= 0), so an edge block's amax is taken over its
    # valid elements only. view(mb, 128, nb, 128) is today's RL code's reshape/permute without
    # the permute: reducing over dims (1, 3) is the same per-block amax.
    blocks = F.pad(x, (0, nb * BLOCK - n, 0, mb * BLOCK - m)).view(mb, BLOCK, nb, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv, multiplier = scale_from_amax(amax)
    scaled = scale_and_clamp(blocks, multiplier[:, None, :, None])
    return scaled.view(mb * BLOCK, nb * BLOCK)[:m, :n], scale_inv


def quantize_blockwise_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch blockwise quantization, the oracle: (q fp8 [M, N], scale_inv fp32 [Mb, Nb]).

    `w` is 2-D fp32/fp16/bf16 on any device; it is cast to bf16 first. `w ≈ q * scale_inv`
    per 128x128 block, with scale_inv = amax / 448 (an all-zero block gets a tiny finite scale
    and q = 0).
    """
    scaled, scale_inv = _reference_scaled(w)
    return scaled.to(FP8_DTYPE).contiguous(), scale_inv


def dequantize_blockwise(
    q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """q * scale_inv, each scale spread over its 128x128 block; returns `dtype` [M, N]."""
    if q.dim() != 2 or q.dtype != FP8_DTYPE:
        raise ValueError(f"q must be 2-D {FP8_DTYPE}, got {q.dtype} {tuple(q.shape)}")
    m, n = q.shape
    if tuple(scale_inv.shape) != scale_shape(m, n):
        raise ValueError(
            f"scale_inv for a {m}x{n} weight must be {scale_shape(m, n)}, "
            f"got {tuple(scale_inv.shape)}"
        )
    full = scale_inv.float().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:m, :n]
    return (q.float() * full).to(dtype)

"""Blockwise 128x128 FP8 e4m3fn quantization: the plain-torch reference and dequantization."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.fp8 import BLOCK, FP8_DTYPE, cdiv, scale_and_clamp, scale_from_amax, to_bf16


def scale_shape(m: int, n: int) -> tuple[int, int]:
    """Shape of `scale_inv` for an [m, n] weight."""
    return cdiv(m, BLOCK), cdiv(n, BLOCK)


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

"""Per-output-channel FP8 e4m3fn quantization: the plain-torch reference and dequantization.

The fallback for tensors (or TP shards, or fused parts) that are not multiples of 128.
"""

from __future__ import annotations

import torch

from kernels.fp8 import FP8_DTYPE, scale_and_clamp, scale_from_amax, to_bf16


def _reference_scaled(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference up to (not including) the fp8 cast: (fp32 values in [-448, 448], scale)."""
    x = to_bf16(w).float()
    amax = x.abs().amax(dim=1, keepdim=True)
    scale, multiplier = scale_from_amax(amax)
    return scale_and_clamp(x, multiplier), scale


def quantize_per_channel_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch per-row quantization, the oracle: (q fp8 [M, N], scale fp32 [M, 1]).

    `w` is 2-D fp32/fp16/bf16 (cast to bf16 first); `w ≈ q * scale` row by row, with
    scale = amax(|row|) / 448; an all-zero row gets a tiny finite scale and q = 0.
    """
    scaled, scale = _reference_scaled(w)
    return scaled.to(FP8_DTYPE), scale


def dequantize_per_channel(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """q * scale row by row; returns `dtype` [M, N]."""
    if q.dim() != 2 or q.dtype != FP8_DTYPE:
        raise ValueError(f"q must be 2-D {FP8_DTYPE}, got {q.dtype} {tuple(q.shape)}")
    if tuple(scale.shape) != (q.shape[0], 1):
        raise ValueError(
            f"scale for a {q.shape[0]}-row weight must be ({q.shape[0]}, 1), "
            f"got {tuple(scale.shape)}"
        )
    return (q.float() * scale.float()).to(dtype)

"""FP8 e4m3fn constants and the scaling arithmetic shared by every quantizer.

Defined once here; the Triton kernels and the plain-torch references both follow
`scale_from_amax` and `scale_and_clamp` op for op, so that on the GPU they agree bit for bit.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
BLOCK = 128  # side of a square quantization block
# amax floor: an all-zero block (or one of denormal-sized values) would otherwise divide by
# zero. A power of two so that the floor is the same exact fp32 number in torch, in a Triton
# constant and in numpy (1e-12 would be rounded differently by each path's literal handling).
SCALE_EPS = 2.0**-40

# e4m3fn facts the tests and docs reason with: 3 mantissa bits, so a value in the normal
# range is rounded to within 2**-4 of itself (relative); below 2**-6 the format is subnormal
# with a fixed step of 2**-9.
FP8_MANTISSA_BITS = 3
FP8_MIN_NORMAL = 2.0**-6
FP8_SUBNORMAL_STEP = 2.0**-9

QUANTIZABLE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def check_weight(w: torch.Tensor, what: str = "weight") -> None:
    """Raise ValueError/TypeError unless `w` is a 2-D fp32/fp16/bf16 tensor."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{what} must be 2-D [out, in], got shape {tuple(w.shape)}")
    if w.dtype not in QUANTIZABLE_DTYPES:
        raise TypeError(f"{what} must be float32, float16 or bfloat16, got {w.dtype}")


def to_bf16(w: torch.Tensor) -> torch.Tensor:
    """The quantizers' first step: any accepted input becomes contiguous bf16.

    fp32 -> bf16 -> fp8 rather than fp32 -> fp8: the blockwise-FP8 RL experiments found the
    direct cast drifts further from the bf16 baseline (see DESIGN.md).
    """
    check_weight(w)
    if w.dtype == torch.bfloat16 and w.is_contiguous():
        return w  # the common case, kept cheap: a whole model calls this 252 times per update
    return w.to(torch.bfloat16).contiguous()


def scale_from_amax(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 amax -> (scale_inv = amax / 448, multiplier = 448 / amax), amax floored at SCALE_EPS.

    Both are true IEEE fp32 divisions of two tensors. Two torch shortcuts are avoided on
    purpose: `448.0 / t` is computed as `t.reciprocal() * 448` (two roundings), and on CUDA
    `t / 448.0` with a Python scalar becomes `t * (1/448)` (also two roundings). The Triton
    kernels use `tl.math.div_rn`, the same correctly rounded division.
    """
    amax = amax.clamp(min=SCALE_EPS)
    fp8_max = torch.full_like(amax, FP8_MAX)
    return torch.div(amax, fp8_max), torch.div(fp8_max, amax)


def scale_and_clamp(x: torch.Tensor, multiplier: torch.Tensor) -> torch.Tensor:
    """fp32 values times their block's multiplier, clamped to the e4m3fn range (still fp32).

    One multiplication per element (not a division by scale_inv): a single correctly rounded
    fp32 op in torch and in Triton alike, and the cheapest op on the GPU. The clamp only
    catches amax * (448 / amax) landing one ulp above 448.
    """
    return (x * multiplier).clamp(-FP8_MAX, FP8_MAX)

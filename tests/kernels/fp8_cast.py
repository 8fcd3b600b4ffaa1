"""Triton's own fp32 -> fp8 e4m3fn cast, and what the interpreter's version gets wrong.

The interpreter (triton/runtime/interpreter.py, _convert_float) rounds fp32 -> e4m3fn by
adding the first dropped mantissa bit to the kept 3 bits, which is not round-to-nearest-even:
1. Mantissa carry into an odd exponent: a value that rounds up to a power of two 2**k (it
   lies in [2**k * (1 - 2**-5), 2**k)) carries out of the 3-bit mantissa; the carry is ORed
   into the exponent field instead of added, so when the unrounded exponent field is odd the
   result is 2**(k-1): half the right value. About half of all round-ups to a power of two,
   i.e. 1/2 * log2(32/31) = 2.3% of values spread over many binades (2.7% measured over the
   test weights, up to 4.0% on one small tensor).
2. Subnormal results (|x| < 2**-6): the value is shifted into the subnormal field after
   rounding and the shifted-out bits are dropped, so it can land one subnormal step
   (2**-9) toward zero from the right value.
3. Exact ties go away from zero instead of to the even neighbour (one step, rare).
The GPU (cvt.rn.satfinite.e4m3x2.f32) and torch round correctly; they agree bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.fp8 import FP8_DTYPE, FP8_MIN_NORMAL


@triton.jit
def _cast_kernel(
    x_ptr,  # (n,) fp32
    y_ptr,  # (n,) fp8 e4m3fn
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(tl.float8e4nv), mask=mask)


def triton_cast(x: torch.Tensor) -> torch.Tensor:
    """x (fp32, any shape) cast to e4m3fn by Triton's cast, on x's device."""
    flat = x.contiguous().view(-1)
    out = torch.empty(flat.shape, dtype=FP8_DTYPE, device=x.device)
    block = 4096
    _cast_kernel[(triton.cdiv(flat.numel(), block),)](flat, out, flat.numel(), BLOCK=block)
    return out.view(x.shape)


def known_interpreter_misrounding(
    x: torch.Tensor, got: torch.Tensor, want: torch.Tensor
) -> torch.Tensor:
    """Bool mask: where `got` (interpreter) differs from `want` (torch) in one of the three
    documented ways, given the fp32 value `x` both cast. Elsewhere False."""
    g, w = got.float(), want.float()
    code_g = got.view(torch.uint8).int() & 0x7F
    code_w = want.view(torch.uint8).int() & 0x7F
    same_sign = (got.view(torch.uint8) >> 7) == (want.view(torch.uint8) >> 7)
    pow2 = (w != 0) & (torch.frexp(w.abs()).mantissa == 0.5)
    carry = pow2 & (g == w / 2) & (x.abs() >= w.abs() * (1 - 2.0**-5)) & (x.abs() < w.abs())
    one_step = same_sign & ((code_g - code_w).abs() == 1)
    subnormal = one_step & (x.abs() < FP8_MIN_NORMAL) & (g.abs() < w.abs())
    tie = one_step & (x.double() == (g.double() + w.double()) / 2) & (g.abs() > w.abs())
    return carry | subnormal | tie

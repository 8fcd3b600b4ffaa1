"""FP8 activations per token per 128-channel group, as SGLang's per_token_group_quant_fp8 makes
them for blockwise FP8 GEMMs: Triton kernel, launcher, plain-torch reference.

scale = max(|x| over the group, 1e-10) / 448 (fp32, one per token per group) and
q = clamp(x / scale, -448, 448) cast to e4m3fn. One launch per activation instead of the eight
element-wise passes the reference makes: verification quantizes four activations per decoder
layer on the probe, so the launches, not the bytes, are its cost.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.blockwise import Backend, use_triton
from kernels.fp8 import BLOCK, FP8_DTYPE, FP8_MAX

# SGLang's per_token_group_quant_fp8 floors a group's absmax here, so an all-zero group of
# activations quantizes to zeros with a finite scale.
ACTIVATION_EPS = 1e-10


@triton.jit
def _token_group_kernel(
    x_ptr,  # (T, K) bf16/fp16/fp32, rows `x_stride` apart, columns contiguous
    q_ptr,  # (T, K) fp8 e4m3fn, contiguous
    s_ptr,  # (T, G) fp32, contiguous: G = cdiv(K, GROUP)
    x_stride,
    k,
    groups,
    GROUP: tl.constexpr,  # channels per scale (128)
    GROUPS_PER_PROG: tl.constexpr,  # groups of one token per program (a power of two)
    FP8_MAX: tl.constexpr,
    EPS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    g0 = tl.program_id(1) * GROUPS_PER_PROG
    g = g0 + tl.arange(0, GROUPS_PER_PROG)
    c = tl.arange(0, GROUP)
    col = g[:, None] * GROUP + c[None, :]
    mask = (g[:, None] < groups) & (col < k)
    # Masked-off channels read as 0, so a last, shorter group's amax is over its own channels.
    x = tl.load(x_ptr + token * x_stride + col, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), EPS)
    # div_rn: IEEE division, as torch does; a plain `/` may compile to an approximate one.
    scale = tl.math.div_rn(amax, tl.full([GROUPS_PER_PROG], FP8_MAX, tl.float32))
    # div_rn does not broadcast (it maps to one precise-division op of equal shapes).
    y = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], (GROUPS_PER_PROG, GROUP)))
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    tl.store(q_ptr + token * k + col, y.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + token * groups + g, scale, mask=g < groups)


def quantize_token_groups(
    x: torch.Tensor, group: int = BLOCK, backend: Backend = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q fp8 [T, K], scale fp32 [T, ceil(K/group)]) of a 2-D activation `x` [T, K].

    Triton on CUDA tensors when `group` is 128 (the blockwise path), the reference otherwise
    (backend="triton" forces the kernel, on the CPU only under TRITON_INTERPRET=1).
    """
    if x.dim() != 2:
        raise ValueError(f"activations must be 2-D [tokens, channels], got {tuple(x.shape)}")
    if group < 1:
        raise ValueError(f"group must be positive, got {group}")
    if group != BLOCK or not use_triton([x], backend):
        return quantize_token_groups_reference(x, group)
    if x.stride(1) != 1:
        x = x.contiguous()
    tokens, k = x.shape
    groups = -(-k // group)
    q = torch.empty(tokens, k, dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty(tokens, groups, dtype=torch.float32, device=x.device)
    if tokens == 0 or k == 0:
        return q, scale
    per_prog = min(8, triton.next_power_of_2(groups))
    grid = (tokens, -(-groups // per_prog))
    _token_group_kernel[grid](
        x,
        q,
        scale,
        x.stride(0),
        k,
        groups,
        GROUP=group,
        GROUPS_PER_PROG=per_prog,
        FP8_MAX=FP8_MAX,
        EPS=ACTIVATION_EPS,
        num_warps=4,
    )
    return q, scale


def quantize_token_groups_reference(
    x: torch.Tensor, group: int = BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch, the oracle: the same (q, scale), any device, any group size."""
    tokens, channels = x.shape
    xf = x.float()
    pad = (-channels) % group
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    groups = xf.view(tokens, -1, group)
    amax = groups.abs().amax(dim=-1, keepdim=True).clamp_min(ACTIVATION_EPS)
    scale = amax / torch.full_like(amax, FP8_MAX)  # a true division (see kernels/fp8.py)
    q = (groups / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(tokens, -1)
    return (q[:, :channels] if pad else q), scale.squeeze(-1)


def dequantize_token_groups(q: torch.Tensor, scale: torch.Tensor, group: int) -> torch.Tensor:
    """q * scale, each scale spread over its group: fp32 [T, K]."""
    expanded = scale.repeat_interleave(group, dim=1)[:, : q.shape[1]]
    return q.float() * expanded


__all__ = [
    "ACTIVATION_EPS",
    "dequantize_token_groups",
    "quantize_token_groups",
    "quantize_token_groups_reference",
]

"""The plain-torch references: the oracles every kernel is checked against."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.blockwise import dequantize_blockwise, quantize_blockwise_reference, scale_shape
from kernels.fp8 import BLOCK, FP8_DTYPE, FP8_MAX, FP8_SUBNORMAL_STEP, SCALE_EPS
from kernels.per_channel import dequantize_per_channel, quantize_per_channel_reference
from tests.kernels.shapes import (
    AWKWARD_SHAPES,
    DTYPES,
    REAL_SHAPES,
    SNR_FLOOR_DB,
    make_weight,
    seed_for,
    snr_db,
)

# Bound on |w - dequant(q)| / scale for one element: half an fp8 step. In the normal range
# the step is 2**-3 of the value's binade floor, so half a step is <= 2**-4 * |w| / scale;
# in the subnormal range it is FP8_SUBNORMAL_STEP / 2. A few fp32 ulps cover the scaling.
REL_BOUND = 2.0**-4 * (1 + 2.0**-20)
SUB_BOUND = FP8_SUBNORMAL_STEP / 2 * (1 + 2.0**-20)
# Awkward shapes in every input dtype; real shapes in bf16, what trainers send (the dtype
# paths are the same code, and the large shapes cost seconds each on 2 cores).
CASES = [(s, d) for s in AWKWARD_SHAPES for d in DTYPES] + [
    (s, torch.bfloat16) for s in REAL_SHAPES
]


def _element_error_ok(w32: torch.Tensor, deq: torch.Tensor, scale_full: torch.Tensor) -> bool:
    err = (w32 - deq).abs()
    bound = torch.maximum(w32.abs() * REL_BOUND, scale_full * SUB_BOUND)
    return bool((err <= bound).all())


@pytest.mark.parametrize(("shape", "dtype"), CASES, ids=str)
def test_blockwise_reference(shape, dtype):
    w = make_weight(shape, dtype, seed_for("blockwise-ref", shape, dtype))
    q, scale_inv = quantize_blockwise_reference(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert scale_inv.dtype == torch.float32 and tuple(scale_inv.shape) == scale_shape(*shape)
    assert torch.isfinite(scale_inv).all() and (scale_inv > 0).all()
    # The planted zero block: the floor scale and exact zeros.
    assert scale_inv[0, 0].item() == pytest.approx(SCALE_EPS / FP8_MAX)
    assert (q[:BLOCK, :BLOCK].float() == 0).all()
    # Each non-empty block's largest magnitude maps to exactly 448 (amax * 448/amax rounds there).
    w32 = w.to(torch.bfloat16).float()
    nonzero = scale_inv > SCALE_EPS / FP8_MAX
    mb, nb = scale_inv.shape
    padded = torch.nn.functional.pad(
        q.float(), (0, nb * BLOCK - shape[1], 0, mb * BLOCK - shape[0])
    )
    qmax = padded.view(mb, BLOCK, nb, BLOCK).abs().amax(dim=(1, 3))
    assert (qmax[nonzero] == FP8_MAX).all()
    deq = dequantize_blockwise(q, scale_inv, torch.float32)
    full = scale_inv.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[: shape[0], : shape[1]]
    assert _element_error_ok(w32, deq, full)
    if w32.abs().sum() > 0:
        assert snr_db(w.float(), deq) > SNR_FLOOR_DB
    assert dequantize_blockwise(q, scale_inv).dtype == torch.bfloat16


@pytest.mark.parametrize(("shape", "dtype"), CASES, ids=str)
def test_per_channel_reference(shape, dtype):
    w = make_weight(shape, dtype, seed_for("per-channel-ref", shape, dtype))
    q, scale = quantize_per_channel_reference(w)
    assert q.dtype == FP8_DTYPE and q.shape == w.shape
    assert scale.dtype == torch.float32 and tuple(scale.shape) == (shape[0], 1)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    w32 = w.to(torch.bfloat16).float()
    zero_rows = w32.abs().amax(dim=1) == 0
    assert (scale[zero_rows] == torch.tensor(SCALE_EPS / FP8_MAX)).all()
    assert (q.float().abs().amax(dim=1)[~zero_rows] == FP8_MAX).all()
    deq = dequantize_per_channel(q, scale, torch.float32)
    assert _element_error_ok(w32, deq, scale.expand_as(w32))
    if w32.abs().sum() > 0:
        assert snr_db(w.float(), deq) > SNR_FLOOR_DB


def test_input_is_cast_to_bf16_first():
    # fp32 -> bf16 -> fp8 and fp32 -> fp8 differ on some elements; the reference must take the
    # first path: quantizing the fp32 tensor equals quantizing its bf16 cast, bit for bit.
    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(7))
    for quantize in (quantize_blockwise_reference, quantize_per_channel_reference):
        q32, s32 = quantize(w)
        q16, s16 = quantize(w.to(torch.bfloat16))
        assert torch.equal(q32.view(torch.uint8), q16.view(torch.uint8))
        assert torch.equal(s32, s16)


def test_rejects_bad_input():
    for quantize in (quantize_blockwise_reference, quantize_per_channel_reference):
        with pytest.raises(ValueError, match="2-D"):
            quantize(torch.ones(4, 4, 4))
        with pytest.raises(TypeError, match="bfloat16"):
            quantize(torch.ones(4, 4, dtype=torch.int32))
    q, s = quantize_blockwise_reference(torch.ones(4, 4))
    with pytest.raises(ValueError, match="scale_inv"):
        dequantize_blockwise(q, s.expand(2, 2))
    with pytest.raises(ValueError, match="scale"):
        dequantize_per_channel(q, s)


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(1, 300),
    n=st.integers(1, 300),
    log_scale=st.integers(-30, 30),
    seed=st.integers(0, 2**31 - 1),
)
def test_blockwise_error_bound_property(m, n, log_scale, seed):
    # Any shape, any magnitude (2**-30 .. 2**30): every element within half an fp8 step.
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed)) * 2.0**log_scale
    q, scale_inv = quantize_blockwise_reference(w)
    assert torch.isfinite(scale_inv).all()
    w32 = w.to(torch.bfloat16).float()
    deq = dequantize_blockwise(q, scale_inv, torch.float32)
    full = scale_inv.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:m, :n]
    assert _element_error_ok(w32, deq, full)

"""FP8 activations per token per 128-channel group (kernels/token_group.py): the Triton kernel in
Triton's interpreter against the reference, and the reference against SGLang's definition."""

from __future__ import annotations

import pytest
import torch

from kernels.fp8 import FP8_MAX
from kernels.token_group import (
    dequantize_token_groups,
    quantize_token_groups,
    quantize_token_groups_reference,
)
from tests.kernels.fp8_cast import known_interpreter_misrounding
from tests.kernels.shapes import seed_for

# (tokens, channels): one token, a short last group, more groups than one program takes.
SHAPES = [(1, 128), (7, 300), (33, 1280), (4, 2176)]


def _activations(shape, dtype, seed) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape[0], 1, generator=gen))
    x[0, :128] = 0.0  # an all-zero group
    x[-1, -1] = 3e3  # an outlier in the last (short) group of the last token
    return x.to(dtype)


@pytest.mark.usefixtures("interpreted")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_equals_reference(shape, dtype):
    x = _activations(shape, dtype, seed_for("token_group", shape, dtype))
    q, s = quantize_token_groups(x, backend="triton")
    q_ref, s_ref = quantize_token_groups_reference(x)
    assert torch.equal(s, s_ref)  # the same IEEE divisions, bit for bit
    # The interpreter's fp8 cast misrounds a few values in documented ways (fp8_cast.py); the
    # GPU's cast rounds as torch does.
    scaled = (x.float() / s_ref.repeat_interleave(128, 1)[:, : shape[1]]).clamp(-448, 448)
    differ = q.view(torch.uint8) != q_ref.view(torch.uint8)
    allowed = known_interpreter_misrounding(scaled, q, q_ref)
    assert not bool((differ & ~allowed).any())
    assert float(differ.float().mean()) <= 0.06


def test_reference_is_sglang_per_token_group_quant():
    x = _activations((5, 300), torch.bfloat16, 3)
    q, s = quantize_token_groups_reference(x)
    assert q.shape == (5, 300) and s.shape == (5, 3)  # 128 + 128 + a short group of 44
    assert torch.equal(q[0, :128].float(), torch.zeros(128)) and s[0, 0] > 0  # finite
    for token, group in ((1, 0), (2, 2), (4, 2)):
        values = x[token, group * 128 : (group + 1) * 128].float()
        assert float(s[token, group]) == pytest.approx(float(values.abs().max()) / FP8_MAX)
    back = dequantize_token_groups(q, s, 128)
    peak = x.float().abs().argmax(dim=1)
    rows = torch.arange(5)
    assert torch.allclose(back[rows, peak], x.float()[rows, peak], rtol=2**-4)
    rel = (back - x.float()).abs() / x.float().abs().clamp_min(1e-30)
    normal = x.float().abs() >= s.repeat_interleave(128, 1)[:, :300] * 2.0**-6  # e4m3 normals
    assert float(rel[normal & (x.float() != 0)].max()) <= 2.0**-4 + 1e-6


def test_other_group_sizes_and_the_cpu_use_the_reference():
    x = _activations((3, 200), torch.float32, 4)
    q, s = quantize_token_groups(x, group=200)
    assert s.shape == (3, 1)
    q_ref, s_ref = quantize_token_groups_reference(x, group=200)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    with pytest.raises(ValueError, match="2-D"):
        quantize_token_groups(x[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [*SHAPES, (512, 4096), (512, 12288)])
def test_the_compiled_kernel_equals_the_reference_bit_for_bit_on_the_gpu(shape):
    x = _activations(shape, torch.bfloat16, seed_for("token_group gpu", shape)).cuda()
    q, s = quantize_token_groups(x)
    q_ref, s_ref = quantize_token_groups_reference(x)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))

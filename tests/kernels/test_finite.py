"""find_non_finite: NaN and Inf are found by tensor name, before anything is quantized."""

from __future__ import annotations

import torch

from kernels.finite import find_non_finite
from tests.kernels.shapes import seed_for


def test_names_exactly_the_bad_tensors():
    g = torch.Generator().manual_seed(seed_for("finite"))
    named = {f"layer.{i}.weight": torch.randn(64, 96, generator=g) for i in range(6)}
    named["layer.1.weight"][3, 5] = float("nan")
    named["layer.3.weight"] = named["layer.3.weight"].to(torch.bfloat16)
    named["layer.3.weight"][63, 95] = float("-inf")
    named["layer.4.weight"] = named["layer.4.weight"].half()
    named["layer.4.weight"][0, 0] = float("inf")
    named["layer.5.weight"][10, 10] = 3.4e38  # finite in fp32, Inf once cast to bf16
    named["ids"] = torch.arange(10)  # integers hold no NaN
    named["empty"] = torch.empty(0, 4)
    assert find_non_finite(named) == ["layer.1.weight", "layer.3.weight", "layer.4.weight",
                                      "layer.5.weight"]  # fmt: skip


def test_clean_model_gives_no_names():
    g = torch.Generator().manual_seed(seed_for("finite-clean"))
    named = {f"w{i}": torch.randn(32, 32, generator=g) * 1e30 for i in range(4)}
    named["fp8"] = torch.randn(8, 8, generator=g).to(torch.float8_e4m3fn)
    assert find_non_finite(named) == []

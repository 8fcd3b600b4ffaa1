"""Detect NaN and Inf before anything is quantized: an update holding one is rejected whole."""

from __future__ import annotations

from collections.abc import Mapping

import torch

_REDUCIBLE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def find_non_finite(named: Mapping[str, torch.Tensor]) -> list[str]:
    """Names (in the mapping's order) of floating-point tensors that hold NaN or Inf, or a
    value that becomes Inf when cast to bf16, the quantizers' first step.

    One min/max reduction per tensor (min and max propagate NaN and reach any Inf) and one
    device-to-host transfer per device for all of them, so no full-size temporary and no
    sync per tensor. A value overflows in bf16 exactly when the largest magnitude does
    (rounding is monotone), so casting the two extremes tells.
    """
    flags: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in named.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        x = t if t.dtype in _REDUCIBLE else t.float()
        lo, hi = torch.aminmax(x)
        extremes = torch.stack([lo, hi]).to(torch.bfloat16)
        flags.setdefault(t.device, []).append((name, ~torch.isfinite(extremes).all()))
    bad: set[str] = set()
    for entries in flags.values():
        values = torch.stack([flag for _, flag in entries]).tolist()
        bad.update(name for (name, _), is_bad in zip(entries, values, strict=True) if is_bad)
    return [name for name in named if name in bad]

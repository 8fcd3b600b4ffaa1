"""Quantize many tensors per launch: a whole model's linear weights in one (blockwise) or a few
(per-channel) Triton launches instead of one launch per tensor.

On the H200 one Triton launch from Python costs about 26 us; 252 of them (Qwen3-8B's linear
weights) would cost about 6.5 ms, as much as the quantization itself.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from kernels.blockwise import Backend, launch_blockwise, quantize_blockwise_reference, use_triton
from kernels.config import BlockwiseConfig, PerChannelConfig
from kernels.fp8 import check_weight
from kernels.per_channel import launch_per_channel, quantize_per_channel_reference

Pair = tuple[torch.Tensor, torch.Tensor]


def _many(
    ws: Sequence[torch.Tensor],
    backend: Backend,
    launch: Callable[[list[torch.Tensor]], list[Pair]],
    reference: Callable[[torch.Tensor], Pair],
) -> list[Pair]:
    for i, w in enumerate(ws):
        check_weight(w, what=f"tensor {i}")
    out: list[Pair | None] = [None] * len(ws)
    by_device: dict[torch.device, list[int]] = {}
    for i, w in enumerate(ws):
        by_device.setdefault(w.device, []).append(i)
    for idx in by_device.values():
        group = [ws[i] for i in idx]
        results = launch(group) if use_triton(group, backend) else [reference(w) for w in group]
        for i, pair in zip(idx, results, strict=True):
            out[i] = pair
    return [pair for pair in out if pair is not None]


def quantize_blockwise_many(
    ws: Sequence[torch.Tensor], backend: Backend = "auto", config: BlockwiseConfig | None = None
) -> list[Pair]:
    """Blockwise FP8 of every tensor: [(q fp8 [M, N], scale_inv fp32 [Mb, Nb])], in order.

    CUDA tensors of one device share one launch (two if some rows are not 16-byte aligned);
    their q (and scales) are views into one buffer. CPU tensors go through the reference
    unless backend="triton" (the interpreter).
    """
    return _many(ws, backend, lambda g: launch_blockwise(g, config), quantize_blockwise_reference)


def quantize_per_channel_many(
    ws: Sequence[torch.Tensor], backend: Backend = "auto", config: PerChannelConfig | None = None
) -> list[Pair]:
    """Per-output-channel FP8 of every tensor: [(q fp8 [M, N], scale fp32 [M, 1])], in order.

    CUDA tensors of one device share one launch per row-width class (a few per model).
    """
    return _many(
        ws, backend, lambda g: launch_per_channel(g, config), quantize_per_channel_reference
    )

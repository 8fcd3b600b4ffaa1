"""Per-output-channel FP8 e4m3fn quantization: Triton kernel, launcher, plain-torch reference,
dequantization. The fallback for tensors (or TP shards, or fused parts) that are not multiples
of 128.

scale = amax(|row|) / 448 (fp32, [M, 1]); q = clamp(x * (448 / amax), -448, 448) cast to
e4m3fn, the same arithmetic as the blockwise kernel (kernels/fp8.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import triton
import triton.language as tl

from kernels import _tables
from kernels.blockwise import Backend, QuantizeCall, use_triton
from kernels.config import PerChannelConfig, configs_for_tensor
from kernels.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    SCALE_EPS,
    cdiv,
    check_weight,
    scale_and_clamp,
    scale_from_amax,
    to_bf16,
)


@triton.jit
def _per_channel_fp8_kernel(
    x_ptr,  # bf16: the launch's base input; tensor t starts at x_ptr + meta[t, X_OFF]
    q_ptr,  # (Q,) fp8 e4m3fn: every output of the call; tensor t's [M, N] at meta[t, Q_OFF]
    s_ptr,  # (S,) fp32: every scale of the call; tensor t's [M] at meta[t, S_OFF]
    meta_ptr,  # (T, 8) int64: x_off, q_off, s_off, M, N, first row group, -, -
    group_tensor_ptr,  # (num_groups,) int32: meta row of each group of ROWS rows
    ROWS: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns per load: >= N when SINGLE_PASS, else a chunk
    SINGLE_PASS: tl.constexpr,  # whole rows fit in registers: read each element once
    ALIGNED: tl.constexpr,  # every tensor's rows start on 16 bytes (see _tables.is_aligned)
    FP8_MAX: tl.constexpr,
    SCALE_EPS: tl.constexpr,
):
    g = tl.program_id(0)
    meta = meta_ptr + tl.load(group_tensor_ptr + g).to(tl.int64) * 8
    x_off = tl.load(meta + 0)
    q_off = tl.load(meta + 1)
    s_off = tl.load(meta + 2)
    m = tl.load(meta + 3)
    n = tl.load(meta + 4)
    row0 = (g - tl.load(meta + 5)) * ROWS
    n32 = n.to(tl.int32)
    if ALIGNED:
        # Offsets read from a table carry no alignment facts; without these hints the compiler
        # emits 2-byte loads and 1-byte stores instead of 16-byte ones.
        x_off = tl.multiple_of(x_off, 16)
        q_off = tl.multiple_of(q_off, 16)
        n = tl.multiple_of(n, 16)
        n32 = tl.multiple_of(n32, 16)
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < m - row0
    start = row0 * n  # int64: the group's first element may lie past 2**31
    x_rows = x_ptr + (x_off + start)
    q_rows = q_ptr + (q_off + start)
    fp8_max = tl.full([ROWS], FP8_MAX, tl.float32)
    if SINGLE_PASS:
        inner = rows[:, None] * n32 + cols[None, :]
        mask = row_ok[:, None] & (cols[None, :] < n32)
        x = tl.load(x_rows + inner, mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), SCALE_EPS)
        # div_rn: IEEE division, as torch does (a plain `/` may be approximate).
        scale = tl.math.div_rn(amax, fp8_max)
        multiplier = tl.math.div_rn(fp8_max, amax)
        y = tl.minimum(tl.maximum(x * multiplier[:, None], -FP8_MAX), FP8_MAX)
        tl.store(q_rows + inner, y.to(tl.float8e4nv), mask=mask)
    else:
        # Rows too wide for registers: an amax pass, then a scaling pass that re-reads the
        # rows, mostly from L2 (a program's rows were read moments before).
        amax = tl.zeros([ROWS], dtype=tl.float32)
        for c0 in range(0, n32, BLOCK_N):
            inner = rows[:, None] * n32 + (c0 + cols)[None, :]
            mask = row_ok[:, None] & ((c0 + cols)[None, :] < n32)
            x = tl.load(x_rows + inner, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        amax = tl.maximum(amax, SCALE_EPS)
        scale = tl.math.div_rn(amax, fp8_max)
        multiplier = tl.math.div_rn(fp8_max, amax)
        for c0 in range(0, n32, BLOCK_N):
            inner = rows[:, None] * n32 + (c0 + cols)[None, :]
            mask = row_ok[:, None] & ((c0 + cols)[None, :] < n32)
            x = tl.load(x_rows + inner, mask=mask, other=0.0).to(tl.float32)
            y = tl.minimum(tl.maximum(x * multiplier[:, None], -FP8_MAX), FP8_MAX)
            tl.store(q_rows + inner, y.to(tl.float8e4nv), mask=mask)
    tl.store(s_ptr + s_off + row0 + rows, scale, mask=row_ok)


def _tile(n: int, cfg: PerChannelConfig) -> tuple[int, int, bool]:
    """(ROWS, BLOCK_N, SINGLE_PASS) for rows of n elements."""
    width = triton.next_power_of_2(n)
    if width <= cfg.max_single_pass_n:
        return max(1, cfg.tile_elems // width), width, True
    return max(1, cfg.tile_elems // cfg.chunk_n), cfg.chunk_n, False


@_tables.cached_layout
def _per_channel_layout(
    key: tuple[tuple[int, int, bool], ...], cfg: PerChannelConfig, device: torch.device
) -> _tables.Layout:
    shapes = [(m, n) for m, n, _ in key]
    tiles = [_tile(n, cfg) for _, n in shapes]
    launch_keys = [
        (aligned, tile) if m * n else None for (m, n, aligned), tile in zip(key, tiles, strict=True)
    ]
    groups = [cdiv(m, tile[0]) for (m, _), tile in zip(shapes, tiles, strict=True)]
    return _tables.build_layout(shapes, launch_keys, [m for m, _ in shapes], groups, device)


class PerChannelCall(QuantizeCall[PerChannelConfig]):
    """Per-channel: one launch per (alignment, row tile) class, a few per model (Qwen3-8B: rows
    of 4096 and of 12288, so two); scale [M, 1]."""

    @staticmethod
    def _scale_shape(m: int, n: int) -> tuple[int, int]:
        return m, 1

    def _default_config(self, w: torch.Tensor) -> PerChannelConfig:
        return configs_for_tensor(w).per_channel

    def _layout(
        self, key: tuple[tuple[int, int, bool], ...], device: torch.device
    ) -> _tables.Layout:
        return _per_channel_layout(key, self.cfg, device)

    def launch(self) -> None:
        for group, meta in zip(self.layout.groups, self.metas, strict=True):
            key = cast(tuple[bool, tuple[int, int, bool]], group.key)
            aligned, (rows_per_prog, block_n, single_pass) = key
            _per_channel_fp8_kernel[(group.num_units,)](
                self.ws[group.idx[0]],
                self.q_flat,
                self.s_flat,
                meta,
                group.units,
                ROWS=rows_per_prog,
                BLOCK_N=block_n,
                SINGLE_PASS=single_pass,
                ALIGNED=aligned,
                FP8_MAX=FP8_MAX,
                SCALE_EPS=SCALE_EPS,
                num_warps=self.cfg.num_warps,
            )


def launch_per_channel(
    ws: Sequence[torch.Tensor], config: PerChannelConfig | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Quantize 2-D tensors of one device in a few launches (see PerChannelCall). Outputs are
    views into one fp8 and one fp32 buffer for the whole call."""
    return PerChannelCall.run(ws, config)


def quantize_per_channel(
    w: torch.Tensor, backend: Backend = "auto", config: PerChannelConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel FP8: (q fp8 [M, N], scale fp32 [M, 1]).

    Triton on CUDA tensors, the reference on CPU tensors; backend="triton" forces the kernel
    (on the CPU only under TRITON_INTERPRET=1). For many tensors use
    `kernels.grouped.quantize_per_channel_many`.
    """
    check_weight(w)
    if not use_triton([w], backend):
        return quantize_per_channel_reference(w)
    return launch_per_channel([w], config)[0]


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

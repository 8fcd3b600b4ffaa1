"""Blockwise 128x128 FP8 e4m3fn quantization: Triton kernel, launcher, plain-torch reference,
dequantization.

scale_inv = amax / 448 per block (fp32), q = clamp(x * (448 / amax), -448, 448) cast to e4m3fn
with round-to-nearest-even. The kernel and the reference follow kernels/fp8.py op for op, so
that they agree bit for bit on the GPU.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Generic, Literal, TypeVar

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import _tables
from kernels.config import BlockwiseConfig, PerChannelConfig, configs_for_tensor
from kernels.fp8 import (
    BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    SCALE_EPS,
    cdiv,
    check_weight,
    scale_and_clamp,
    scale_from_amax,
    to_bf16,
)

Backend = Literal["auto", "triton", "reference"]
ConfigT = TypeVar("ConfigT", BlockwiseConfig, PerChannelConfig)


@triton.jit
def _blockwise_fp8_kernel(
    x_ptr,  # bf16: the launch's base input; tensor t starts at x_ptr + meta[t, X_OFF]
    q_ptr,  # (Q,) fp8 e4m3fn: every output of the call; tensor t's [M, N] at meta[t, Q_OFF]
    s_ptr,  # (S,) fp32: every scale of the call; tensor t's [Mb, Nb] at meta[t, S_OFF]
    meta_ptr,  # (T, 8) int64: x_off, q_off, s_off, M, N, first block, -, -
    block_tensor_ptr,  # (num_blocks,) int32: meta row of each block of this launch
    num_blocks,  # blocks in this launch
    BLOCK_SIZE: tl.constexpr,  # 128: the quantization block is BLOCK_SIZE x BLOCK_SIZE
    BLOCKS_PER_PROG: tl.constexpr,  # consecutive blocks each program takes
    ALIGNED: tl.constexpr,  # every tensor's rows start on 16 bytes (see _tables.is_aligned)
    FP8_MAX: tl.constexpr,
    SCALE_EPS: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_SIZE)
    cols = tl.arange(0, BLOCK_SIZE)
    for i in tl.static_range(BLOCKS_PER_PROG):
        b = pid * BLOCKS_PER_PROG + i
        if b < num_blocks:
            meta = meta_ptr + tl.load(block_tensor_ptr + b).to(tl.int64) * 8
            x_off = tl.load(meta + 0)
            q_off = tl.load(meta + 1)
            s_off = tl.load(meta + 2)
            m = tl.load(meta + 3)
            n = tl.load(meta + 4)
            local = b - tl.load(meta + 5)
            n32 = n.to(tl.int32)
            if ALIGNED:
                # Offsets read from a table carry no alignment facts; without these hints the
                # compiler emits 2-byte loads and 1-byte stores instead of 16-byte ones.
                x_off = tl.multiple_of(x_off, 16)
                q_off = tl.multiple_of(q_off, 16)
                n = tl.multiple_of(n, 16)
                n32 = tl.multiple_of(n32, 16)
            # Block coordinates in int32 (a tensor has far fewer than 2**31 blocks): a 64-bit
            # division is a long instruction sequence.
            local32 = local.to(tl.int32)
            blocks_n = tl.cdiv(n32, BLOCK_SIZE)
            bm = local32 // blocks_n
            bn = local32 - bm * blocks_n
            row0 = bm.to(tl.int64) * BLOCK_SIZE
            col0 = bn * BLOCK_SIZE
            # Block-relative offsets fit in int32 (127 * N + 127); the block's start may not.
            inner = rows[:, None] * n32 + cols[None, :]
            mask = (rows[:, None] < m - row0) & (cols[None, :] < n - col0)
            start = row0 * n + col0
            # Masked-off elements read as 0, so an edge block's amax is over valid ones only.
            x = tl.load(x_ptr + (x_off + start) + inner, mask=mask, other=0.0).to(tl.float32)
            amax = tl.maximum(tl.max(tl.abs(x)), SCALE_EPS)
            # div_rn: IEEE division, as torch does; a plain `/` may compile to an approximate
            # division and break bit-exactness with the reference.
            scale_inv = tl.math.div_rn(amax, FP8_MAX)
            multiplier = tl.math.div_rn(tl.full([], FP8_MAX, tl.float32), amax)
            y = tl.minimum(tl.maximum(x * multiplier, -FP8_MAX), FP8_MAX)
            tl.store(q_ptr + (q_off + start) + inner, y.to(tl.float8e4nv), mask=mask)
            tl.store(s_ptr + s_off + local, scale_inv)


def scale_shape(m: int, n: int) -> tuple[int, int]:
    """Shape of `scale_inv` for an [m, n] weight."""
    return cdiv(m, BLOCK), cdiv(n, BLOCK)


def kernel_is_interpreted() -> bool:
    """True when TRITON_INTERPRET=1 was set before this module was imported (Triton decides
    at decoration time), so that the kernel also runs on CPU tensors."""
    return type(_blockwise_fp8_kernel).__name__ == "InterpretedFunction"


def use_triton(ws: Sequence[torch.Tensor], backend: Backend) -> bool:
    """Resolve a backend: "auto" is Triton for CUDA tensors and the reference on the CPU."""
    if backend == "reference":
        return False
    on_cuda = all(w.device.type == "cuda" for w in ws)
    if backend == "auto":
        return on_cuda
    if backend != "triton":
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    if not on_cuda and not kernel_is_interpreted():
        raise RuntimeError(
            "the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
            "kernels is imported to run them on the CPU"
        )
    return True


@_tables.cached_layout
def _blockwise_layout(
    key: tuple[tuple[int, int, bool], ...], device: torch.device
) -> _tables.Layout:
    shapes = [(m, n) for m, n, _ in key]
    blocks = [mb * nb for mb, nb in (scale_shape(m, n) for m, n in shapes)]
    launch_keys = [aligned if m * n else None for m, n, aligned in key]
    return _tables.build_layout(shapes, launch_keys, blocks, blocks, device)


class QuantizeCall(ABC, Generic[ConfigT]):
    """One quantization call made ready: inputs cast to bf16, the layout looked up (cached per
    list of shapes), its tables on the GPU, one fp8 and one fp32 output buffer allocated.
    `launch()` runs the kernels; `outputs()` gives each tensor's (q, scales) as views of the two
    buffers. A scheme says only what differs: its config, its layout, its launch, its scales."""

    def __init__(self, ws: Sequence[torch.Tensor], config: ConfigT | None = None) -> None:
        self.ws: list[torch.Tensor] = [to_bf16(t) for t in ws]
        if not self.ws:
            raise ValueError("nothing to quantize")
        device = self.ws[0].device
        if any(t.device != device for t in self.ws):
            raise ValueError("one call takes tensors of one device; group them first")
        self.cfg: ConfigT = config or self._default_config(self.ws[0])
        key = tuple((t.shape[0], t.shape[1], _tables.is_aligned(t)) for t in self.ws)
        self.layout = self._layout(key, device)
        self.q_flat = torch.empty(self.layout.q_total, dtype=FP8_DTYPE, device=device)
        self.s_flat = torch.empty(self.layout.s_total, dtype=torch.float32, device=device)
        self.metas = [_tables.meta_for(g, self.ws) for g in self.layout.groups]

    @classmethod
    def run(
        cls, ws: Sequence[torch.Tensor], config: ConfigT | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Prepare, launch and return the outputs ([] for no tensors)."""
        if not ws:
            return []
        call = cls(ws, config)
        call.launch()
        return call.outputs()

    def outputs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(q [M, N], scales)]: views into the call's two buffers."""
        return _tables.output_views(self.layout, self.q_flat, self.s_flat, self._scale_shape)

    @abstractmethod
    def launch(self) -> None:
        """Run the kernels: one launch per group of the layout."""

    @staticmethod
    @abstractmethod
    def _scale_shape(m: int, n: int) -> tuple[int, int]: ...

    @abstractmethod
    def _default_config(self, w: torch.Tensor) -> ConfigT: ...

    @abstractmethod
    def _layout(
        self, key: tuple[tuple[int, int, bool], ...], device: torch.device
    ) -> _tables.Layout: ...


class BlockwiseCall(QuantizeCall[BlockwiseConfig]):
    """Blockwise: at most two launches (16-byte aligned rows and the others); scale_inv
    [Mb, Nb]."""

    _scale_shape = staticmethod(scale_shape)

    def _default_config(self, w: torch.Tensor) -> BlockwiseConfig:
        return configs_for_tensor(w).blockwise

    def _layout(
        self, key: tuple[tuple[int, int, bool], ...], device: torch.device
    ) -> _tables.Layout:
        return _blockwise_layout(key, device)

    def launch(self) -> None:
        for group, meta in zip(self.layout.groups, self.metas, strict=True):
            _blockwise_fp8_kernel[(cdiv(group.num_units, self.cfg.blocks_per_prog),)](
                self.ws[group.idx[0]],
                self.q_flat,
                self.s_flat,
                meta,
                group.units,
                group.num_units,
                BLOCK_SIZE=BLOCK,
                BLOCKS_PER_PROG=self.cfg.blocks_per_prog,
                ALIGNED=group.key,
                FP8_MAX=FP8_MAX,
                SCALE_EPS=SCALE_EPS,
                num_warps=self.cfg.num_warps,
            )


def launch_blockwise(
    ws: Sequence[torch.Tensor], config: BlockwiseConfig | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Quantize 2-D tensors of one device in one launch (two if some rows are not 16-byte
    aligned). Outputs are views into one fp8 and one fp32 buffer for the whole call."""
    return BlockwiseCall.run(ws, config)


def quantize_blockwise(
    w: torch.Tensor, backend: Backend = "auto", config: BlockwiseConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise FP8: (q fp8 [M, N], scale_inv fp32 [ceil(M/128), ceil(N/128)]).

    Triton on CUDA tensors, the reference on CPU tensors; backend="triton" forces the kernel
    (on the CPU only under TRITON_INTERPRET=1). Quantize a whole model with
    `kernels.grouped.quantize_blockwise_many`: one launch instead of one per tensor.
    """
    check_weight(w)
    if not use_triton([w], backend):
        return quantize_blockwise_reference(w)
    return launch_blockwise([w], config)[0]


def _reference_scaled(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference up to (not including) the fp8 cast: (fp32 values in [-448, 448], scale_inv).

    Kept apart so that tests can cast these values with Triton's own cast and compare the rest
    of a kernel's arithmetic exactly (see tests/kernels).
    """
    x = to_bf16(w).float()
    m, n = x.shape
    mb, nb = scale_shape(m, n)
    # Zero padding never changes an amax (|x| >= 0), so an edge block's amax is taken over its
    # valid elements only. view(mb, 128, nb, 128) is today's RL code's reshape/permute without
    # the permute: reducing over dims (1, 3) is the same per-block amax.
    blocks = F.pad(x, (0, nb * BLOCK - n, 0, mb * BLOCK - m)).view(mb, BLOCK, nb, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv, multiplier = scale_from_amax(amax)
    scaled = scale_and_clamp(blocks, multiplier[:, None, :, None])
    return scaled.view(mb * BLOCK, nb * BLOCK)[:m, :n], scale_inv


def quantize_blockwise_reference(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch blockwise quantization, the oracle: (q fp8 [M, N], scale_inv fp32 [Mb, Nb]).

    `w` is 2-D fp32/fp16/bf16 on any device; it is cast to bf16 first. `w ≈ q * scale_inv`
    per 128x128 block, with scale_inv = amax / 448 (an all-zero block gets a tiny finite scale
    and q = 0).
    """
    scaled, scale_inv = _reference_scaled(w)
    return scaled.to(FP8_DTYPE).contiguous(), scale_inv


def dequantize_blockwise(
    q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """q * scale_inv, each scale spread over its 128x128 block; returns `dtype` [M, N]."""
    if q.dim() != 2 or q.dtype != FP8_DTYPE:
        raise ValueError(f"q must be 2-D {FP8_DTYPE}, got {q.dtype} {tuple(q.shape)}")
    m, n = q.shape
    if tuple(scale_inv.shape) != scale_shape(m, n):
        raise ValueError(
            f"scale_inv for a {m}x{n} weight must be {scale_shape(m, n)}, "
            f"got {tuple(scale_inv.shape)}"
        )
    full = scale_inv.float().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:m, :n]
    return (q.float() * full).to(dtype)

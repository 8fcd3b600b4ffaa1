"""How far shipped weights are from the weights they were made from, in one pass: Triton kernel,
launcher, plain-torch reference.

For every unit (a 128x128 block of a blockwise weight; a row of a per-channel weight or of an
unquantized tensor) the relative RMS error

    ||dequant(shipped) - bf16(ref)|| / ||bf16(ref)||

with 0/0 = 0, x/0 = inf and a non-finite error (a NaN or Inf scale, an overflow) = inf, so a max
over units always sees a broken one. The reference is bf16: the quantizers' own input
(kernels/fp8.py, to_bf16), cast by the caller (Triton's interpreter truncates where the GPU rounds
to nearest, so the cast is not done in the kernel). The kernel reads the reference, the shipped
data and the scales once and writes two fp32 sums per unit (squared error, squared reference);
many tensors share one launch through a table of their addresses, as the quantizers do. The ratio
is taken in torch, after the pieces of a row split over several items (a row-parallel weight's
ranks) are added up.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.blockwise import Backend, use_triton
from kernels.fp8 import BLOCK, FP8_DTYPE, cdiv

# Columns of the meta table (int64, one row per item of a launch).
# ref offset, ref row stride, shipped offset and row stride, scale offset and row stride (all in
# elements of their own dtype), M, N, first error, first program, two unused: 96 bytes a row.
META_COLS = 12

# Rows per program in the row modes, and columns read per step: 32 x 128 fp32 values per tile.
_ROWS = 32


class Unit(enum.IntEnum):
    """What one error covers, and how the shipped tensor is scaled."""

    BLOCKS = 0  # fp8 with one scale per 128x128 block: one error per block
    ROWS = 1  # fp8 with one scale per row: one error per row
    PLAIN = 2  # unscaled (bf16 shipped as is): one error per row


@dataclass(frozen=True)
class Item:
    """One tensor to check: `ref` (bf16) and `got` 2-D [M, N] with unit column stride (rows may
    be strided: a TP piece of a larger tensor); `scale` [ceil(M/128), ceil(N/128)] for BLOCKS,
    [M, 1] for ROWS, None for PLAIN."""

    ref: torch.Tensor
    got: torch.Tensor
    scale: torch.Tensor | None
    unit: Unit
    # Index of an earlier item (of the same call, ROWS or PLAIN, with as many rows) that this
    # item's rows belong to: the column pieces of a row-parallel weight make one row together,
    # and a row is judged whole (a piece holding only a row's tiny values would otherwise be
    # judged alone against the row's scale). This item's own units then read 0.
    adds_to: int | None = None

    def units(self) -> int:
        m, n = self.ref.shape
        return cdiv(m, BLOCK) * cdiv(n, BLOCK) if self.unit is Unit.BLOCKS else m


@triton.jit
def _weight_error_kernel(
    ref_ptr,  # bf16 base of this launch's references; item t at meta[t, REF_OFF]
    got_ptr,  # base of the shipped tensors (fp8, or bf16 for PLAIN); item t at meta[t, GOT_OFF]
    s_ptr,  # fp32 base of the scales; item t's at meta[t, S_OFF] (unread for PLAIN)
    sums_ptr,  # (2, U) fp32: every unit's squared error, then squared reference; item t's at
    # meta[t, ERR_OFF] in each row
    units,  # U
    meta_ptr,  # (T, META_COLS) int64: offsets (elements), row strides, M, N, first program
    prog_item_ptr,  # (programs,) int32: meta row of each program
    UNIT: tl.constexpr,  # a Unit value
    ROWS: tl.constexpr,  # rows per program: BLOCK_N for BLOCKS, a row group otherwise
    BLOCK_N: tl.constexpr,  # columns per step (128: a block's width)
    ALIGNED: tl.constexpr,  # every offset, row stride and width a multiple of 16 elements
    META_COLS: tl.constexpr,
):
    pid = tl.program_id(0)
    meta = meta_ptr + tl.load(prog_item_ptr + pid).to(tl.int64) * META_COLS
    ref_off = tl.load(meta + 0)
    ref_stride = tl.load(meta + 1).to(tl.int32)
    got_off = tl.load(meta + 2)
    got_stride = tl.load(meta + 3).to(tl.int32)
    s_off = tl.load(meta + 4)
    s_stride = tl.load(meta + 5)
    m = tl.load(meta + 6).to(tl.int32)
    n = tl.load(meta + 7).to(tl.int32)
    err_off = tl.load(meta + 8)
    local = (pid - tl.load(meta + 9)).to(tl.int32)
    if ALIGNED:
        # Offsets read from a table carry no alignment facts; without these hints the compiler
        # emits 2-byte loads instead of 16-byte ones, and the pass runs at a fraction of HBM
        # bandwidth (as in kernels/blockwise.py).
        ref_off = tl.multiple_of(ref_off, 16)
        got_off = tl.multiple_of(got_off, 16)
        ref_stride = tl.multiple_of(ref_stride, 16)
        got_stride = tl.multiple_of(got_stride, 16)
        n = tl.multiple_of(n, 16)
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    # In-tile offsets in int32 (ROWS rows of a stride below 2**24); the tile's start in int64.
    r_inner = rows[:, None] * ref_stride + cols[None, :]
    g_inner = rows[:, None] * got_stride + cols[None, :]
    if UNIT == 0:
        # One program per block: `local` counts blocks row-major over the item's block grid.
        blocks_n = tl.cdiv(n, BLOCK_N)
        bm = local // blocks_n
        bn = local - bm * blocks_n
        row0 = bm * ROWS
        col0 = bn * BLOCK_N
        mask = (rows[:, None] < m - row0) & (cols[None, :] < n - col0)
        r_start = ref_off + row0.to(tl.int64) * ref_stride + col0
        g_start = got_off + row0.to(tl.int64) * got_stride + col0
        ref = tl.load(ref_ptr + r_start + r_inner, mask=mask, other=0.0).to(tl.float32)
        got = tl.load(got_ptr + g_start + g_inner, mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(s_ptr + s_off + bm * s_stride + bn)
        diff = tl.where(mask, got * scale - ref, 0.0)
        num = tl.sum(tl.sum(diff * diff, axis=1), axis=0)
        den = tl.sum(tl.sum(ref * ref, axis=1), axis=0)
        tl.store(sums_ptr + err_off + local, num)
        tl.store(sums_ptr + units + err_off + local, den)
    else:
        row0 = local * ROWS
        row_ok = rows < m - row0
        if UNIT == 1:
            scale = tl.load(s_ptr + s_off + (row0 + rows) * s_stride, mask=row_ok, other=0.0)
        else:
            scale = tl.full([ROWS], 1.0, tl.float32)
        num = tl.zeros([ROWS], dtype=tl.float32)
        den = tl.zeros([ROWS], dtype=tl.float32)
        r_row = ref_ptr + ref_off + row0.to(tl.int64) * ref_stride
        g_row = got_ptr + got_off + row0.to(tl.int64) * got_stride
        for c0 in range(0, n, BLOCK_N):
            mask = row_ok[:, None] & ((c0 + cols)[None, :] < n)
            ref = tl.load(r_row + c0 + r_inner, mask=mask, other=0.0).to(tl.float32)
            got = tl.load(g_row + c0 + g_inner, mask=mask, other=0.0).to(tl.float32)
            diff = tl.where(mask, got * scale[:, None] - ref, 0.0)
            num += tl.sum(diff * diff, axis=1)
            den += tl.sum(ref * ref, axis=1)
        tl.store(sums_ptr + err_off + row0 + rows, num, mask=row_ok)
        tl.store(sums_ptr + units + err_off + row0 + rows, den, mask=row_ok)


def weight_errors(
    items: Sequence[Item], backend: Backend = "auto"
) -> tuple[torch.Tensor, list[int]]:
    """Every unit's error of every item, in one fp32 tensor, and where each item's units start
    (plus the total at the end). Triton for CUDA tensors, the reference otherwise; items of one
    unit kind and dtypes share a launch. Nothing waits for the device."""
    for i, item in enumerate(items):
        _check(item)
        owner = item.adds_to
        if owner is not None and not (
            0 <= owner < i
            and items[owner].adds_to is None
            and items[owner].unit is not Unit.BLOCKS
            and items[owner].ref.shape[0] == item.ref.shape[0]
        ):
            raise ValueError(f"item {i} adds to item {owner}, which is not an earlier row item")
    starts = [0]
    for item in items:
        starts.append(starts[-1] + item.units())
    if not items:
        return torch.empty(0), starts
    device = items[0].ref.device
    if any(t.device != device for i in items for t in (i.ref, i.got)):
        raise ValueError("one call takes tensors of one device")
    total = starts[-1]
    sums = torch.empty(2, total, dtype=torch.float32, device=device)
    if not use_triton([i.ref for i in items], backend):
        for item, start in zip(items, starts, strict=False):
            sums[:, start : start + item.units()] = torch.stack(_sums_reference(item))
    else:
        groups: dict[tuple[Unit, torch.dtype, torch.dtype, bool], list[int]] = {}
        for i, item in enumerate(items):
            if item.units():
                key = (item.unit, item.ref.dtype, item.got.dtype, _aligned(item))
                groups.setdefault(key, []).append(i)
        for (unit, _, _, aligned), idx in groups.items():
            _launch(unit, aligned, [items[i] for i in idx], [starts[i] for i in idx], sums)
    merged = [(i, item.adds_to) for i, item in enumerate(items) if item.adds_to is not None]
    if merged:
        # Each merged item's units point at its owner's; everything else at itself.
        target = torch.arange(total)
        for i, owner in merged:
            target[starts[i] : starts[i + 1]] = torch.arange(starts[owner], starts[owner + 1])
        whole = torch.zeros_like(sums)
        sums = whole.index_add_(1, target.to(device, non_blocking=True), sums)
    return _relative(sums[0], sums[1]), starts


def _aligned(item: Item) -> bool:
    """Whether the kernel may assume 16-element aligned rows: every row of the reference and of
    the shipped tensor starts on 16 elements from a 16-byte aligned base, and the width is a
    multiple of 16. The launch's base pointers are the first item's, which Triton checks."""
    ref, got = item.ref, item.got
    return (
        ref.shape[1] % 16 == 0
        and ref.data_ptr() % 32 == 0  # 16 bf16 elements
        and got.data_ptr() % (16 * got.element_size()) == 0
        and ref.stride(0) % 16 == 0
        and got.stride(0) % 16 == 0
    )


def _launch(
    unit: Unit, aligned: bool, items: list[Item], err_offs: list[int], sums: torch.Tensor
) -> None:
    ref0, got0 = items[0].ref, items[0].got
    # PLAIN items have no scale; the kernel never reads it, any fp32 tensor will do as the base.
    scales = [i.scale if i.scale is not None else sums for i in items]
    s0 = scales[0]
    rows_per_prog = BLOCK if unit is Unit.BLOCKS else _ROWS
    shapes = tuple(
        (*i.ref.shape, cdiv(i.ref.shape[0], BLOCK) * cdiv(i.ref.shape[1], BLOCK))
        if unit is Unit.BLOCKS
        else (*i.ref.shape, cdiv(i.ref.shape[0], _ROWS))
        for i in items
    )
    firsts, prog_items = _programs(tuple(s[2] for s in shapes), sums.device)
    rows = []
    for item, scale, err_off, first in zip(items, scales, err_offs, firsts, strict=True):
        rows.append(
            [
                _offset(item.ref, ref0),
                item.ref.stride(0),
                _offset(item.got, got0),
                item.got.stride(0),
                _offset(scale, s0),
                scale.stride(0),
                item.ref.shape[0],
                item.ref.shape[1],
                err_off,
                first,
                0,
                0,
            ]
        )
    meta = torch.tensor(rows, dtype=torch.int64)
    if sums.device.type == "cuda":
        meta = meta.pin_memory().to(sums.device, non_blocking=True)
    _weight_error_kernel[(prog_items.numel(),)](
        ref0,
        got0,
        s0,
        sums,
        sums.shape[1],
        meta,
        prog_items,
        UNIT=int(unit),
        ROWS=rows_per_prog,
        BLOCK_N=BLOCK,
        ALIGNED=aligned,
        META_COLS=META_COLS,
        num_warps=8 if unit is Unit.BLOCKS else 4,
    )


@functools.lru_cache(maxsize=64)
def _programs(counts: tuple[int, ...], device: torch.device) -> tuple[list[int], torch.Tensor]:
    """First program of each item, and each program's item (int32 on `device`): the same for
    every layer of a model, so made once."""
    firsts, total = [], 0
    for count in counts:
        firsts.append(total)
        total += count
    index = torch.arange(len(counts), dtype=torch.int32)
    repeats = torch.tensor(counts, dtype=torch.int64)
    table = torch.repeat_interleave(index, repeats, output_size=total)
    return firsts, table.to(device)


def _offset(t: torch.Tensor, base: torch.Tensor) -> int:
    delta = t.data_ptr() - base.data_ptr()
    # Same dtype within a launch, and allocations are aligned far beyond an element.
    assert delta % t.element_size() == 0, "tensor not aligned to its element size"
    return delta // t.element_size()


def _check(item: Item) -> None:
    if item.ref.dtype != torch.bfloat16:
        raise ValueError(f"the reference must be bf16 (the quantizers' input): {item.ref.dtype}")
    if item.ref.dim() != 2 or item.got.shape != item.ref.shape:
        raise ValueError(
            f"ref and shipped must be 2-D of one shape, got {tuple(item.ref.shape)} and "
            f"{tuple(item.got.shape)}"
        )
    if item.ref.shape[1] > 1 and (item.ref.stride(1) != 1 or item.got.stride(1) != 1):
        raise ValueError("rows must be contiguous (a column stride of 1)")
    if item.adds_to is not None and item.unit is Unit.BLOCKS:
        raise ValueError("only row units add up across items")
    if item.unit is Unit.PLAIN:
        if item.scale is not None:
            raise ValueError("a PLAIN item has no scale")
        return
    if item.got.dtype != FP8_DTYPE or item.scale is None or item.scale.dtype != torch.float32:
        raise ValueError(f"a {item.unit.name} item is fp8 with an fp32 scale")
    m, n = item.ref.shape
    want = (cdiv(m, BLOCK), cdiv(n, BLOCK)) if item.unit is Unit.BLOCKS else (m, 1)
    if tuple(item.scale.shape) != want:
        raise ValueError(f"scale for a {m}x{n} {item.unit.name} item must be {want}")
    if want[1] > 1 and item.scale.stride(1) != 1:
        raise ValueError("scale rows must be contiguous")


def _sums_reference(item: Item) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit: sum of squared errors, sum of squared reference values (fp32)."""
    ref = item.ref.float()
    got = item.got.float()
    m, n = ref.shape
    if item.unit is Unit.BLOCKS:
        assert item.scale is not None
        scale = item.scale.float().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
        diff = got * scale[:m, :n] - ref
        return _blocks(diff).square().sum(-1), _blocks(ref).square().sum(-1)
    if item.unit is Unit.ROWS and item.scale is not None:
        got = got * item.scale.float()
    return (got - ref).square().sum(-1), ref.square().sum(-1)


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """[M, N] -> [blocks, elements], blocks row-major; zero padding adds nothing to a sum."""
    m, n = x.shape
    mb, nb = cdiv(m, BLOCK), cdiv(n, BLOCK)
    padded = torch.nn.functional.pad(x, (0, nb * BLOCK - n, 0, mb * BLOCK - m))
    return padded.view(mb, BLOCK, nb, BLOCK).permute(0, 2, 1, 3).reshape(mb * nb, -1)


def _relative(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """sqrt(num / den) per unit, with 0/0 = 0, x/0 = inf and a non-finite num (NaN) = inf."""
    inf = torch.full_like(num, torch.inf)
    ratio = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.where(num > 0, inf, 0))
    return torch.where(torch.isfinite(num), ratio, inf).sqrt()


__all__ = ["Item", "Unit", "weight_errors"]

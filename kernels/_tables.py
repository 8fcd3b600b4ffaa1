"""Work tables that let one Triton launch quantize many tensors.

A launch gets: the first input tensor as a base pointer, a `meta` table (int64 [T, 8]) with
each tensor's element offset from that base, its output offsets and its shape, and a unit
table (int32, one entry per work unit: a 128x128 block or a group of rows) naming the tensor
each unit belongs to. Outputs of one call live in one flat fp8 buffer and one flat fp32
buffer; callers get views.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

# Columns of the meta table. 8 int64 per row: a row is 64 bytes, one aligned sector pair.
META_COLS = 8
X_OFF, Q_OFF, S_OFF, ROWS_M, COLS_N, FIRST_UNIT = range(6)

# Outputs are packed with each tensor's q starting on a 16-byte boundary, so that the kernel may
# assume 16-byte aligned fp8 stores whenever the row length allows.
Q_ALIGN = 16


def packed_offsets(sizes: Sequence[int], align: int) -> tuple[list[int], int]:
    """Start of each item in one flat buffer (each start a multiple of `align`), and the total."""
    offsets, total = [], 0
    for size in sizes:
        total = -(-total // align) * align
        offsets.append(total)
        total += size
    return offsets, total


def is_aligned(w: torch.Tensor) -> bool:
    """Whether the kernel may assume 16-byte aligned rows of `w` (and of its fp8 output):
    the data starts on 16 bytes and a row holds a multiple of 16 elements."""
    return w.data_ptr() % 16 == 0 and w.shape[1] % 16 == 0


def alignment_groups(ws: Sequence[torch.Tensor]) -> list[tuple[bool, list[int]]]:
    """Indices of the non-empty tensors, split into the aligned group and the rest."""
    groups: dict[bool, list[int]] = {True: [], False: []}
    for i, w in enumerate(ws):
        if w.numel() > 0:
            groups[is_aligned(w)].append(i)
    return [(aligned, idx) for aligned, idx in groups.items() if idx]


def element_offset(w: torch.Tensor, base: torch.Tensor) -> int:
    """Offset in elements of w's data from base's (negative allowed: one address space)."""
    diff = w.data_ptr() - base.data_ptr()
    assert diff % w.element_size() == 0, "tensors of one dtype are element-aligned"
    return diff // w.element_size()


def meta_table(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    padded = [row + [0] * (META_COLS - len(row)) for row in rows]
    return torch.tensor(padded, dtype=torch.int64).to(device)


@functools.lru_cache(maxsize=32)
def unit_table(counts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int32 [sum(counts)]: entry u names the meta row of unit u. Cached: a model's shapes
    repeat from one update to the next, so this is built once per model and launch shape."""
    index = torch.arange(len(counts), dtype=torch.int32, device=device)
    repeats = torch.tensor(counts, dtype=torch.int64, device=device)
    return torch.repeat_interleave(index, repeats, output_size=sum(counts))

"""Work tables that let one Triton launch quantize many tensors.

A launch gets: the first input tensor of its group as a base pointer, a `meta` table (int64
[T, 8]) with each tensor's element offset from that base, its output offsets and its shape,
and a unit table (int32, one entry per work unit: a 128x128 block or a group of rows) naming
the tensor each unit belongs to. Outputs of one call live in one flat fp8 buffer and one flat
fp32 buffer; callers get views.

Host cost matters as much as the kernel (a whole model is ~5 ms of GPU time), so everything
that depends only on the shapes is computed once per model layout and cached (`Layout`); a
call then only reads the tensors' addresses and copies one small table to the GPU, from pinned
memory and without a sync (a copy from pageable memory would wait for the GPU to drain).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

# Columns of the meta table. 8 int64 per row: 64 bytes, so a row never straddles two sectors.
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


@dataclass(frozen=True)
class Group:
    """One kernel launch: the tensors it covers and everything about them but addresses."""

    key: Hashable  # the launch class (alignment, tile shape, ...), unpacked by the caller
    idx: tuple[int, ...]  # positions in the call's tensor list; idx[0] is the base pointer
    meta_template: torch.Tensor  # int64 [T, META_COLS] on the CPU; X_OFF filled per call
    units: torch.Tensor  # int32 [num_units] on the device: meta row of each work unit
    num_units: int


@dataclass(frozen=True)
class Layout:
    """Where every output goes and how the launches split the work, for one list of shapes."""

    shapes: tuple[tuple[int, int], ...]
    q_offs: tuple[int, ...]
    q_total: int
    s_offs: tuple[int, ...]
    s_total: int
    groups: tuple[Group, ...]


def build_layout(
    shapes: Sequence[tuple[int, int]],
    launch_keys: Sequence[Hashable | None],
    scale_counts: Sequence[int],
    unit_counts: Sequence[int],
    device: torch.device,
) -> Layout:
    """Pack the outputs and split the tensors into launches (tensors with key None, the empty
    ones, get outputs but no work)."""
    q_offs, q_total = packed_offsets([m * n for m, n in shapes], Q_ALIGN)
    s_offs, s_total = packed_offsets(scale_counts, 1)
    by_key: dict[Hashable, list[int]] = {}
    for i, key in enumerate(launch_keys):
        if key is not None:
            by_key.setdefault(key, []).append(i)
    groups = []
    for key, idx in by_key.items():
        rows, first = [], 0
        for i in idx:
            rows.append([0, q_offs[i], s_offs[i], shapes[i][0], shapes[i][1], first, 0, 0])
            first += unit_counts[i]
        index = torch.arange(len(idx), dtype=torch.int32)
        counts = torch.tensor([unit_counts[i] for i in idx], dtype=torch.int64)
        units = torch.repeat_interleave(index, counts, output_size=first).to(device)
        template = torch.tensor(rows, dtype=torch.int64)
        groups.append(Group(key, tuple(idx), template, units, first))
    return Layout(tuple(shapes), tuple(q_offs), q_total, tuple(s_offs), s_total, tuple(groups))


def cached_layout(fn: Callable[..., Layout]) -> Callable[..., Layout]:
    """Memoize a layout builder: a model's shapes repeat from one update to the next."""
    return functools.lru_cache(maxsize=16)(fn)


def meta_for(group: Group, ws: Sequence[torch.Tensor]) -> torch.Tensor:
    """The group's meta table with this call's element offsets from the base, on the device."""
    base = ws[group.idx[0]]
    base_ptr, size = base.data_ptr(), base.element_size()
    offsets = [(ws[i].data_ptr() - base_ptr) // size for i in group.idx]
    on_cuda = base.device.type == "cuda"
    meta = torch.empty(group.meta_template.shape, dtype=torch.int64, pin_memory=on_cuda)
    meta.copy_(group.meta_template)
    meta[:, X_OFF] = torch.tensor(offsets, dtype=torch.int64)
    return meta.to(base.device, non_blocking=True)


def output_views(
    layout: Layout, q_flat: torch.Tensor, s_flat: torch.Tensor, scale_shape: Callable
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each tensor's (q [M, N], scales) as views of the call's two buffers."""
    out = []
    for (m, n), q_off, s_off in zip(layout.shapes, layout.q_offs, layout.s_offs, strict=True):
        sm, sn = scale_shape(m, n)
        out.append(
            (q_flat.as_strided((m, n), (n, 1), q_off), s_flat.as_strided((sm, sn), (sn, 1), s_off))
        )
    return out

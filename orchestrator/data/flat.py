"""A per-rank shard as one flat uint8 buffer plus a {name, dtype, shape, offset} table.

The buffer moves as one piece (one device copy, one CUDA IPC handle, one digest, one file
write); the table says where each tensor lives in it. Tensors sit back to back with no gap,
ordered by itemsize (largest first) then name: every offset is then a multiple of its tensor's
itemsize (so typed views need no copy), and the table is also a valid safetensors layout
(safetensors wants sorted, contiguous data offsets), so header + data is a safetensors file.
The buffer is padded with zeros to a multiple of 16 bytes for the digest kernel.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kernels.digest import ALIGN
from kernels.digest import digest as buffer_digest
from orchestrator.errors import InvalidUpdate

# safetensors' dtype names (its format spec); the JSON tables use them too.
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint64: "U64",
    torch.uint32: "U32",
    torch.uint16: "U16",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.complex64: "C64",
}
DTYPES_BY_NAME: dict[str, torch.dtype] = {v: k for k, v in DTYPE_NAMES.items()}
METADATA_KEY = "__metadata__"


class BadLayout(InvalidUpdate):
    """A table or a safetensors header that does not describe a valid flat layout."""


def dtype_name(dtype: torch.dtype) -> str:
    """safetensors' name of a torch dtype (F8_E4M3, BF16, F32, ...)."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise BadLayout(f"dtype {dtype} has no safetensors name") from None


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    try:
        return DTYPES_BY_NAME[name]
    except (KeyError, TypeError):
        raise BadLayout(
            f"unknown dtype {name!r}; known: {', '.join(sorted(DTYPES_BY_NAME))}"
        ) from None


def padded(nbytes: int) -> int:
    """nbytes rounded up to the buffer alignment (16)."""
    return -(-nbytes // ALIGN) * ALIGN


@dataclass(frozen=True)
class Entry:
    """One tensor of a flat buffer: bytes [offset, offset + nbytes) viewed as dtype[shape]."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.offset + self.nbytes


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def layout(
    tensors: Mapping[str, tuple[torch.dtype, Sequence[int]]],
) -> tuple[tuple[Entry, ...], int]:
    """Entries for tensors of these dtypes and shapes, back to back in the canonical order
    (itemsize descending, then name), and the total bytes."""
    specs = []
    for name, (dtype, shape) in tensors.items():
        dtype_name(dtype)  # refuses a dtype that cannot be written as safetensors
        shape_t = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape_t):
            raise BadLayout(f"{name}: negative dimension in shape {shape_t}")
        specs.append((-_itemsize(dtype), name, dtype, shape_t))
    specs.sort(key=lambda s: (s[0], s[1]))
    entries = []
    offset = 0
    for neg_itemsize, name, dtype, shape_t in specs:
        nbytes = -neg_itemsize * math.prod(shape_t)
        entries.append(Entry(name, dtype, shape_t, offset, nbytes))
        offset += nbytes
    table = tuple(entries)
    check_table(table, offset)
    return table, offset


def check_table(table: Sequence[Entry], nbytes: int) -> None:
    """A table is valid when its names are unique (and not safetensors' metadata key), each
    entry's bytes match its shape and start on a multiple of its itemsize, and the entries
    cover [0, nbytes) in order, back to back."""
    seen: set[str] = set()
    position = 0
    for e in table:
        if not isinstance(e.name, str) or not e.name or e.name == METADATA_KEY:
            raise BadLayout(f"invalid tensor name {e.name!r}")
        if e.name in seen:
            raise BadLayout(f"tensor {e.name!r} appears twice")
        seen.add(e.name)
        itemsize = _itemsize(e.dtype)
        if e.nbytes != itemsize * math.prod(e.shape):
            raise BadLayout(f"{e.name}: {e.nbytes} bytes for {e.dtype} {list(e.shape)}")
        if e.offset % itemsize:
            raise BadLayout(f"{e.name}: offset {e.offset} is not a multiple of {itemsize}")
        if e.offset != position:
            raise BadLayout(
                f"{e.name}: offset {e.offset}, expected {position} (tensors must be in offset "
                "order, back to back)"
            )
        position = e.end
    if position != nbytes:
        raise BadLayout(f"the table covers {position} bytes, the shard has {nbytes}")


def _entry_json(e: Entry) -> dict[str, Any]:
    return {
        "name": e.name,
        "dtype": dtype_name(e.dtype),
        "shape": list(e.shape),
        "offset": e.offset,
        "nbytes": e.nbytes,
    }


def _int(value: Any, what: str) -> int:
    # bool is an int in Python; a table with true for an offset is still wrong.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise BadLayout(f"{what} must be a non-negative integer, got {value!r}")
    return value


class FlatShard:
    """One rank's tensors in one flat uint8 buffer (any device) and the table that reads it.

    `buffer` is exactly padded(nbytes) long; the padding is zero (so the digest is a function
    of the tensors and the table alone).
    """

    def __init__(self, buffer: torch.Tensor, table: Sequence[Entry], nbytes: int) -> None:
        if buffer.dtype != torch.uint8 or buffer.dim() != 1 or not buffer.is_contiguous():
            raise ValueError("a shard's buffer is a contiguous 1-D uint8 tensor")
        if buffer.numel() != padded(nbytes):
            raise ValueError(
                f"a shard of {nbytes} bytes needs a buffer of {padded(nbytes)}, "
                f"got {buffer.numel()}"
            )
        if buffer.data_ptr() % ALIGN:
            raise ValueError("a shard's buffer must start on a 16-byte boundary")
        table = tuple(table)
        check_table(table, nbytes)
        self.buffer = buffer
        self.table: tuple[Entry, ...] = table
        self.nbytes = nbytes

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def views(self) -> dict[str, torch.Tensor]:
        """Typed views into the buffer, no copy: writing one writes the buffer."""
        return {e.name: _view(self.buffer, e) for e in self.table}

    def table_json(self) -> list[dict[str, Any]]:
        """The table as JSON-able dicts (dtype by its safetensors name), in table order."""
        return [_entry_json(e) for e in self.table]

    @staticmethod
    def layout_from_json(items: Any) -> tuple[Entry, ...]:
        """The inverse of table_json; checks types and each entry's size (the order and
        coverage are checked when a shard is built on it)."""
        if not isinstance(items, list):
            raise BadLayout(f"a table is a list of entries, got {type(items).__name__}")
        entries = []
        for i, item in enumerate(items):
            if not isinstance(item, dict) or set(item) != {
                "name",
                "dtype",
                "shape",
                "offset",
                "nbytes",
            }:
                raise BadLayout(
                    f"table entry {i} must have exactly name, dtype, shape, offset, nbytes"
                )
            shape = item["shape"]
            if not isinstance(shape, list):
                raise BadLayout(f"table entry {i}: shape must be a list")
            name = item["name"]
            if not isinstance(name, str):
                raise BadLayout(f"table entry {i}: name must be a string")
            entries.append(
                Entry(
                    name=name,
                    dtype=dtype_from_name(item["dtype"]),
                    shape=tuple(_int(d, f"{name}: a dimension") for d in shape),
                    offset=_int(item["offset"], f"{name}: offset"),
                    nbytes=_int(item["nbytes"], f"{name}: nbytes"),
                )
            )
        table = tuple(entries)
        check_table(table, sum(e.nbytes for e in table))
        return table

    def table_hash(self) -> str:
        """sha256 (hex) of the table's canonical JSON."""
        return table_hash(self.table)

    def digest(self) -> str:
        """The buffer's digest (on the buffer's device) and a short hash of the table: a wrong
        table changes it as surely as a wrong byte."""
        return f"{buffer_digest(self.buffer)}-{self.table_hash()[:16]}"

    def header_bytes(self, metadata: Mapping[str, str] | None = None) -> bytes:
        """A safetensors header for this shard: header + buffer[:nbytes] is a safetensors file."""
        return header_bytes(self.table, metadata or {})


def table_hash(table: Sequence[Entry]) -> str:
    """sha256 (hex) of a table's canonical JSON."""
    text = json.dumps([_entry_json(e) for e in table], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def header_bytes(table: Sequence[Entry], metadata: Mapping[str, str]) -> bytes:
    """8-byte little-endian length + JSON padded with spaces to a multiple of 8, with the
    table's offsets as data_offsets."""
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata maps strings to strings")
        header[METADATA_KEY] = dict(metadata)
    for e in table:
        header[e.name] = {
            "dtype": dtype_name(e.dtype),
            "shape": list(e.shape),
            "data_offsets": [e.offset, e.end],
        }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def _view(buffer: torch.Tensor, e: Entry) -> torch.Tensor:
    return buffer[e.offset : e.end].view(e.dtype).view(e.shape)


def empty_like_layout(
    table: Sequence[Entry],
    nbytes: int,
    device: torch.device | str,
    out: torch.Tensor | None = None,
) -> FlatShard:
    """A shard for this table with uninitialized tensors (zeroed padding), in `out` if given
    and large enough (the receiver's staging slot), else in a new buffer on `device`."""
    device = torch.device(device)
    size = padded(nbytes)
    if out is None:
        buffer = torch.empty(size, dtype=torch.uint8, device=device)
    else:
        if out.dtype != torch.uint8 or out.dim() != 1 or not out.is_contiguous():
            raise ValueError("out must be a contiguous 1-D uint8 tensor")
        if out.device != device and not (
            device.type == out.device.type == "cuda" and device.index is None
        ):
            raise ValueError(f"out is on {out.device}, the shard goes to {device}")
        if out.numel() < size:
            raise ValueError(f"out holds {out.numel()} bytes, the shard needs {size}")
        buffer = out[:size]
    buffer[nbytes:].zero_()
    return FlatShard(buffer, table, nbytes)


def pack(
    tensors: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str,
    out: torch.Tensor | None = None,
) -> FlatShard:
    """Copy tensors (any device, any strides) into one flat shard on `device`: one copy each,
    queued without waiting; the host waits once, and only when it must read what a GPU wrote
    (a CUDA source packed into a CPU buffer)."""
    device = torch.device(device)
    table, nbytes = layout({n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()})
    shard = empty_like_layout(table, nbytes, device, out=out)
    views = shard.views()
    wait_for: set[torch.device] = set()
    with torch.no_grad():
        for e in table:
            src = tensors[e.name]
            # non_blocking is safe both ways into a GPU: from pageable memory CUDA copies the
            # source out before returning, from pinned memory torch's host allocator keeps a
            # temporary alive until its copy ran. Out of a GPU into host memory it is not:
            # hence the one wait below.
            views[e.name].copy_(src, non_blocking=True)
            if src.device.type == "cuda" and device.type != "cuda":
                wait_for.add(src.device)
    for d in wait_for:
        torch.cuda.synchronize(d)
    return shard

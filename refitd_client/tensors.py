"""A trainer's tensors as a few flat buckets that refitd, on the same host, can map.

Tensors are packed in the order they come into buckets of up to `bucket_bytes` (one device
each; a larger tensor gets a bucket of its own): one flat uint8 buffer plus a
{name, dtype, shape, offset, nbytes} table per bucket (orchestrator/data/flat.py), so a handful
of handles carry hundreds of tensors. A CUDA bucket is exported by CUDA IPC, a CPU one lives in
a shared-memory file (orchestrator/data/ipc.py); each carries its digest, which the daemon
checks on its copy. The buckets cost one copy of the tensors in the trainer's memory until
`release()`, which the client calls once the daemon has answered (it has copied them by then).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from orchestrator.data import exporter
from orchestrator.data.flat import FlatShard, layout, pack, padded
from orchestrator.data.ipc import Exported, SharedBuffer

DEFAULT_BUCKET_BYTES = 1 << 30
SOURCE_TYPE = "cuda_ipc"


class TensorExport:
    """Exported buckets, alive until `release()` (a context manager releases on exit)."""

    def __init__(self) -> None:
        self._exported = Exported()
        self.buckets: list[dict[str, Any]] = []
        self.tensors = 0
        self.nbytes = 0

    def add(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        """Pack `tensors` (all on `device`) into one bucket and export it."""
        shard: FlatShard
        if device.type == "cuda":
            # The copies and the export's event on that device's current stream.
            with torch.cuda.device(device):
                shard = pack(tensors, device=device)
                handle = self._exported.export(shard.buffer)
        else:
            _, nbytes = layout({n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()})
            shared = SharedBuffer.create(padded(nbytes))
            try:
                shard = pack(tensors, device="cpu", out=shared.tensor)
            except BaseException:
                shared.release()
                raise
            handle = self._exported.export(shared)
        self.buckets.append(
            {"handle": handle, "tensors": shard.table_json(), "digest": shard.digest()}
        )
        self.tensors += len(tensors)
        self.nbytes += shard.nbytes

    def source(self) -> dict[str, Any]:
        """The `source` of POST /weights/update."""
        return {"type": SOURCE_TYPE, "exporter": exporter.identity(), "buckets": self.buckets}

    def release(self) -> None:
        """Free the buckets (shared-memory files unlinked, CUDA memory back to the allocator)."""
        self._exported.release()

    def __enter__(self) -> TensorExport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def export_tensors(
    named: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> TensorExport:
    """Pack and export `named` (a dict, or an iterator of (name, tensor) consumed once: a
    generator may gather each tensor and drop it after it was packed)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    items = named.items() if isinstance(named, Mapping) else named
    export = TensorExport()
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    pending_device: torch.device | None = None
    seen: set[str] = set()
    try:
        for name, tensor in items:
            if not isinstance(name, str) or not name:
                raise ValueError(f"a tensor name is a non-empty string, got {name!r}")
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name}: a torch.Tensor, got {type(tensor).__name__}")
            if name in seen:
                raise ValueError(f"tensor {name!r} is given twice")
            if tensor.device.type not in ("cuda", "cpu"):
                raise ValueError(f"{name}: tensors on {tensor.device} cannot be pushed")
            seen.add(name)
            size = tensor.numel() * tensor.element_size()
            if pending and (tensor.device != pending_device or pending_bytes + size > bucket_bytes):
                assert pending_device is not None
                export.add(pending, pending_device)
                pending, pending_bytes = {}, 0
            pending[name] = tensor.detach()
            pending_bytes += size
            pending_device = tensor.device
        if not seen:
            raise ValueError("no tensors to push")
        if pending:
            assert pending_device is not None
            export.add(pending, pending_device)
    except BaseException:
        export.release()
        raise
    return export

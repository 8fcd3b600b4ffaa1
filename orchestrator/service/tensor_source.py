"""Updates from a trainer's tensors on this host (source type `cuda_ipc`).

The trainer (refitd_client) packs its tensors into a few flat buckets, each with a
{name, dtype, shape, offset, nbytes} table and a digest, and posts a handle per bucket: CUDA IPC
for GPU buckets, a shared-memory file in /dev/shm for CPU ones. The door, before anything is
recorded:
1. checks the exporter: this host (hostname and boot id), this daemon's user, a process that
   runs (pid and start time);
2. checks the tables: well-formed, no name twice, every handle as long as its table, and the
   names, shapes and dtypes against the model (the same comparison as a path source's headers);
3. copies every bucket into the daemon's own memory on its device, in one pass;
4. checks that the exporter still runs and that each copy has the digest the exporter computed:
   a buffer freed, reused or rewritten during the copy is refused, never half-applied.
The trainer may free its buffers once it has the answer. Any refusal is a 4xx with the reason,
and the copy is dropped.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path
from typing import Any

import torch

from orchestrator import failpoints
from orchestrator.data import exporter as exporters
from orchestrator.data.flat import BadLayout, Entry, FlatShard, empty_like_layout, padded
from orchestrator.data.ipc import SHM_DIR, HandleUnavailable, open_handle
from orchestrator.errors import InvalidUpdate, PayloadTooLarge, SourceNotAllowed, TooBusy
from orchestrator.service.staged import RETRY_AFTER_S

TENSOR_SOURCE = "cuda_ipc"


def check_exporter(exporter: dict[str, Any]) -> None:
    """Refuse a handle from another host or user, or from a process that does not run here."""
    host, boot = socket.gethostname(), exporters.boot_id()
    if exporter["boot_id"] != boot or exporter["host"] != host:
        raise SourceNotAllowed(
            f"the tensors were exported on host {exporter['host']!r} (boot id "
            f"{exporter['boot_id']!r}), not on this daemon's host {host!r} (boot id {boot!r}); "
            "CUDA IPC and shared memory work within one host: from another host, push a path "
            "or an upload"
        )
    uid = os.getuid()
    if exporter["uid"] != uid:
        raise SourceNotAllowed(
            f"the exporter runs as uid {exporter['uid']} and the daemon as uid {uid}; refitd "
            "maps the buffers of its own user only: run the trainer as the daemon's user"
        )
    pid = exporter["pid"]
    if pid == os.getpid():
        raise SourceNotAllowed(
            f"the exporter names pid {pid}, the daemon's own: the tensors must come from the "
            "trainer's process"
        )
    if not exporters.running(pid, exporter["start_time"]):
        raise SourceNotAllowed(
            f"the exporting process {pid} does not run on this host (it exited, or it runs in "
            "another pid namespace); nothing was kept"
        )
    owner = exporters.owner(pid)
    if owner != uid:
        raise SourceNotAllowed(f"process {pid} belongs to uid {owner}, not to uid {uid}")


def bucket_tables(
    buckets: list[dict[str, Any]], *, max_tensors: int
) -> list[tuple[tuple[Entry, ...], int]]:
    """Each bucket's table and data bytes; refuses a malformed table, a name in two buckets,
    or a handle whose length is not its table's."""
    count = sum(len(b["tensors"]) for b in buckets)
    if count > max_tensors:
        raise PayloadTooLarge(
            f"the update holds {count} tensors, over limits.max_tensors={max_tensors}"
        )
    seen: set[str] = set()
    tables = []
    for i, bucket in enumerate(buckets):
        try:
            table = FlatShard.layout_from_json(bucket["tensors"])
        except BadLayout as exc:
            raise InvalidUpdate(f"bucket {i}: {exc.message}") from None
        nbytes = sum(e.nbytes for e in table)
        if bucket["handle"]["nbytes"] != padded(nbytes):
            raise InvalidUpdate(
                f"bucket {i}: its handle covers {bucket['handle']['nbytes']} bytes and its table "
                f"{padded(nbytes)} ({nbytes} padded to 16)"
            )
        twice = seen.intersection(e.name for e in table)
        if twice:
            raise InvalidUpdate(f"tensor {min(twice)!r} appears in more than one bucket")
        seen.update(e.name for e in table)
        tables.append((table, nbytes))
    return tables


def header_of(tables: list[tuple[tuple[Entry, ...], int]]) -> dict[str, tuple[str, list[int]]]:
    """{name: (dtype name, shape)}, as a path source's headers give it, for check_header."""
    from orchestrator.data.flat import dtype_name

    return {e.name: (dtype_name(e.dtype), list(e.shape)) for t, _ in tables for e in t}


def copy_buckets(
    source: dict[str, Any],
    tables: list[tuple[tuple[Entry, ...], int]],
    *,
    device: torch.device,
) -> list[FlatShard]:
    """Copy every bucket into a new flat shard on `device` (one pass, waited for), then check
    that the exporter still runs and that each copy has the exporter's digest."""
    exporter = source["exporter"]
    buckets = source["buckets"]
    for i, bucket in enumerate(buckets):
        handle = bucket["handle"]
        if handle["kind"] == "shm" and Path(handle["path"]).parent != SHM_DIR:
            raise SourceNotAllowed(
                f"bucket {i}: a shared-memory handle names a file in {SHM_DIR}, not "
                f"{handle['path']!r}"
            )
    shards = []
    cuda_devices = {device} if device.type == "cuda" else set()
    with contextlib.ExitStack() as opened:
        for i, (bucket, (table, nbytes)) in enumerate(zip(buckets, tables, strict=True)):
            try:
                mapped = opened.enter_context(open_handle(bucket["handle"], owner_uid=os.getuid()))
            except HandleUnavailable as exc:
                raise SourceNotAllowed(
                    f"bucket {i}: its {bucket['handle']['kind']} handle cannot be opened "
                    f"({exc.message}); nothing was kept"
                ) from None
            if mapped.device.type == "cuda":
                cuda_devices.add(mapped.device)
            try:
                shard = empty_like_layout(table, nbytes, device)
            except torch.cuda.OutOfMemoryError:
                raise TooBusy(
                    f"bucket {i}: the daemon has no room on {device} for its copy of the "
                    "tensors now (the running update holds it); nothing was kept: push again "
                    f"in {RETRY_AFTER_S}s",
                    retry_after_s=RETRY_AFTER_S,
                ) from None
            try:
                shard.buffer.copy_(mapped, non_blocking=True)
            except RuntimeError as exc:
                raise SourceNotAllowed(f"bucket {i} cannot be copied: {exc}") from None
            shards.append(shard)
        # Before the mappings close, and before the answer lets the trainer free its buffers.
        for d in cuda_devices:
            torch.cuda.synchronize(d)
        # Tests kill the trainer here, while its buffers are still mapped.
        failpoints.hit("ipc.copied")
    if not exporters.running(exporter["pid"], exporter["start_time"]):
        raise SourceNotAllowed(
            f"the exporting process {exporter['pid']} exited before the copy ended, so its "
            "buffers may have been freed under it; nothing was kept: push again"
        )
    for i, (bucket, shard) in enumerate(zip(buckets, shards, strict=True)):
        got = shard.digest()
        if got != bucket["digest"]:
            raise InvalidUpdate(
                f"bucket {i} changed while it was copied (digest {got}, the exporter said "
                f"{bucket['digest']}); keep the tensors unchanged until the answer comes; "
                "nothing was kept"
            )
    return shards


def recorded(source: dict[str, Any], tables: list[tuple[tuple[Entry, ...], int]]) -> dict[str, Any]:
    """What the update record keeps of the source (the handles mean nothing once copied)."""
    return {
        "type": TENSOR_SOURCE,
        "exporter": source["exporter"],
        "buckets": len(tables),
        "tensors": sum(len(t) for t, _ in tables),
        "bytes": sum(n for _, n in tables),
    }
